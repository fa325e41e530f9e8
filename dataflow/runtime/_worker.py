"""Node workers: take items from a node's input channel, run the body, emit outputs.

One :class:`NodeRunner` per node owns the node's replicas (instances, threads) and
starts one worker coroutine per replica. Workers take every ready item at once and only
suspend when the input is empty or an output is full, so a hop costs a few attribute
lookups rather than a trip through the event loop.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import NodeError
from ..graph import Node
from ._borrow import borrow
from ._channel import BrokenChannel, Channel
from ._coalesce import group_limit, run_coalesced
from ._generators import run_generator
from ._hops import Output, advance, deliver, deliver_nowait
from ._ordering import OrderedOutputs, _Slot
from ._request import FAILED, PENDING, SUCCEEDED, Item, Request, Tag, node_error
from .executors import Handed, LoopReplica, Replica, UpstreamFailed, make_replica

if TYPE_CHECKING:
    from ._backend import Backend
    from ._trace import Tracer

__all__ = ["NodeRunner", "NodeStats", "Output", "advance", "deliver", "deliver_nowait"]

# The hop functions live in ``_hops``; re-exported for the engine and the scheduler.


_TAKE = 64  # most items one worker takes from its input at once
_FAIR = 256  # items processed without suspending before yielding to the loop


class NodeStats:
    """Per-node counters (times in seconds)."""

    __slots__ = (
        "batch_sizes",
        "batch_wait",
        "busy_s",
        "cancelled",
        "failed",
        "items_in",
        "items_out",
        "service",
        "started",
    )

    def __init__(self, replicas: int) -> None:
        self.items_in = 0
        self.items_out = 0
        self.failed = 0
        self.cancelled = 0  # items dropped because their request had already ended
        self.busy_s = [0.0] * replicas
        self.service: deque[float] = deque(maxlen=2048)
        self.started = time.perf_counter()
        self.batch_sizes: Counter[int] = Counter()
        self.batch_wait: deque[float] = deque(maxlen=2048)


def _unset(value: Any) -> Any:
    raise RuntimeError("inline body used before the node started")


class _Gather:
    """A merge's pending parts for one request: tag prefix -> (expected, parts)."""

    __slots__ = ("groups",)

    def __init__(self) -> None:
        self.groups: dict[Tag, tuple[int, dict[int, Any]]] = {}


class NodeRunner(OrderedOutputs):
    """Executes one node of a running graph."""

    def __init__(
        self,
        node: Node,
        placement: str,
        backend: Backend,
        inbox: Channel[Item],
        outputs: list[Output],
        *,
        fan_in: int,
        intra_op_threads: int | None,
    ) -> None:
        self.node = node
        self.name = node.name
        self.placement = placement
        self.backend = backend
        self.inbox = inbox
        self.outputs = outputs
        self.fan_in = fan_in
        self.intra_op_threads = intra_op_threads
        self.replicas = node.replicas
        self.stats = NodeStats(self.replicas)
        self.replica_objs: list[Replica] = []
        self.parked = False  # the single worker waits on an empty input (see advance)
        self.inline_sync = False  # producers may call the body directly (advance)
        self._borrowed = False  # a caller is running this node's items (borrow)
        self._borrow_waiters: deque[Any] = deque()
        self._inline_fn: Callable[[Any], Any] = _unset
        self._params = node.info.params
        self._all_params = node.info.accepts_any_param
        self._gather: dict[int, _Gather] = {}
        self._running = self.replicas  # workers still running; the last closes the outputs
        # Reordering across replicas (ordered=True, replicas > 1).
        self._ordered = node.ordered and self.replicas > 1 and node.kind != "merge"
        self._seq = 0
        self._head = 0
        self._slots: dict[int, _Slot] = {}
        self._tails: dict[int, _Slot] = {}
        self._open = 0
        self._flushing = False
        self._window = max(2 * self.replicas, 4)
        self._window_waiters: deque[Any] = deque()
        self._lanes = list(range(self.replicas))  # worker -> the replica it feeds
        # Set by the engine when tracing or hop logging is on; None keeps the fast path.
        self.tracer: Tracer | None = None
        # Run each item under a cancel scope its request owns (any body that can await).
        self._scoped = True
        # The engine's task group: a generator at the exit whose stream's reader is slow
        # goes on in a task of its own there, so this node's workers move on.
        self.tg: Any = None
        self.detached = 0  # generators going on in their own task now
        self._interruptible = False  # a replica cancels calls where they run (Ray)
        self.ray_hints: dict[str, Any] = {}  # set by the scheduler for Ray nodes (plan_ray)
        self._coalesce = False  # items share calls (see _coalesce)

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Create the replicas and build each one's body where it runs.

        Raises:
            NodeError: a constructor or ``setup()`` raised (``request_id`` None).
        """
        for index in range(self.replicas):
            replica = make_replica(
                self.node,
                self.placement,
                index,
                self.backend,
                intra_op_threads=self.intra_op_threads,
            )
            if self.ray_hints:
                from .executors._ray import configure

                replica = configure(replica, self.ray_hints)
            self.replica_objs.append(replica)
            try:
                await replica.start()
            except Exception as exc:
                err = NodeError(self.name, None, exc)
                err.__cause__ = exc
                raise err from exc
        self._interruptible = any(r.interruptible for r in self.replica_objs)
        # (A replica that cancels calls where they run — Ray — owns a scope per call
        # instead: see _call_interruptible.)
        self._scoped = (
            not (
                self.node.info.mode == "function"
                and self.node.kind != "shard"
                and all(isinstance(r, LoopReplica) for r in self.replica_objs)
            )
            and not self._interruptible
        )
        # A replica that keeps several items in flight (a Ray actor) gets a worker per item.
        self._lanes = [i for i, r in enumerate(self.replica_objs) for _ in range(r.in_flight)]
        if len(self._lanes) > self.replicas:
            self._running = len(self._lanes)
            self._ordered = self.node.ordered and self.node.kind != "merge"
            self._window = max(2 * len(self._lanes), 4)
        # Items queued here may share calls (see _coalesce).
        self._coalesce = self.replica_objs[0].coalesce > 1

    async def stop(self, grace: float = float("inf")) -> bool:
        """Tear down every replica (``teardown()``, threads joined); never raises.
        False if a body was still running ``grace`` seconds on (see ``Engine(grace=)``)."""
        clean = True
        with anyio.CancelScope(shield=True):
            for replica in reversed(self.replica_objs):
                replica.grace = grace
                await replica.stop()
                clean = clean and not replica.stuck
        return clean

    def worker_count(self) -> int:
        return len(self._lanes)

    @property
    def simple(self) -> bool:
        """A sync function on the loop with one output and nothing per request to look
        at (parameters, timeout, batching, order, tracing): the fast path applies."""
        node = self.node
        return (
            node.kind not in ("merge", "shard")
            and node.info.mode == "function"
            and all(isinstance(r, LoopReplica) for r in self.replica_objs)
            and not self._params
            and not self._all_params
            and node.timeout is None
            and node.batch is None
            and not self._ordered
            and len(self.outputs) == 1
            and "generation" not in node.options
            and self.tracer is None
        )

    def enable_inline(self) -> None:
        """Let producers run this node in their own task while it is idle: a
        single-replica simple node synchronously (see :func:`advance`), any other
        single-lane node by a caller borrowing it (see :meth:`borrow`). One lane only,
        so order is kept."""
        if len(self._lanes) != 1:
            return
        if self.simple:
            self.inbox.consumer = self
            replica = self.replica_objs[0]
            assert isinstance(replica, LoopReplica)
            self._inline_fn = replica.direct()
            self.inline_sync = True
        elif (
            self.node.kind != "merge"
            and self.node.batch is None
            and "generation" not in self.node.options
            and self.tracer is None
            and not self._ordered
        ):
            self.inbox.consumer = self

    def can_borrow(self) -> bool:
        """Whether a caller may run this node's next item itself right now: its only
        worker waits on an empty input, nobody else is borrowing it, and its replica is
        not still busy with a call abandoned by an earlier request."""
        return (
            not self.inline_sync
            and self.parked
            and not self._borrowed
            and not len(self.inbox)
            and not getattr(self.replica_objs[0], "busy", False)
        )

    async def borrow(self, it: Item) -> None:
        """Process ``it`` in the caller's task, as the worker would (see ``_borrow``)."""
        await borrow(self, it)

    def inline(self, items: list[Item]) -> list[Item]:
        """Process ``items`` now, in the caller's task (this node's worker is parked
        on an empty input, so nothing it holds can be overtaken)."""
        start = time.perf_counter()
        done = self._apply(self._inline_fn, items)
        elapsed = time.perf_counter() - start
        self.stats.busy_s[0] += elapsed
        self.stats.service.append(elapsed / len(items))
        return done

    def _apply(self, fn: Callable[[Any], Any], items: list[Item]) -> list[Item]:
        """Run a simple body on each live item; failures end only their request."""
        stats = self.stats
        done: list[Item] = []
        for it in items:
            req = it.req
            if req.state != PENDING:
                stats.cancelled += 1
                continue
            try:
                it.value = fn(it.value)
            except Exception as exc:
                stats.failed += 1
                req.fail(node_error(self.name, req, exc))
                continue
            done.append(it)
        stats.items_in += len(items)
        stats.items_out += len(done)
        return done

    async def run_worker(self, worker: int) -> None:
        """One replica's loop until the input ends; the last one out closes the outputs."""
        index = self._lanes[worker]
        if worker == 0:
            # Busy fractions count from here, not from before setup() (loading weights).
            self.stats.started = time.perf_counter()
        try:
            node = self.node
            if self.simple:
                await self._run_simple(index)
            elif "generation" in node.options:
                from ._generation import run_generation_worker

                await run_generation_worker(self, index)
            elif node.batch is not None:
                from ._batching import run_batching_worker

                await run_batching_worker(self, index)
            else:
                await self._run_general(index)
        except BrokenChannel:
            pass  # the engine is cancelling: its channels were closed under us
        finally:
            self._running -= 1
            if self._running == 0:
                for out, _ in self.outputs:
                    if isinstance(out, Channel):
                        out.close_sender()

    # -- the fast path: a sync function on the loop, one output ----------------------
    async def _run_simple(self, index: int) -> None:
        inbox = self.inbox
        out, port = self.outputs[0]
        replica = self.replica_objs[index]
        assert isinstance(replica, LoopReplica)
        fn = replica.direct()
        apply = self._apply
        perf = time.perf_counter
        # Busy time is taken between suspensions, not per item: two clock reads per
        # wake-up instead of two per batch keeps the hop cheap.
        awake = perf()
        handled = 0
        since_park = 0
        while True:
            items = inbox.take(_TAKE)
            if not items:
                self._account(index, awake, handled)
                if not await self._wait_input():
                    return
                awake, handled, since_park = perf(), 0, 0
                continue
            done = apply(fn, items)
            n = len(items)
            handled += n
            since_park += n
            if done:
                inlined = perf()
                rest, dest, dport = advance(done, out, port)
                if dest is not out:
                    # Time spent running downstream nodes inline is theirs, not ours.
                    awake += perf() - inlined
                if rest and not deliver_nowait(rest, dest, dport):
                    self._account(index, awake, handled)
                    await deliver(rest, dest)
                    awake, handled, since_park = perf(), 0, 0
            if since_park >= _FAIR:
                # Other tasks run during the checkpoint: that time is not this node's.
                self._account(index, awake, handled)
                await anyio.lowlevel.checkpoint()
                awake, handled, since_park = perf(), 0, 0

    async def _wait_input(self) -> bool:
        """Wait for input, marked idle meanwhile (producers may then run this node's
        work themselves, see :func:`advance` and :meth:`borrow`); False at the end."""
        self.parked = True
        try:
            return await self.inbox.wait_readable()
        finally:
            self.parked = False

    def _account(self, index: int, awake: float, handled: int) -> None:
        elapsed = time.perf_counter() - awake
        self.stats.busy_s[index] += elapsed
        if handled:
            self.stats.service.append(elapsed / handled)

    # -- everything else ---------------------------------------------------------------
    async def _run_general(self, index: int) -> None:
        inbox = self.inbox
        since_park = 0
        while True:
            if self._ordered:
                while self._open >= self._window:
                    await self.backend.park(self._window_waiters)
            while self._borrowed:
                await self.backend.park(self._borrow_waiters)
            if self._ordered or len(self._lanes) > 1:
                # Each lane one item, or as many as one call of its replica may carry.
                take = group_limit(self, self.replica_objs[index].coalesce)
            else:
                take = _TAKE
            items = inbox.take(take)
            if not items:
                if not await self._wait_input():
                    return
                since_park = 0
                continue
            if self._coalesce:
                await run_coalesced(self, index, items)
            else:
                for it in items:
                    self.stats.items_in += 1
                    if self._ordered:
                        slot = self._open_slot(it.req)
                        try:
                            await self._process(index, it, slot)
                        finally:
                            await self._close_slot(it.req, slot)
                    else:
                        await self._process(index, it, None)
            since_park += len(items)
            if since_park >= _FAIR:
                since_park = 0
                await anyio.lowlevel.checkpoint()

    async def _process(
        self, index: int, it: Item, collect: _Slot | None, *, scoped: bool = False
    ) -> None:
        """Run the body on one item and emit (or collect) what it produces, under a
        cancel scope the request owns: its end interrupts the body at its next await."""
        req = it.req
        if req.state != PENDING:
            self.stats.cancelled += 1
            return
        if not (scoped or self._scoped):
            await self._process_item(index, it, collect)
            return
        with anyio.CancelScope() as scope:
            # A success ends the request from inside this scope (the sink): nothing to
            # interrupt then, and cancelling would cost a loop trip.
            handle = req.own(lambda: scope.cancel() if req.state != SUCCEEDED else None)
            try:
                await self._process_item(index, it, collect)
            finally:
                req.disown(handle)
        if scope.cancelled_caught:
            self.stats.cancelled += 1  # its request ended while the body ran

    async def _process_item(self, index: int, it: Item, collect: _Slot | None) -> None:
        req = it.req
        if self.tracer is not None:
            self.tracer.take(self, index, it)
        node = self.node
        kw = self._kwargs(req)
        try:
            if node.kind == "merge":
                await self._merge(index, it, kw, collect)
            elif node.kind == "shard":
                parts = await self._call(index, it.value, kw, req)
                parts = list(parts)
                if not parts:
                    raise ValueError("shard produced no parts")
                k = len(parts)
                req.outstanding += k
                for i, part in enumerate(parts):
                    await self._emit(Item(req, part, (*it.tag, (i, k))), collect)
                req.release(1)
            elif node.info.mode in ("generator", "async_generator"):
                await run_generator(self, index, it, kw, collect)
            else:
                out = await self._call(index, it.value, kw, req)
                if isinstance(out, Handed):  # settled later, by whoever learns its end
                    self.adopt(index, req, out)
                    out = out.value
                it.value = out
                await self._emit(it, collect)
        except UpstreamFailed:
            self.stats.cancelled += 1  # the node that computed its input fails the request
        except Exception as exc:
            self.stats.failed += 1
            req.fail(node_error(self.name, req, exc))

    def adopt(self, index: int, req: Request, call: Handed) -> None:
        """``req`` owns ``call``, submitted now: its outcome comes to :meth:`_handed`."""
        submitted = time.perf_counter()
        call.adopt(req, lambda outcome, at: self._handed(index, req, submitted, outcome, at))

    def _handed(
        self,
        index: int,
        req: Request,
        submitted: float,
        outcome: float | BaseException | None,
        at: float,
    ) -> None:
        """How a call whose output went on at once ended (see :class:`Handed`)."""
        if outcome is None:
            self.stats.cancelled += 1  # it did not run for its request
        elif isinstance(outcome, BaseException):
            self.stats.failed += 1
            req.fail(node_error(self.name, req, outcome))
        else:  # the body's seconds, measured where it ran
            self.stats.busy_s[index] += outcome
            self.stats.service.append(outcome)
            if self.tracer is not None:
                self.tracer.compute(self, index, (req,), max(submitted, at - outcome), at)

    def _kwargs(self, req: Request) -> dict[str, Any]:
        if self._all_params:
            return req.params
        if not self._params or not req.params:
            return {}
        return {k: v for k, v in req.params.items() if k in self._params}

    async def _call(self, index: int, value: Any, kw: dict[str, Any], req: Request) -> Any:
        replica = self.replica_objs[index]
        timeout = self.node.timeout
        start = time.perf_counter()
        out: Any = None
        try:
            if replica.hand_on:  # only submits: nothing to interrupt or time here
                out = await replica.call(value, kw)
            elif replica.interruptible:
                out = await self._call_interruptible(replica, value, kw, req)
            elif timeout is None:
                out = await replica.call(value, kw)
            else:
                with anyio.fail_after(timeout):
                    out = await replica.call(value, kw)
            return out
        finally:
            if not isinstance(out, Handed):  # a handed-on one is timed where it ran
                self._computed(index, req, start)

    async def _call_interruptible(
        self, replica: Replica, value: Any, kw: dict[str, Any], req: Request
    ) -> Any:
        """A call that stops waiting when its request ends, so that the replica cancels
        it where it runs (a Ray actor drops it if it has not begun); returns None then,
        a result nobody receives, like any result of an ended request."""
        _, out = await self._until_end(req, self.node.timeout, lambda: replica.call(value, kw))
        return out

    @staticmethod
    async def _until_end(
        req: Request, timeout: float | None, fn: Callable[[], Awaitable[Any]]
    ) -> tuple[bool, Any]:
        """``(True, await fn())``, or ``(False, None)`` if ``req`` ended first (the wait
        is cancelled, and with it the call where it runs); TimeoutError after
        ``timeout`` seconds (None: no limit)."""
        with anyio.CancelScope() as scope:
            handle = req.own(scope.cancel)
            try:
                if timeout is None:  # (a scope less: this wraps every Ray call)
                    return True, await fn()
                with anyio.fail_after(timeout):
                    return True, await fn()
            finally:
                req.disown(handle)
        return False, None

    def _computed(self, index: int, req: Request, start: float) -> None:
        # Busy is the body's time only: a replica blocked handing its output to a full
        # edge is waiting, not working, or every node upstream of the bottleneck would
        # look as busy as the bottleneck itself.
        end = time.perf_counter()
        self.stats.busy_s[index] += end - start
        self.stats.service.append(end - start)
        if self.tracer is not None:
            self.tracer.compute(self, index, (req,), start, end)

    async def _merge(self, index: int, it: Item, kw: dict[str, Any], collect: _Slot | None) -> None:
        req = it.req
        if self.fan_in > 1:
            prefix, expected, slot = it.tag, self.fan_in, it.port
        else:
            prefix = it.tag[:-1]
            slot, expected = it.tag[-1]
        gather = self._gather.get(req.id)
        if gather is None:
            gather = self._gather[req.id] = _Gather()
            req.add_cleanup(lambda: self._drop_gather(req.id))
        entry = gather.groups.get(prefix)
        if entry is None:
            entry = gather.groups[prefix] = (expected, {})
        parts = entry[1]
        parts[slot] = it.value
        if len(parts) < expected:
            return
        del gather.groups[prefix]
        ordered = [parts[i] for i in range(expected)]
        value = await self._call(index, ordered, kw, req)
        req.outstanding += 1
        await self._emit(Item(req, value, prefix), collect)
        req.release(expected)

    async def _emit(self, it: Item, collect: _Slot | None) -> None:
        if collect is None or collect.live:
            await self.emit(it)
            return
        collect.outs.append(it)  # an earlier input's outputs are still to go out
        # Bounded: a later input holds at most its stream's buffer of outputs, then waits
        # until its request's earlier input is out (the request's end interrupts the
        # wait: owned scope).
        req = it.req
        while not collect.live and len(collect.outs) > req.buffer_limit:
            if req.state != PENDING:
                return
            await self.backend.park(collect.waiters)

    async def emit(self, it: Item) -> None:
        """Send ``it`` to every output (a copy per extra output: fan-out)."""
        tracer = self.tracer
        if tracer is None:
            await self._send(it)
            return
        start = time.perf_counter()
        await self._send(it)
        tracer.emitted(self, it, start, time.perf_counter())

    async def _send(self, it: Item) -> None:
        outputs = self.outputs
        if it.req.state != PENDING:
            self.stats.cancelled += 1  # its request ended while the body ran
            return
        self.stats.items_out += 1
        if len(outputs) == 1:
            out, port = outputs[0]
            it.port = port
            if not out.put_nowait(it):
                await out.send(it)
            return
        it.req.outstanding += len(outputs) - 1
        for i, (out, port) in enumerate(outputs):
            copy = it if i == 0 else Item(it.req, it.value, it.tag)
            copy.port = port
            if not out.put_nowait(copy):
                await out.send(copy)

    def _drop_gather(self, rid: int) -> None:
        self._gather.pop(rid, None)

    # -- figures --------------------------------------------------------------------------
    def pending_parts(self) -> int:
        return sum(len(p) for g in self._gather.values() for _, p in g.groups.values())

    def fail_pending(self, req: Request, exc: BaseException) -> None:
        if req.state == PENDING:
            self.stats.failed += 1
            req.finish(FAILED, node_error(self.name, req, exc))
