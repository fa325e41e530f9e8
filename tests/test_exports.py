"""``__all__`` of every public module is exactly its public names (as httpx and anyio test).

A public name is one the module itself binds at top level and does not start with ``_``:
a ``def``, a ``class`` or an assignment, and in a package's ``__init__`` also a name it
re-exports from one of its own modules (``from ._node import Node``). Names a module only
imports for its own use (``from typing import Any``, ``from ...graph import Node`` in a
subpackage), submodules and ``from __future__ import annotations`` are not public.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

# The modules users import. Every other public (non-underscore) module found under
# ``dataflow`` is checked as well, so a new one cannot be forgotten here.
CORE_MODULES = [
    "dataflow",
    "dataflow.graph",
    "dataflow.runtime",
    "dataflow.engine",
    "dataflow.runtime.executors",
]


def _discover() -> list[str]:
    import dataflow

    found = [
        info.name
        for info in pkgutil.walk_packages(dataflow.__path__, "dataflow.", onerror=lambda _: None)
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    return CORE_MODULES + sorted(set(found) - set(CORE_MODULES))


PUBLIC_MODULES = _discover()


def _import(module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # A module of an optional extra (serve, ray) whose dependency is not installed;
        # a missing dataflow module is a real failure.
        if err.name is None or err.name.split(".")[0] == "dataflow":
            raise
        pytest.skip(f"{module_name} needs {err.name!r}, an optional extra not installed here")


def _bound_names(target: ast.expr) -> set[str]:
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, ast.Tuple | ast.List):
        return {n for elt in target.elts for n in _bound_names(elt)}
    if isinstance(target, ast.Starred):
        return _bound_names(target.value)
    return set()  # attribute or subscript assignment binds no module name


def bound_names(source: str, *, is_package: bool) -> set[str]:
    """The names a module's top level defines, or re-exports when it is a package."""
    names: set[str] = set()
    for stmt in ast.parse(source).body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(stmt.name)
        elif isinstance(stmt, ast.Assign):
            for target in stmt.targets:
                names |= _bound_names(target)
        elif isinstance(stmt, ast.AnnAssign | ast.AugAssign):
            names |= _bound_names(stmt.target)
        elif isinstance(stmt, ast.ImportFrom) and is_package and stmt.level == 1:
            # ``from .x import Y`` in a package's __init__ is how it publishes Y.
            names |= {alias.asname or alias.name for alias in stmt.names}
    return names


def public_names(module: ModuleType) -> set[str]:
    """The public names of ``module``: bound by its own source, not private, not modules."""
    names = bound_names(inspect.getsource(module), is_package=hasattr(module, "__path__"))
    return {
        name
        for name in names
        if not name.startswith("_") and not isinstance(getattr(module, name, None), ModuleType)
    }


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_is_exactly_the_public_names(module_name: str) -> None:
    module = _import(module_name)
    exported = module.__dict__.get("__all__")
    assert isinstance(exported, list), f"{module_name} must declare __all__ as a list"
    assert len(exported) == len(set(exported)), f"{module_name}.__all__ repeats a name"
    expected = public_names(module)
    assert set(exported) == expected, (
        f"{module_name}.__all__: missing {sorted(expected - set(exported))}, "
        f"not public {sorted(set(exported) - expected)}"
    )


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_exported_name_exists(module_name: str) -> None:
    module = _import(module_name)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ names {missing}, which do not exist"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_star_import_gives_exactly_all(module_name: str) -> None:
    namespace: dict[str, object] = {}
    module = _import(module_name)
    exec(f"from {module_name} import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(module.__all__)


def test_package_reexports_are_the_same_objects() -> None:
    import dataflow
    import dataflow.engine
    import dataflow.graph

    for name in dataflow.graph.__all__:
        if name in dataflow.__all__:
            assert getattr(dataflow, name) is getattr(dataflow.graph, name), name
    for name in dataflow.engine.__all__:
        assert getattr(dataflow, name) is getattr(dataflow.engine, name), name


def test_bound_names_sees_defs_assignments_and_reexports() -> None:
    """The helper itself: a check that found nothing would pass for any ``__all__``."""
    source = (
        "from __future__ import annotations\n"
        "import enum\n"
        "from typing import Any\n"
        "from ._impl import Thing, _hidden as _alias, Other as Renamed\n"
        "from ..other import Borrowed\n"
        "CONSTANT: int = 1\n"
        "a, (b, *c) = 1, (2, 3)\n"
        "def f() -> None: ...\n"
        "async def g() -> None: ...\n"
        "class K: ...\n"
    )
    common = {"CONSTANT", "a", "b", "c", "f", "g", "K"}
    assert bound_names(source, is_package=True) == common | {"Thing", "_alias", "Renamed"}
    assert bound_names(source, is_package=False) == common


def test_the_core_modules_are_discovered_and_checked() -> None:
    assert PUBLIC_MODULES[: len(CORE_MODULES)] == CORE_MODULES
    assert {"dataflow.cli", "dataflow.nodes"} <= set(PUBLIC_MODULES)
    assert not any(part.startswith("_") for m in PUBLIC_MODULES for part in m.split("."))
