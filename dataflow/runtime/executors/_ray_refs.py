"""Waiting on Ray from the engine's loop, and values that stay in Ray between nodes.

- :class:`RayRef`: what a ray-placed node hands on when every consumer of it is also
  ray-placed: the ``ObjectRef`` of its output, not the value. The next node passes the
  ref to its actor as a top-level argument, so Ray resolves it there; the engine never
  fetches (or deserialises) the value. Values come back only where a node outside Ray,
  or the caller, needs them.
- :func:`value_of` / :func:`ready`: await a ref on asyncio or trio. On trio Ray's own
  completion callback wakes the task: no thread of ours blocks on a ref, so none can
  outlive the engine.
- :class:`RayStream`: a streaming generator's outputs, stepped on either loop without
  threads, and closed for certain: :meth:`RayStream.close` cancels the task and deletes
  the stream in Ray at once (not when the garbage collector gets to it), which releases
  a generator paused by backpressure so that it sees its stop flag.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import ray

from .._backend import ThreadCall

if TYPE_CHECKING:
    from .._backend import Backend

__all__ = ["END", "RayRef", "RayStream", "arg", "cancel", "has_refs", "ready", "value_of"]

END = object()  # the end of a stream


class RayRef:
    """The output of a ray-placed node, left in Ray's object store.

    Only ray-placed consumers ever receive one (the scheduler says when every consumer
    of a node is ray-placed); they pass :attr:`ref` on to their actor.
    """

    __slots__ = ("node", "ref", "settled", "status")

    def __init__(self, ref: Any, node: str, status: Any = None) -> None:
        self.ref = ref
        self.node = node  # who produced it, for messages
        # Handed on before its call ended: the call's status ref (its body's exception,
        # if it raised) and when the producer saw it succeed (perf_counter; 0: not yet).
        self.status = status
        self.settled = 0.0

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


async def value_of(backend: Backend, ref: Any) -> Any:
    """The value of ``ref``. A caller that stops waiting cancels the task in Ray."""
    try:
        if backend.name == "asyncio":
            return await ref
        future = ref.future()
        call = ThreadCall(future.result, ())
        # The done callback runs in a Ray thread and hands the outcome to the loop.
        return await backend.call_in_thread(
            lambda c: future.add_done_callback(lambda _: c.run()), call
        )
    except Exception:
        raise
    except BaseException:
        cancel(ref)
        raise


async def ready(backend: Backend, *refs: Any) -> None:
    """Wait until one of ``refs`` exists, without fetching or deserialising it."""
    if backend.name == "asyncio" and len(refs) == 1:
        await refs[0]._ready()
        return
    call = ThreadCall(_none, ())
    stop_waiting: list[Any] = []
    calls = itertools.count()

    def wake(_exc: Any) -> None:
        # Ray's callbacks run in its threads: the first one wakes the task (next() on a
        # count is atomic under the GIL).
        if next(calls) == 0:
            call.run()

    def submit(c: ThreadCall) -> None:
        for ref in refs:
            stop_waiting.append(ref._on_ready(wake))

    try:
        await backend.call_in_thread(submit, call)
    finally:
        for fn in stop_waiting:
            fn()


def _none() -> None:
    return None


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
