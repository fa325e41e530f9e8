"""Compiled ray-placed nodes (``options={"compiled": True}``): a Ray Compiled Graph each.

A compiled node's actor is driven through a Ray Compiled Graph (``ray.dag``,
``experimental_compile``): the engine writes each input into the graph's channel and a
reader thread owned by the replica takes the results in order, handing each to the
waiting task by callback. That skips Ray's per-call task submission, the bulk of a
small item's cost per hop.

What it gives up, checked at plan time (``ray_options``): one replica, no batching, no
generators, no shard or merge. A Compiled Graph execution cannot be cancelled: a request
that ends stops waiting, and its result is dropped when it comes. Values going in or
out of a compiled node pass through the engine (a compiled graph's outputs cannot be
handed to another graph, nor to an actor call).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import anyio
import anyio.to_thread
import ray
import ray.exceptions

from .._backend import ThreadCall
from ._ray_refs import RayRef, value_of
from ._ray_replica import RayReplica

__all__ = ["CompiledRayReplica"]

_JOIN_S = 10.0  # the most stop() waits for the reader thread once the graph is torn down


def _none() -> None:
    return None


class CompiledRayReplica(RayReplica):
    """A :class:`RayReplica` whose actor runs inside a one-actor Compiled Graph."""

    compiled = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dag: Any = None
        self._jobs: queue.SimpleQueue[tuple[Any, ThreadCall] | None] | None = None
        self._reader: threading.Thread | None = None
        self._room: anyio.Semaphore | None = None

    async def _spawn(self) -> None:
        await super()._spawn()
        from ray.dag import InputNode

        with InputNode() as inp:
            out = self._actor.call.bind(inp[0], inp[1])
        window = self.options.max_in_flight
        self._dag = out.experimental_compile(_max_inflight_executions=window)
        # Executions in flight, abandoned ones included: execute() must never block.
        self._room = anyio.Semaphore(window)
        jobs: queue.SimpleQueue[tuple[Any, ThreadCall] | None] = queue.SimpleQueue()
        self._jobs = jobs
        self._reader = threading.Thread(
            target=_read, args=(jobs,), name=f"dataflow:{self.node.name}:ray-dag", daemon=True
        )
        self._reader.start()

    def _drop_actor(self) -> None:
        self._release_dag()
        super()._drop_actor()

    def _release_dag(self) -> threading.Thread | None:
        """Tear the graph down (pending reads fail at once) and stop the reader."""
        dag, self._dag = self._dag, None
        jobs, self._jobs = self._jobs, None
        reader, self._reader = self._reader, None
        if dag is not None:
            try:
                dag.teardown()
            except Exception:  # its actor is gone already
                pass
        if jobs is not None:
            jobs.put(None)
        return reader

    async def stop(self) -> None:
        """Tear the graph down, then ``teardown()`` in the actor and kill it."""
        reader = self._release_dag()
        if reader is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(reader.join, _JOIN_S)
        await super().stop()

    async def call(self, value: Any, kw: dict[str, Any]) -> Any:
        """The body's result for one input, through the Compiled Graph."""
        if type(value) is RayRef:  # from a non-compiled Ray node: a graph takes values
            value = await value_of(self.backend, value.ref)
        _, generation = await self._live()
        room = self._room
        assert room is not None
        await room.acquire()
        # Taken after the wait, with no await until the job is queued: a graph let go
        # of meanwhile fails this call (below) rather than leaving it unread.
        dag, jobs = self._dag, self._jobs
        if dag is None or jobs is None:
            room.release()
            raise self._died(generation, RuntimeError("the actor's Compiled Graph was torn down"))
        call = ThreadCall(_none, ())
        call.on_done = room.release  # on the loop, once the result is read
        try:
            ref = dag.execute(kw, value)
        except BaseException:
            room.release()
            raise
        try:
            return await self.backend.call_in_thread(lambda c: jobs.put((ref, c)), call)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc, ray.exceptions.RayActorError):
                raise self._died(generation, exc) from exc
            from ._ray_actor import unwrap

            raise unwrap(exc) from None
        except (ray.exceptions.RayActorError, ray.exceptions.RayChannelError) as exc:
            raise self._died(generation, exc) from exc


def _read(jobs: queue.SimpleQueue[tuple[Any, ThreadCall] | None]) -> None:
    """The reader thread: results in the order the inputs went in (as the graph gives
    them), each handed to its waiter; ends when the replica lets go of the graph."""
    while (job := jobs.get()) is not None:
        ref, call = job
        try:
            call.result = ray.get(ref)
        except BaseException as exc:  # delivered to the waiting task, re-raised there
            call.error = exc
        waker = call.waker
        if waker is not None:
            waker()
