"""Waiting on Ray from the engine's loop, and values that stay in Ray between nodes.

- :class:`RayRef`: what a ray-placed node hands on when every consumer of it is also
  ray-placed: the ``ObjectRef`` of its output, not the value. The next node passes the
  ref to its actor as a top-level argument, so Ray resolves it there; the engine never
  fetches (or deserialises) the value. Values come back only where a node outside Ray,
  or the caller, needs them.
- :func:`value_of` / :func:`ready`: await a ref on asyncio or trio. Ray's own
  completion callbacks wake the waiting tasks, many per loop wake-up: no thread of ours
  blocks on a ref, so none can outlive the engine.
- :class:`RayStream`: a streaming generator's outputs, stepped on either loop without
  threads, and closed for certain: :meth:`RayStream.close` cancels the task and deletes
  the stream in Ray at once (not when the garbage collector gets to it), which releases
  a generator paused by backpressure so that it sees its stop flag.
"""

from __future__ import annotations

import functools
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions

if TYPE_CHECKING:
    from .._backend import Backend

__all__ = ["END", "RayRef", "RayStream", "arg", "cancel", "has_refs", "ready", "value_of"]

END = object()  # the end of a stream


class RayRef:
    """The output of a ray-placed node, left in Ray's object store.

    Only ray-placed consumers ever receive one (the scheduler says when every consumer
    of a node is ray-placed); they pass :attr:`ref` on to their actor.
    """

    __slots__ = ("calls", "node", "ref")

    def __init__(self, ref: Any, node: str, calls: tuple[Any, ...] = ()) -> None:
        self.ref = ref
        self.node = node  # who produced it, for messages
        # The handed-on calls it depends on that had not been seen to end when it was
        # made, upstream first (see _ray_handed); () for a value already known good.
        self.calls = calls

    def __repr__(self) -> str:
        return f"RayRef(from node {self.node!r})"


def arg(value: Any) -> Any:
    """What to send an actor for ``value``: the ref itself for a :class:`RayRef`."""
    return value.ref if type(value) is RayRef else value


def has_refs(values: list[Any]) -> bool:
    return any(type(v) is RayRef for v in values)


def cancel(ref: Any) -> None:
    """Cancel the Ray task behind ``ref`` (a queued actor call is dropped); quiet if it
    has finished or its actor is gone.

    Not recursive: Ray would also cancel the tasks the body started, so a generator's
    ``finally`` (or a call still running) would see its own Ray calls fail with
    ``TaskCancelledError`` -- the race behind issue 16, where leaving a stream lost the
    cleanup the generator was doing when the cancel arrived."""
    try:
        ray.cancel(ref, recursive=False)
    except Exception:  # already finished, or the actor is gone
        pass


class _Box:
    """One wait on Ray, resolved on the loop by :class:`_Arrivals`."""

    __slots__ = ("done", "result", "waiters")

    def __init__(self) -> None:
        self.done = False
        self.result: Any = None
        self.waiters: deque[Any] = deque()


class _Arrivals:
    """What Ray's callbacks (run in its threads) hand to one loop, a batch per wake-up:
    the first arrival schedules a drain, the ones before it runs join it. A wait per
    item through ``await ref`` costs a loop wake-up (and a future chained to another)
    for each, which at thousands of hops a second is most of the engine's own time."""

    __slots__ = ("_arrived", "_backend", "_scheduled")

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._arrived: deque[tuple[_Box, Any]] = deque()
        self._scheduled = False

    def add(self, box: _Box, result: Any) -> None:
        """In any thread: ``box`` has its ``result``."""
        self._arrived.append((box, result))
        if not self._scheduled:
            self._scheduled = True
            try:
                self._backend.soon(self._drain)
            except RuntimeError:  # the loop is gone: nobody waits any more
                pass

    def _drain(self) -> None:
        # Cleared first: an arrival appended after this sees it and schedules the next.
        self._scheduled = False
        arrived, wake = self._arrived, self._backend.wake
        while arrived:
            box, result = arrived.popleft()
            if not box.done:
                box.done = True
                box.result = result
                wake(box.waiters)


_ARRIVALS: weakref.WeakKeyDictionary[Backend, _Arrivals] = weakref.WeakKeyDictionary()


def _arrivals(backend: Backend) -> _Arrivals:
    found = _ARRIVALS.get(backend)
    if found is None:
        found = _ARRIVALS[backend] = _Arrivals(backend)
    return found


def _arrive(backend: Backend, box: _Box) -> Callable[[Any], None]:
    """The callback to give Ray: it resolves ``box`` on ``backend``'s loop."""
    return functools.partial(_arrivals(backend).add, box)


async def _wait(backend: Backend, box: _Box) -> Any:
    while not box.done:
        await backend.park(box.waiters)
    return box.result


async def value_of(backend: Backend, ref: Any) -> Any:
    """The value of ``ref`` (raising Ray's error if its task failed), on asyncio or
    trio. A caller that stops waiting cancels the task in Ray."""
    box = _Box()
    ref._on_completed(_arrive(backend, box))
    try:
        result = await _wait(backend, box)
    except BaseException:
        cancel(ref)
        raise
    if isinstance(result, ray.exceptions.RayError):
        raise result
    return result


async def ready_or_woken(backend: Backend, ref: Any, waiters: deque[Any]) -> bool:
    """Park on ``waiters`` until woken there or ``ref`` exists (without fetching it);
    True if it exists."""
    box = _Box()
    box.waiters = waiters  # the arrival wakes this task where it parks anyway
    stop_waiting = ref._on_ready(_arrive(backend, box))
    try:
        await backend.park(waiters)
    finally:
        stop_waiting()
    return box.done


async def ready(backend: Backend, *refs: Any) -> None:
    """Wait until one of ``refs`` exists, without fetching or deserialising it."""
    box = _Box()
    arrived = _arrive(backend, box)
    stop_waiting = [ref._on_ready(arrived) for ref in refs]
    try:
        await _wait(backend, box)
    finally:
        for fn in stop_waiting:
            fn()


class RayStream:
    """The outputs of one streaming-generator actor call, as refs."""

    __slots__ = ("_backend", "_gen", "finished")

    def __init__(self, backend: Backend, gen: Any) -> None:
        self._backend = backend
        self._gen: Any = gen  # ray.ObjectRefGenerator; None once closed
        self.finished = False

    async def next_ref(self, *, poll: bool = False) -> Any:
        """The ref of the next output, or :data:`END`. ``poll`` waits through Ray's
        readiness callbacks even on asyncio: after a cancelled ``__anext__``, awaiting
        the generator again can miss the output it was waiting for."""
        gen = self._gen
        assert gen is not None, "stream used after close()"
        if self._backend.name == "asyncio" and not poll:
            try:
                return await gen.__anext__()
            except StopAsyncIteration:
                self.finished = True
                return END
        while True:
            try:
                ref = gen._next_sync(timeout_s=0)
            except StopIteration:
                self.finished = True
                return END
            if not ref.is_nil():
                return ref
            # Nothing yet: wait for the next output, or the task's end, to exist.
            expected, _ = gen.worker.core_worker.peek_object_ref_stream(gen._generator_ref)
            await ready(self._backend, expected, gen.completed())

    async def drain(self, limit: float) -> None:
        """Read (and drop) what the generator still yields until it ends, for at most
        ``limit`` seconds: a generator told to stop then ends at its next yield, one
        paused by backpressure resumes to see its stop, and nothing interrupts the body
        mid-way. :meth:`close` cancels whatever is still running afterwards."""
        import anyio

        with anyio.CancelScope(shield=True), anyio.move_on_after(limit):
            while not self.finished and self._gen is not None:
                await self.next_ref(poll=True)

    def close(self) -> None:
        """Cancel the task (if not finished) and delete the stream in Ray now; a
        generator paused by backpressure resumes and sees its stop flag."""
        gen, self._gen = self._gen, None
        if gen is None:
            return
        if not self.finished:
            cancel(gen)
        try:
            gen.worker.core_worker.async_delete_object_ref_stream(gen._generator_ref)
        except Exception:  # Ray is shutting down
            pass
