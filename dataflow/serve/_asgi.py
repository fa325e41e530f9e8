"""Low-level ASGI pieces: JSON and server-sent-event writes, and a response that watches
for the client going away.

Starlette's own ``StreamingResponse`` notices a disconnect only on ASGI spec < 2.4 (on
newer servers, only when a write fails, which never happens while the stream waits for
its next token). :class:`WatchedResponse` always listens for ``http.disconnect`` next to
the handler and cancels the handler when it arrives, so the engine request is cancelled
within one step on every server.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import sniffio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._errors import ApiError

__all__ = ["SSEWriter", "WatchedResponse", "dumps", "send_error", "send_json"]

Handler = Callable[[Send], Awaitable[None]]


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def send_json(
    send: Send, status: int, obj: Any, headers: dict[str, str] | None = None
) -> None:
    """Send a whole JSON response."""
    body = dumps(obj)
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, err: ApiError) -> None:
    await send_json(send, err.status, err.body(), err.headers)


class SSEWriter:
    """Writes ``text/event-stream`` events; the 200 header goes out with the first event,
    so an error before any output can still answer with its own status."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def _start(self) -> None:
        self.started = True
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # proxies must not hold tokens back
        ]
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})

    async def event(self, obj: Any) -> None:
        """Send ``data: <json>``."""
        await self.raw(b"data: " + dumps(obj) + b"\n\n")

    async def raw(self, data: bytes) -> None:
        if not self.started:
            await self._start()
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def done(self) -> None:
        """Send ``data: [DONE]`` and end the response."""
        await self.raw(b"data: [DONE]\n\n")
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def fail(self, err: ApiError) -> None:
        """End with ``err``: as an error response if nothing was sent yet, else as an
        ``error`` event (what OpenAI clients raise from) followed by ``[DONE]``."""
        if not self.started:
            await send_error(self._send, err)
            return
        await self.event(err.body())
        await self.done()


class WatchedResponse(Response):
    """A response written by ``handler(send)``, cancelled if the client disconnects."""

    def __init__(self, handler: Handler) -> None:
        # Not Response.__init__: the handler writes its own status and headers, and
        # building an unused header list costs more than the rest of a small request.
        self.status_code = 200
        self.background = None
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if sniffio.current_async_library() == "asyncio":
            # The watcher as a bare asyncio task, cancelled by ``Task.cancel()`` at the end:
            # a task group's cancellation costs more than a small request itself.
            import asyncio

            with anyio.CancelScope() as handler_scope:
                watcher = asyncio.ensure_future(_watch(receive, handler_scope))
                try:
                    await self._handler(send)
                finally:
                    watcher.cancel()
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch, receive, tg.cancel_scope)
            try:
                await self._handler(send)
            finally:
                tg.cancel_scope.cancel()


async def _watch(receive: Receive, scope: anyio.CancelScope) -> None:
    # The body was read before the handler ran, so the next message is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
