"""The async iterators ``Engine.stream`` and ``Engine.map`` return.

Both are plain classes rather than async generators so that closing them — ``aclose()``,
``async with``, or dropping the last reference after ``break`` — cancels their requests
at once, on any backend, without an async generator finaliser.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from .runtime._request import Request

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["MapStream", "Stream"]


class Stream:
    """The outputs of one request, as an async iterator; closing it cancels the request."""

    def __init__(
        self, engine: Engine, x: Any, timeout: float | None, wait: bool, params: dict[str, Any]
    ) -> None:
        self._engine = engine
        self._args = (x, timeout, wait, params)
        self._req: Request | None = None
        self._closed = False
        self._busy = False  # a task is inside __anext__ (one reader at a time)

    @property
    def request_id(self) -> int | None:
        return None if self._req is None else self._req.id

    @property
    def scheduled_at(self) -> float | None:
        """When a generate node first gave this request a slot (``time.perf_counter()``;
        None before, or in a graph that does not generate): its queue time ends there."""
        req = self._req
        return None if req is None or not req.scheduled_at else req.scheduled_at

    @property
    def ready(self) -> int:
        """How many outputs are already waiting: reading that many will not wait (a
        server coalesces them into one write for a slow client)."""
        req = self._req
        return 0 if req is None or self._closed else len(req.outputs)

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        if self._busy:
            raise RuntimeError(
                "this Stream is already being read by another task: a Stream is one "
                "request with one reader; call engine.stream() once per reader"
            )
        self._busy = True
        try:
            if self._req is None:
                x, timeout, wait, params = self._args
                self._req = await self._engine._submit(x, timeout, wait, params, streaming=True)
            try:
                ok, value = await self._req.next_output()
            except BaseException:
                self._close()
                raise
        finally:
            self._busy = False
        if not ok:
            self._closed = True
            raise StopAsyncIteration
        return value

    def _close(self) -> None:
        self._closed = True
        if self._req is not None:
            self._req.cancel()

    async def aclose(self) -> None:
        """Stop the stream; a request still running is cancelled everywhere."""
        self._close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    def __del__(self) -> None:
        # Leaving ``async for`` with ``break`` drops the last reference here (CPython):
        # cancel the request at once rather than let it run to the end. Only on the loop's
        # own thread, where touching the request is safe.
        req = self._req
        if req is not None and not req.done and threading.get_ident() == self._engine._loop_thread:
            req.cancel()


class MapStream:
    """Results of ``Engine.map`` as an async iterator; closing it cancels what is left."""

    def __init__(
        self,
        engine: Engine,
        inputs: Iterable[Any] | AsyncIterable[Any],
        ordered: bool,
        window: int,
        timeout: float | None,
        return_exceptions: bool,
        params: dict[str, Any],
    ) -> None:
        self._engine = engine
        self._sync: Iterator[Any] | None = None
        self._async: AsyncIterator[Any] | None = None
        if isinstance(inputs, AsyncIterable):
            self._async = aiter(inputs)
        elif isinstance(inputs, Iterable):
            self._sync = iter(inputs)
        else:
            raise TypeError(f"map needs an iterable or async iterable, got {type(inputs).__name__}")
        self._ordered = ordered
        self._window = window
        self._timeout = timeout
        self._return_exceptions = return_exceptions
        self._params = params
        # In flight: in input order when ordered, else by id (O(1) removal).
        self._pending: deque[Request] = deque()
        self._unordered: dict[int, Request] = {}
        self._finished: deque[Request] = deque()
        self._waiters: deque[Any] = deque()  # the consumer, waiting for a result
        self._room: deque[Any] = deque()  # the async feeder, waiting for window room
        self._exhausted = False
        self._closed = False
        self._since_checkpoint = 0
        self._feeding = False
        self._feeder: anyio.CancelScope | None = None
        self._error: BaseException | None = None

    def __aiter__(self) -> MapStream:
        return self

    async def _next_input(self) -> tuple[bool, Any]:
        if self._sync is not None:
            try:
                return True, next(self._sync)
            except StopIteration:
                return False, None
        assert self._async is not None
        try:
            return True, await anext(self._async)
        except StopAsyncIteration:
            return False, None

    def _in_flight(self) -> int:
        return len(self._pending) if self._ordered else len(self._unordered)

    def _add(self, req: Request) -> None:
        if self._ordered:
            self._pending.append(req)
        elif not req.done:
            self._unordered[req.id] = req
        # (an unordered request that already ended is in ``_finished``)

    def _ready(self) -> Request | None:
        if self._ordered:
            if self._pending and self._pending[0].done:
                return self._pending.popleft()
            return None
        if self._finished:
            return self._finished.popleft()
        return None

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        if self._async is not None:
            return await self._anext_async()
        return await self._anext_sync()

    async def _anext_async(self) -> Any:
        """An async source is pulled by a feeder task of its own, so a finished result
        is yielded at once, even while the source waits (for that very result)."""
        engine = self._engine
        backend = engine._backend
        assert backend is not None
        try:
            if not self._feeding:
                self._feeding = True
                assert engine._tg is not None
                engine._tg.start_soon(self._feed)
            while True:
                req = self._ready()
                if req is not None:
                    if self._room:
                        backend.wake(self._room)
                    return self._result(req)
                if self._error is not None:
                    raise self._error
                if self._exhausted and not self._in_flight() and not self._finished:
                    self._closed = True
                    raise StopAsyncIteration
                await backend.park(self._waiters)
        except BaseException as exc:
            if not isinstance(exc, StopAsyncIteration):
                self._cancel_pending()
            raise

    async def _feed(self) -> None:
        engine = self._engine
        backend = engine._backend
        assert backend is not None
        submitted = 0
        try:
            with anyio.CancelScope() as scope:
                self._feeder = scope
                engine._feeders.add(scope)  # leaving the engine stops the feeding
                while not self._closed:
                    while self._in_flight() + len(self._finished) >= self._window:
                        await backend.park(self._room)
                    more, x = await self._next_input()
                    if not more or self._closed:
                        break
                    req = await engine._submit(
                        x, self._timeout, True, self._params, False, self._on_done
                    )
                    if self._closed:
                        req.cancel()
                        break
                    self._add(req)
                    if self._waiters:
                        backend.wake(self._waiters)
                    submitted += 1
                    if submitted % 64 == 0:
                        # A source and graph that never suspend: stay fair to the loop.
                        await anyio.lowlevel.checkpoint()
        except Exception as exc:
            self._error = exc
        finally:
            if self._feeder is not None:
                engine._feeders.discard(self._feeder)
            self._exhausted = True
            if self._waiters:
                backend.wake(self._waiters)
            aclose = getattr(self._async, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        await aclose()
                    except Exception as exc:
                        self._error = self._error or exc

    async def _anext_sync(self) -> Any:
        engine = self._engine
        try:
            while True:
                req = self._ready()
                if req is not None:
                    return self._result(req)
                room = self._window - self._in_flight() - len(self._finished)
                if not self._exhausted and room > 0:
                    if engine.max_in_flight is None or (
                        engine._admitted < engine.max_in_flight and not engine._admission
                    ):
                        await self._submit_ready(room)
                        continue
                    more, x = await self._next_input()
                    if not more:
                        self._exhausted = True
                        continue
                    req = await engine._submit(
                        x, self._timeout, True, self._params, False, self._on_done
                    )
                    self._add(req)
                    continue
                if not self._in_flight() and not self._finished:
                    self._closed = True
                    raise StopAsyncIteration
                assert engine._backend is not None
                await engine._backend.park(self._waiters)
        except BaseException as exc:
            if not isinstance(exc, StopAsyncIteration):
                self._cancel_pending()
            raise

    async def _submit_ready(self, room: int) -> None:
        """Pull up to ``room`` inputs from a sync iterable and submit them together, so
        idle stages process them as one batch instead of one hop each."""
        assert self._sync is not None
        xs = list(itertools.islice(self._sync, room))
        if len(xs) < room:
            self._exhausted = True
        while xs:
            engine = self._engine
            reqs, rest, dest = engine._submit_many(xs, self._timeout, self._params, self._on_done)
            for req in reqs:
                self._add(req)
            xs = xs[len(reqs) :]
            if rest:
                await engine._enter_slowly(rest, dest, reqs[0].deadline)
            if xs:  # admission is full: wait for room like a single submission
                req = await self._engine._submit(
                    xs.pop(0), self._timeout, True, self._params, False, self._on_done
                )
                self._add(req)
        self._since_checkpoint += room
        if self._since_checkpoint >= 256:
            # A graph that runs entirely inline never suspends: stay fair to the loop.
            self._since_checkpoint = 0
            await anyio.lowlevel.checkpoint()

    def _on_done(self, req: Request) -> None:
        if not self._ordered:
            self._unordered.pop(req.id, None)
            self._finished.append(req)
        elif not self._pending or self._pending[0] is not req:
            return  # in order: only the head can be yielded next
        if self._waiters:
            backend = self._engine._backend
            assert backend is not None
            backend.wake(self._waiters)

    def _result(self, req: Request) -> Any:
        try:
            return self._engine._outcome(req)
        except Exception as exc:
            if self._return_exceptions:
                return exc
            raise

    def _cancel_pending(self) -> None:
        self._closed = True
        if self._feeder is not None:
            self._feeder.cancel()
        for req in [*self._pending, *self._unordered.values()]:
            req.cancel()
        self._pending.clear()
        self._unordered.clear()
        self._finished.clear()

    async def aclose(self) -> None:
        """Stop; requests of this map still running are cancelled."""
        self._cancel_pending()

    async def __aenter__(self) -> MapStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cancel_pending()

    def __del__(self) -> None:
        if (self._pending or self._unordered) and threading.get_ident() == (
            self._engine._loop_thread
        ):
            for req in [*self._pending, *self._unordered.values()]:
                req.cancel()
