"""Compiled Ray chains (``options={"compiled": True}``): Ray Compiled Graphs.

A maximal chain of compiled nodes (each feeding only the next, the next fed only by it,
the followers taking no per-request parameters and no ``timeout``) runs as one Ray
Compiled Graph (``ray.dag``, ``experimental_compile``) over one actor per node. The
chain's first node (its head) owns the graph and every actor of it: the engine writes
each input into the graph's channel and a reader thread owned by the head takes the
results in order, handing each to the waiting task by callback. The other nodes of the
chain (followers) keep their place in the engine (stats, order, tracing) but only hand
the chain's result on; a body's exception travels through the graph as
:class:`~._ray_actor.Raised` and fails the request at the node that raised it.

What it gives up, checked at plan time (``ray_options``): one replica, no batching, no
generators, no shard or merge. A Compiled Graph execution cannot be cancelled: a request
that ends stops waiting, and its result is dropped when it comes. Values going into a
chain are values (a :class:`~._ray_refs.RayRef` from a non-compiled Ray node is fetched
first): a compiled graph takes no ObjectRefs.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import anyio
import anyio.to_thread
import ray
import ray.exceptions

from ...graph import Node, Plan
from .._backend import ThreadCall
from ._base import LoopReplica
from ._ray_actor import Raised, actor_class
from ._ray_handed import Places
from ._ray_options import ray_options
from ._ray_refs import RayRef, value_of
from ._ray_replica import RayReplica, _kill

__all__ = ["ChainFollower", "CompiledRayReplica", "plan_chains"]


def plan_chains(
    plan: Plan, placements: dict[str, str], nodes: dict[str, Node]
) -> dict[str, dict[str, Any]]:
    """Hints for compiled nodes: ``{"chain": followers}`` for each chain's head,
    ``{"fused": True}`` for its followers."""

    def compiled(name: str) -> bool:
        return placements[name] == "ray" and nodes[name].options.get("compiled") is True

    hints: dict[str, dict[str, Any]] = {}
    for name in plan.order:
        if not compiled(name) or name in hints:
            continue
        chain: list[Node] = []
        here = name
        while len(plan.downstream[here]) == 1:
            nxt = plan.downstream[here][0]
            node = nodes[nxt]
            if (
                not compiled(nxt)
                or len(plan.upstream[nxt]) != 1
                or node.info.params
                or node.info.accepts_any_param
                or node.timeout is not None
            ):
                break
            chain.append(node)
            hints[nxt] = {"fused": True}
            here = nxt
        if chain:
            hints[name] = {"chain": chain}
    return hints


class ChainFollower(LoopReplica):
    """A node inside a compiled chain: the chain's head computed its output already.

    It hands on what it gets, and raises a body's exception that belongs to it: a
    function on the loop, so the head's output crosses it inline (no hop of its own)."""

    def __init__(self, node: Node, index: int) -> None:
        super().__init__(node, index, owns_setup=False)

    async def start(self) -> None:
        self.body = self._forward

    async def stop(self) -> None:
        return None

    def _forward(self, value: Any) -> Any:
        if type(value) is Raised and value.node == self.node.name:
            raise value.error
        return value


_JOIN_S = 10.0  # the most stop() waits for the reader thread once the graph is torn down


def _none() -> None:
    return None


class CompiledRayReplica(RayReplica):
    """A :class:`RayReplica` whose actor, and its chain's followers' actors, run
    inside one Compiled Graph."""

    compiled = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chain: list[Node] = []  # the followers (set by the scheduler's hints)
        self._followers: list[Any] = []  # their actors
        self._dag: Any = None
        self._jobs: queue.SimpleQueue[tuple[Any, ThreadCall] | None] | None = None
        self._reader: threading.Thread | None = None
        self._room: Places | None = None

    async def _spawn(self) -> None:
        await super()._spawn()
        from ray.dag import InputNode

        try:
            for node in self.chain:
                self._followers.append(await self._start_follower(node))
        except BaseException:
            self._drop_actor()
            raise
        with InputNode() as inp:
            out = self._actor.chain_call.bind(inp[0], inp[1])
            for actor in self._followers:
                out = actor.chain_call.bind({}, out)
        window = self.options.max_in_flight
        self._dag = out.experimental_compile(_max_inflight_executions=window)
        # Executions in flight, abandoned ones included: execute() must never block.
        self._room = Places(self.backend, window)
        jobs: queue.SimpleQueue[tuple[Any, ThreadCall] | None] = queue.SimpleQueue()
        self._jobs = jobs
        self._reader = threading.Thread(
            target=_read, args=(jobs,), name=f"dataflow:{self.node.name}:ray-dag", daemon=True
        )
        self._reader.start()

    async def _start_follower(self, node: Node) -> Any:
        opts = ray_options(node)
        actor = (
            actor_class(True)
            .options(**opts.actor_options(), max_restarts=0, max_task_retries=0)
            .remote(node, node.threads)
        )
        try:
            with anyio.fail_after(opts.start_timeout):
                await self._value(actor.setup.remote())
        except BaseException:
            _kill(actor)
            raise
        return actor

    def _drop_actor(self) -> None:
        self._release_dag()
        followers, self._followers = self._followers, []
        for actor in followers:
            _kill(actor)
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
        with anyio.CancelScope(shield=True):
            if reader is not None:
                await anyio.to_thread.run_sync(reader.join, _JOIN_S)
            followers, self._followers = self._followers, []
            for actor in followers:
                with anyio.move_on_after(_JOIN_S):
                    try:
                        await self._value(actor.teardown.remote())
                    except Exception:  # a failing teardown must not hide the exit
                        pass
                _kill(actor)
        await super().stop()

    async def call(self, value: Any, kw: dict[str, Any]) -> Any:
        """The body's result for one input, through the Compiled Graph."""
        if type(value) is RayRef:  # from a non-compiled Ray node: a graph takes values
            value = await value_of(self.backend, value.ref)
        _, generation = await self._live()
        room = self._room
        assert room is not None
        await room.take()
        # Taken after the wait, with no await until the job is queued: a graph let go
        # of meanwhile fails this call (below) rather than leaving it unread.
        dag, jobs = self._dag, self._jobs
        if dag is None or jobs is None:
            room.give_back()
            raise self._died(generation, RuntimeError("the actor's Compiled Graph was torn down"))
        call = ThreadCall(_none, ())
        call.on_done = room.give_back  # on the loop, once the result is read
        try:
            ref = dag.execute(kw, value)
        except BaseException:
            room.give_back()
            raise
        try:
            out = await self.backend.call_in_thread(lambda c: jobs.put((ref, c)), call)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc, ray.exceptions.RayActorError):
                raise self._died(generation, exc) from exc
            from ._ray_actor import unwrap

            raise unwrap(exc) from None
        except (ray.exceptions.RayActorError, ray.exceptions.RayChannelError) as exc:
            raise self._died(generation, exc) from exc
        if type(out) is Raised and out.node == self.node.name:
            raise out.error
        return out  # a follower's exception (Raised) goes on to its node


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
