"""A pytest plugin with an ``engine`` fixture for testing your own graphs.

Enable it in a ``conftest.py`` (or a test module) with::

    pytest_plugins = ["dataflow.testing_plugin"]

then define a ``graph`` fixture and write async tests that take ``engine``: each runs on
asyncio and on trio (through anyio's pytest plugin and its ``anyio_backend`` fixture,
which this plugin parametrises unless your conftest defines its own), inside a started
engine that is shut down, with its threads joined, when the test ends::

    @pytest.fixture
    def graph() -> df.Graph:
        return my_graph()

    @pytest.mark.anyio
    async def test_it(engine: df.Engine) -> None:
        assert await engine.run("x") == ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from . import Engine, Graph

__all__ = ["anyio_backend", "engine"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The async backend a test runs on: each test runs once on each."""
    return str(request.param)


@pytest.fixture
async def engine(graph: Graph, anyio_backend: str) -> AsyncIterator[Engine]:
    """A started :class:`~dataflow.Engine` over the test's ``graph`` fixture."""
    async with Engine(graph) as started:
        yield started
