"""Loading a graph named on the command line."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from .._errors import GraphError
from ..graph import Graph

__all__ = ["load_graph", "load_module", "parse_options"]


def load_module(spec: str) -> ModuleType:
    """Import ``spec``: a path to a ``.py`` file (``graphs/tiny_lm.py``) or a module name
    (``graphs.tiny_lm``)."""
    path = Path(spec)
    if spec.endswith(".py") or path.exists():
        if not path.is_file():
            raise GraphError(f"no graph file {spec!r}")
        name = "_dataflow_graph_" + path.stem
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise GraphError(f"cannot import {spec!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise GraphError(f"cannot import graph module {spec!r}: {exc}") from exc


def load_graph(spec: str, **options: Any) -> Graph:
    """``build(**options)`` of the graph module ``spec``.

    Raises:
        GraphError: the module cannot be imported, has no ``build``, or ``build`` does
            not return a Graph.
    """
    module = load_module(spec)
    build = getattr(module, "build", None)
    if not callable(build):
        raise GraphError(f"{spec!r} has no build(**options) -> Graph function")
    graph = build(**options)
    if not isinstance(graph, Graph):
        raise GraphError(f"{spec!r}: build() returned {type(graph).__name__}, not a Graph")
    return graph


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` → dict, values parsed as JSON where they parse, else strings."""
    import json

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"expected KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options
