"""Graceful shutdown under uvicorn: stop accepting, let open requests run for up to
``grace`` seconds, then end them (an error event ``shutting_down`` and ``[DONE]`` for a
stream, a 503 for a request that has not answered yet), then stop the engines.

uvicorn's own ``timeout_graceful_shutdown`` cancels what is left by cancelling its tasks,
which logs a traceback per request and gives the clients nothing; here the app ends its
requests itself at ``grace`` and uvicorn's limit stays a backstop a little later. A
second Ctrl-C exits the process at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Generator, Iterator
from types import FrameType
from typing import Any

import anyio

__all__ = ["Cancellable", "server"]

BACKSTOP_S = 5.0  # after the grace, uvicorn's own limit


class Cancellable:
    """The requests in flight, each in a cancel scope the shutdown can end."""

    def __init__(self) -> None:
        self._scopes: set[anyio.CancelScope] = set()
        self.shutting_down = False

    @contextlib.contextmanager
    def scope(self) -> Iterator[anyio.CancelScope]:
        """Run a request's work inside; ``scope.cancelled_caught`` tells it was cut."""
        scope = anyio.CancelScope()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def cancel_all(self) -> None:
        """End every request still running (the grace is over)."""
        self.shutting_down = True
        for scope in list(self._scopes):
            scope.cancel()

    def __len__(self) -> int:
        return len(self._scopes)


def server(config: Any, cancellable: Cancellable, grace: float) -> Any:
    """A ``uvicorn.Server`` for ``config`` that shuts down as this module describes.

    ``config.timeout_graceful_shutdown`` is set to ``grace`` plus a backstop.
    """
    import uvicorn

    config.timeout_graceful_shutdown = grace + BACKSTOP_S

    class GracefulServer(uvicorn.Server):
        interrupted = False  # stopped by Ctrl-C (SIGINT) rather than SIGTERM

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if sig == signal.SIGINT:
                self.interrupted = True
            if self.should_exit and sig == signal.SIGINT:
                print("second Ctrl-C: exiting now", file=sys.stderr, flush=True)
                os._exit(130)
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(grace, cancellable.cancel_all)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            # uvicorn re-raises a captured SIGTERM once it has stopped, so the process
            # would die of it; a graceful stop is a clean exit.
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    return GracefulServer(config)
