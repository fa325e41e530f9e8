"""Loading a graph named on the command line, shared by run, show, bench and serve.

A graph spec is ``FILE.py`` or ``package.module``, optionally followed by ``:attribute``:

* ``graphs/tiny_lm.py`` — the module's ``build(**options)``, or else its module-level
  ``graph`` (a ``Graph``);
* ``app.py:make_graph`` — the named attribute: a ``Graph``, or a callable returning one
  (called with the build options).

Everything a user can get wrong here raises :class:`UsageError` (exit status 2) with a
message naming the spec.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..graph import Graph

__all__ = [
    "CommandFailed",
    "Loaded",
    "UsageError",
    "describe",
    "load",
    "load_graph",
    "load_module",
    "parse_options",
]


class UsageError(Exception):
    """The command line names something that is not there or is not a graph (exit 2)."""


class CommandFailed(Exception):
    """A failure whose message is all a user needs (exit 1): a busy port, say."""


@dataclass
class Loaded:
    """A loaded graph and what its module offers besides it."""

    graph: Graph
    module: ModuleType
    example_inputs: list[Any] = field(default_factory=list)


def _split(spec: str) -> tuple[str, str | None]:
    """``"a/b.py:attr"`` → ``("a/b.py", "attr")``; a Windows drive letter is no attribute."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not tail or not head or "/" in tail or "\\" in tail or tail.endswith(".py"):
        return spec, None
    return head, tail


def load_module(spec: str) -> ModuleType:
    """Import ``spec``: a path to a ``.py`` file (``graphs/tiny_lm.py``) or a module name
    (``graphs.tiny_lm``). An ``:attribute`` suffix is ignored here.

    Raises:
        UsageError: no such file or module.
    """
    where, _ = _split(spec)
    path = Path(where)
    if where.endswith(".py") or path.exists():
        if not path.is_file():
            raise UsageError(f"no such graph file: {where}")
        name = "_dataflow_graph_" + path.stem
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UsageError(f"cannot import {where}: not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        # The file's own directory is importable (its helper modules), as when running it
        # as a script; appended, so that it never shadows an installed module.
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.append(folder)
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (where == exc.name or where.startswith(exc.name + ".")):
            raise UsageError(
                f"no graph file or module {where!r} (give a path like graphs/x.py "
                "or a module name like graphs.x)"
            ) from exc
        raise  # the module exists but imports something missing: a real error


def _from_module(spec: str, module: ModuleType, attr: str | None, options: dict[str, Any]) -> Any:
    if attr is not None:
        if not hasattr(module, attr):
            raise UsageError(f"{spec}: the module has no attribute {attr!r}")
        target = getattr(module, attr)
        if isinstance(target, Graph):
            if options:
                raise UsageError(f"{spec} is a Graph, not a function: it takes no --option")
            return target
        if not callable(target):
            raise UsageError(
                f"{spec}: {attr!r} is a {type(target).__name__}, not a Graph or a function"
            )
        return target(**options)
    build = getattr(module, "build", None)
    if callable(build):
        return build(**options)
    graph = getattr(module, "graph", None)
    if isinstance(graph, Graph):
        if options:
            raise UsageError(f"{spec} has a module-level graph, no build(): it takes no --option")
        return graph
    raise UsageError(
        f"{spec} defines no graph: give it a build(**options) -> Graph function or a "
        "module-level `graph`, or name one as FILE.py:attribute"
    )


def load(spec: str, **options: Any) -> Loaded:
    """Load the graph ``spec`` names (see the module docstring).

    Raises:
        UsageError: no such file, module or attribute, or nothing there is a graph.
        TypeError: ``build`` does not accept the options (the message names them).
    """
    module = load_module(spec)
    _, attr = _split(spec)
    try:
        graph = _from_module(spec, module, attr, options)
    except TypeError as exc:
        if options and "argument" in str(exc):
            raise UsageError(f"{spec}: bad --option: {exc}") from exc
        raise
    if not isinstance(graph, Graph):
        raise UsageError(f"{spec}: the graph function returned {type(graph).__name__}, not a Graph")
    return Loaded(graph, module, list(getattr(module, "EXAMPLE_INPUTS", [])))


def load_graph(spec: str, **options: Any) -> Graph:
    """The graph ``spec`` names (see :func:`load`)."""
    return load(spec, **options).graph


def parse_options(pairs: list[str], flag: str = "--option") -> dict[str, Any]:
    """``["k=v", ...]`` → dict, values parsed as JSON where they parse, else strings.

    Raises:
        UsageError: an item is not ``KEY=VALUE``.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


def describe(exc: BaseException) -> str:
    """One line for a user: the error's kind where it helps, and its message."""
    from .._errors import DataflowError

    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, UsageError | CommandFailed | DataflowError) and text:
        return text
    if isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return f"no such file: {exc.filename}"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    name = type(exc).__name__
    return f"{name}: {text} (--debug shows the traceback)" if text else name
