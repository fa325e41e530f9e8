"""Serve-test fixtures: a real uvicorn server on a free loopback port, in the test's loop.

The server runs in the test's own event loop (no thread), bound to a socket the fixture
creates on port 0, and reports when the app's lifespan has started (engines running) and
each time an HTTP exchange has fully ended on the server side.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from dataflow._cli._load import load_module

ECHO_PATH = Path(__file__).with_name("echo_graph.py")


class Probe:
    """ASGI wrapper: lifespan started, and HTTP exchanges the server finished."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.started = anyio.Event()
        self.startup_failed: str | None = None
        self.finished: list[str] = []
        self._finished_event = anyio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":

            async def lifespan_send(message: Any) -> None:
                if message["type"] == "lifespan.startup.failed":
                    self.startup_failed = message.get("message", "failed")
                    self.started.set()
                elif message["type"] == "lifespan.startup.complete":
                    self.started.set()
                await send(message)

            await self.app(scope, receive, lifespan_send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                self.finished.append(scope["path"])
                self._finished_event.set()
                self._finished_event = anyio.Event()

    async def wait_finished(self, count: int) -> None:
        """Until ``count`` HTTP exchanges have ended on the server."""
        while len(self.finished) < count:
            await self._finished_event.wait()


class Server:
    def __init__(self, url: str, probe: Probe) -> None:
        self.url = url
        self.probe = probe


@contextlib.asynccontextmanager
async def running(app: Any) -> AsyncIterator[Server]:
    """Serve ``app`` with uvicorn on 127.0.0.1:<free port> until the block ends."""
    import uvicorn

    probe = Probe(app)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        probe, lifespan="on", log_config=None, log_level="warning", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    with sock:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(30):
                await probe.started.wait()
            if probe.startup_failed is not None:
                raise RuntimeError(f"app failed to start: {probe.startup_failed}")
            try:
                yield Server(f"http://127.0.0.1:{port}", probe)
            finally:
                server.should_exit = True


@pytest.fixture
def serve() -> Callable[[Any], contextlib.AbstractAsyncContextManager[Server]]:
    return running


@pytest.fixture
def echo() -> ModuleType:
    """The echo graph module (loaded from its file, as ``dataflow serve`` loads graphs)."""
    return load_module(str(ECHO_PATH))


@pytest.fixture
def alpha() -> ModuleType:
    """The toy text-generation graph module (a ``generate`` node, see lm_graph.py)."""
    return load_module(str(Path(__file__).with_name("lm_graph.py")))
