"""Shared fixtures: every async test runs on asyncio and on trio (anyio's plugin)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def no_thread_leak() -> Iterator[None]:
    """Fails the test if it leaves a thread running that it did not find."""
    before = threading.active_count()
    yield
    assert threading.active_count() == before, [t.name for t in threading.enumerate()]
