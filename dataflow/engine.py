"""The engine: runs a graph inside your event loop.

``async with Engine(graph) as engine`` starts every node (threads, ``setup()``) and
stops them all on exit; inside, ``run`` answers one input, ``stream`` yields a
request's outputs as they come, and ``map`` runs many inputs with bounded memory.
"""

from __future__ import annotations

import enum
import math
import threading
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel

from ._errors import DataflowError, EngineClosed, InvalidRequest, Overloaded
from ._log import logger
from ._streams import MapStream, Stream
from .graph import Graph
from .runtime._backend import Backend, current_backend
from .runtime._channel import BrokenChannel, Channel
from .runtime._request import (
    CANCELLED,
    PENDING,
    SUCCEEDED,
    Deadlines,
    Item,
    Request,
    RequestCounters,
    Sink,
)
from .runtime._scheduler import Scheduler
from .runtime._stats import snapshot
from .runtime._trace import TraceOption, Tracer, make_tracer, start_tracing
from .runtime._worker import advance, deliver, deliver_nowait

__all__ = ["Engine", "EngineState"]


class _Ticket:
    """A request's place in the admission queue."""

    __slots__ = ("granted", "req", "waiters")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.granted = False
        self.waiters: deque[Any] = deque()


class EngineState(enum.Enum):
    """Where an engine is in its life: it starts once and closes once."""

    UNOPENED = "unopened"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Engine:
    """Runs a :class:`~dataflow.Graph` in the current event loop (asyncio, uvloop, trio).

    Args:
        graph: the graph to run; validated here, so an invalid one raises at once.
        max_in_flight: the most requests inside the engine at once; further ``run`` /
            ``stream`` calls wait for room, or raise :class:`Overloaded` with
            ``wait=False``. ``None`` leaves admission to the channels' backpressure.
        shutdown: what leaving ``async with`` does with requests still in flight:
            ``"drain"`` lets them finish, ``"cancel"`` cancels them (they raise
            :class:`EngineClosed`). An exception leaving the block always cancels.
        stream_buffer: outputs a stream holds for a slow reader before the graph waits.
        inline: let a producer run the next node itself while that node is idle (a sync
            function on the loop with one replica), instead of waking its task: the same
            results and stats, fewer task switches. ``False`` always goes through the
            channels (for measuring them, or to keep each node's work in its own task).
        trace: record per-request spans (see ``docs/observability.md``): ``True`` keeps
            them in :attr:`tracer`, a path also writes Perfetto JSON there on exit.
        grace: seconds a body still running after the engine's requests ended (a thread
            call that never returns) is waited for on exit; then leaving ``async with``
            raises :class:`DataflowError` naming the node instead of waiting forever.

    Raises:
        GraphError: the graph is invalid or a placement is unavailable here.
    """

    def __init__(
        self,
        graph: Graph,
        *,
        max_in_flight: int | None = None,
        shutdown: Literal["drain", "cancel"] = "drain",
        stream_buffer: int = 16,
        inline: bool = True,
        trace: TraceOption = None,
        grace: float = 10.0,
    ) -> None:
        if not isinstance(graph, Graph):
            raise TypeError(f"Engine needs a dataflow Graph, got {type(graph).__name__}")
        graph.validate()
        if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise ValueError("max_in_flight must be an int >= 1 or None")
        if shutdown not in ("drain", "cancel"):
            raise ValueError("shutdown must be 'drain' or 'cancel'")
        if stream_buffer < 1:
            raise ValueError("stream_buffer must be >= 1")
        if not isinstance(grace, int | float) or not grace > 0:
            raise ValueError(f"grace must be seconds > 0, got {grace!r}")
        self.grace = float(grace)
        self.graph = graph
        self.plan = graph.plan()
        self.max_in_flight = max_in_flight
        self.shutdown = shutdown
        self.stream_buffer = stream_buffer
        self.inline = inline
        self.counters = RequestCounters()
        nodes = graph.nodes.values()
        self._params = frozenset().union(*(n.info.params for n in nodes))
        self._any_param = any(n.info.accepts_any_param for n in nodes)
        self._state = EngineState.UNOPENED
        self._next_id = 0
        self._live: dict[int, Request] = {}
        self._admission: deque[_Ticket] = deque()  # requests waiting for a place, FIFO
        self._admitted = 0  # requests past admission control and not yet ended
        self._idle: deque[Any] = deque()
        self._backend: Backend | None = None
        self._scheduler: Scheduler | None = None
        self._deadlines: Deadlines | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._deadline_scope: anyio.CancelScope | None = None
        self._loop_thread = 0
        self.tracer: Tracer | None = make_tracer(trace)
        self._hooks: Tracer | None = None  # the tracer, or a hop logger, or None
        self._unsuspended = 0  # run() calls answered without suspending, since the last
        self._feeders: set[anyio.CancelScope] = set()  # map() tasks pulling async inputs

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        return self._state

    async def __aenter__(self) -> Engine:
        """Start every node: create replicas and threads, run ``setup()``.

        Raises:
            EngineClosed: the engine was already started once.
            NodeError: a node could not start (its ``setup()`` or constructor raised);
                whatever had started is stopped again.
        """
        if self._state is not EngineState.UNOPENED:
            raise EngineClosed(
                f"this engine is {self._state.value}; an Engine runs once: create a new one"
            )
        self._state = EngineState.CLOSING  # until started
        backend = self._backend = current_backend()
        self._loop_thread = threading.get_ident()
        scheduler = self._scheduler = Scheduler(self.graph, self.plan, backend)
        scheduler.inline = self.inline
        self._hooks = start_tracing(self.tracer, self.graph.name, scheduler)
        self._deadlines = Deadlines(backend)
        try:
            # Replicas start before the task group exists, so a failing setup() raises
            # the NodeError itself rather than an exception group.
            await scheduler.start_replicas()
        except BaseException:
            self._state = EngineState.CLOSED
            raise
        tg = self._tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            scheduler.start_workers(tg)
            await tg.start(self._run_deadlines)
        except BaseException as exc:
            tg.cancel_scope.cancel()
            try:
                await tg.__aexit__(type(exc), exc, exc.__traceback__)
            finally:
                await scheduler.stop()
                self._state = EngineState.CLOSED
            raise
        self._state = EngineState.OPEN
        logger().info("engine for graph %r started", self.graph.name)
        return self

    async def _run_deadlines(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        assert self._deadlines is not None
        with anyio.CancelScope() as scope:
            self._deadline_scope = scope
            task_status.started()
            await self._deadlines.run()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        """Stop: drain (or cancel) requests in flight, end every worker, join threads."""
        assert self._tg is not None and self._scheduler is not None
        self._state = EngineState.CLOSING
        cancelling = exc_type is not None or self.shutdown == "cancel"
        for feeder in list(self._feeders):
            feeder.cancel()  # no more inputs: what they submitted drains
        try:
            if not cancelling:
                try:
                    await self._drain()
                except BaseException:
                    cancelling = True  # the drain itself was interrupted
                    raise
        finally:
            if cancelling:
                self._cancel_all()
                # Do not wait for bodies that may never return, and refuse every caller
                # still waiting for room in any channel (they see EngineClosed).
                self._tg.cancel_scope.cancel()
            self._scheduler.close_input(cancel=cancelling)
            if self._deadline_scope is not None:
                self._deadline_scope.cancel()
            stuck: list[str] = []
            try:
                # The block's own exception is not the task group's business: handing it
                # to __aexit__ would wrap it in an exception group.
                await self._tg.__aexit__(None, None, None)
            finally:
                stuck = await self._scheduler.stop(self.grace)
                self._state = EngineState.CLOSED
                logger().info("engine for graph %r stopped", self.graph.name)
                if self.tracer is not None:
                    self.tracer.close()
        if stuck:
            names = ", ".join(repr(n) for n in stuck)
            message = (
                f"node {names} was still running {self.grace:g} s after engine "
                f"{self.graph.name!r} closed (a body that never returns); its thread was "
                "left behind. Raise Engine(grace=...) if it only needs longer"
            )
            if exc_type is None:
                raise DataflowError(message)
            logger().error("%s", message)
        return False

    async def _drain(self) -> None:
        assert self._backend is not None
        while self.counters.in_flight:
            await self._backend.park(self._idle)

    def _cancel_all(self) -> None:
        for req in list(self._live.values()):
            req.cancel(EngineClosed(f"engine closed while request {req.id} was in flight"))

    # -- requests ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._state is not EngineState.OPEN:
            hint = (
                "use 'async with Engine(graph) as engine:' and submit inside the block"
                if self._state is EngineState.UNOPENED
                else "submit before leaving the 'async with' block"
            )
            raise EngineClosed(f"engine is {self._state.value}: {hint}")

    def _check_params(self, params: dict[str, Any]) -> None:
        if self._any_param:
            return
        unknown = sorted(set(params) - self._params)
        if unknown:
            accepted = ", ".join(sorted(self._params)) or "none"
            raise InvalidRequest(
                f"graph {self.graph.name!r} has no node that accepts parameter(s) "
                f"{', '.join(unknown)}; accepted: {accepted}"
            )

    def _on_finish(self, req: Request) -> None:
        counters = self.counters
        if req.state == SUCCEEDED:
            counters.succeeded += 1
        elif req.state == CANCELLED:
            counters.cancelled += 1
            if isinstance(req.error, TimeoutError):
                counters.timed_out += 1
        else:
            counters.failed += 1
        del self._live[req.id]
        if self._hooks is not None:
            self._hooks.request_end(req)
        backend = self._backend
        assert backend is not None
        if req.admitted:
            self._admitted -= 1
            if self._admission:
                self._grant()
        if self._idle and not counters.in_flight:
            backend.wake_all(self._idle)

    def _deadline(self, timeout: float | None) -> float:
        backend = self._backend
        assert backend is not None
        if timeout is None:
            return math.inf
        if not isinstance(timeout, int | float) or timeout <= 0 or math.isnan(timeout):
            raise InvalidRequest(f"timeout must be seconds > 0 or None, got {timeout!r}")
        return backend.time() + timeout

    def _new_request(
        self,
        params: dict[str, Any],
        streaming: bool,
        deadline: float,
        watcher: Callable[[Request], None] | None,
    ) -> Request:
        backend = self._backend
        assert backend is not None
        self._next_id += 1
        req = Request(
            self._next_id,
            backend,
            params,
            self._on_finish,
            streaming=streaming,
            buffer=self.stream_buffer,
            deadline=deadline,
        )
        req.watcher = watcher
        self.counters.submitted += 1
        self._live[req.id] = req
        if self._hooks is not None:
            self._hooks.request_start(req)
        if deadline != math.inf:
            assert self._deadlines is not None
            self._deadlines.add(req)
        return req

    async def _submit(
        self,
        x: Any,
        timeout: float | None,
        wait: bool,
        params: dict[str, Any],
        streaming: bool,
        watcher: Callable[[Request], None] | None = None,
    ) -> Request:
        self._check_open()
        self._check_params(params)
        deadline = self._deadline(timeout)
        limit = self.max_in_flight
        # Admission is FIFO: while anybody waits for room, newcomers queue behind them.
        full = limit is not None and (self._admitted >= limit or bool(self._admission))
        if full and not wait:
            raise Overloaded(f"engine is at max_in_flight={limit}; retry later or pass wait=True")
        req = self._new_request(params, streaming, deadline, watcher)
        if limit is not None:
            if full:
                if not await self._admit(req):
                    return req  # it ended (deadline, shutdown) while waiting for room
            else:
                self._admitted += 1
                req.admitted = True
        await self._enter([Item(req, x)], deadline)
        return req

    def _submit_many(
        self,
        xs: list[Any],
        timeout: float | None,
        params: dict[str, Any],
        watcher: Callable[[Request], None] | None,
    ) -> tuple[list[Request], list[Item], Channel[Item] | Sink]:
        """Create requests for ``xs`` at once, as many as admission allows now, and run
        them through the idle part of the graph together. Returns the requests and the
        items still to enqueue (with :meth:`_enter`'s slow path)."""
        self._check_open()
        deadline = self._deadline(timeout)
        limit = self.max_in_flight
        if limit is not None:
            xs = [] if self._admission else xs[: max(0, limit - self._admitted)]
        assert self._scheduler is not None
        if not xs:
            return [], [], self._scheduler.source
        reqs = [self._new_request(params, False, deadline, watcher) for _ in xs]
        if limit is not None:
            self._admitted += len(reqs)
            for req in reqs:
                req.admitted = True
        assert self._scheduler is not None
        items = [Item(req, x) for req, x in zip(reqs, xs, strict=True)]
        rest, dest, port = advance(items, self._scheduler.source, 0)
        if rest and not deliver_nowait(rest, dest, port):
            return reqs, rest, dest
        return reqs, [], dest

    async def _enter(self, items: list[Item], deadline: float) -> None:
        """Put new requests' items into the graph: idle loop nodes may run them right
        here (see ``runtime._worker.advance``); what is left goes to the first busy
        node's channel, waiting for room if it is full."""
        assert self._scheduler is not None
        rest, dest, port = advance(items, self._scheduler.source, 0)
        if not rest:
            return
        # A stream's caller is also its reader, so it must not run nodes itself: it
        # would wait for buffer room only it can make.
        if (
            len(rest) == 1
            and not rest[0].req.streaming
            and type(dest) is Channel
            and dest.consumer is not None
            and dest.consumer.can_borrow()
        ):
            try:
                await dest.consumer.borrow(rest[0])
            except BrokenChannel:
                rest[0].req.cancel(EngineClosed(f"engine closed during request {rest[0].req.id}"))
            except BaseException:
                rest[0].req.cancel()
                raise
            return
        if deliver_nowait(rest, dest, port):
            return
        await self._enter_slowly(rest, dest, deadline)

    async def _enter_slowly(
        self, rest: list[Item], dest: Channel[Item] | Sink, deadline: float
    ) -> None:
        backend = self._backend
        assert backend is not None
        try:
            if deadline == math.inf:
                await deliver(rest, dest)  # no cancel scope: it costs more than the hop
            else:
                with anyio.fail_after(deadline - backend.time()):
                    await deliver(rest, dest)
        except TimeoutError as exc:
            for it in rest:
                it.req.cancel(exc)  # the deadline passed while waiting for room
        except BrokenChannel:
            for it in rest:
                it.req.cancel(EngineClosed(f"engine closed before request {it.req.id} entered"))
        except BaseException:
            for it in rest:
                it.req.cancel()
            raise

    async def _admit(self, req: Request) -> bool:
        """Wait, first come first served, for one of the ``max_in_flight`` places; True
        once it is granted (then ``req.admitted``: its end gives the place back), False if
        ``req`` ended first. The request counts as submitted while it waits, so a
        deadline that expires here is a timed-out request like any other."""
        backend = self._backend
        assert backend is not None
        ticket = _Ticket(req)
        self._admission.append(ticket)
        handle = req.own(lambda: backend.wake_all(ticket.waiters))
        remaining = None if req.deadline == math.inf else req.deadline - backend.time()
        try:
            with anyio.fail_after(remaining):
                while not ticket.granted and not req.done:
                    await backend.park(ticket.waiters)
        except BaseException as exc:
            self._leave_queue(ticket)
            req.cancel(exc if isinstance(exc, TimeoutError) else None)
            if not isinstance(exc, TimeoutError):
                raise
            return False
        finally:
            req.disown(handle)
        self._leave_queue(ticket)
        return ticket.granted and not req.done

    def _leave_queue(self, ticket: _Ticket) -> None:
        if not ticket.granted:
            try:
                self._admission.remove(ticket)
            except ValueError:
                pass  # already taken off by _grant

    def _grant(self) -> None:
        """Hand free places to the longest waiting requests (skipping ended ones)."""
        limit = self.max_in_flight
        queue = self._admission
        backend = self._backend
        assert backend is not None
        while queue and limit is not None and self._admitted < limit:
            ticket = queue.popleft()
            if ticket.req.done:
                backend.wake_all(ticket.waiters)
                continue
            ticket.granted = True
            ticket.req.admitted = True  # its end gives the place back
            self._admitted += 1
            backend.wake(ticket.waiters)

    def _outcome(self, req: Request) -> Any:
        if req.state == SUCCEEDED:
            if self.plan.streaming:
                return list(req.outputs)
            if not req.outputs:
                raise InvalidRequest(f"request {req.id} produced no output")
            return req.outputs[0]
        raise req.outcome_error()

    async def run(
        self,
        x: Any,
        /,
        *,
        timeout: float | None = None,
        wait: bool = True,
        params: Mapping[str, Any] | None = None,
        **kw_params: Any,
    ) -> Any:
        """Run one input through the graph and return its result.

        For a streaming graph (a generator or shard not merged before the exit) the result
        is the list of every output, in order.

        Args:
            x: the input of the graph's entry node.
            timeout: seconds until the request is cancelled everywhere.
            wait: at ``max_in_flight``, wait for room (True) or raise Overloaded (False).
            params: per-request parameters, given to the nodes that declare them (the
                way to pass one named like an engine argument: ``params={"timeout": 3}``).
            **kw_params: more per-request parameters (a name may not be given both ways).

        Raises:
            NodeError: a node failed for this request (the cause is chained).
            TimeoutError: the deadline passed first.
            Overloaded: ``wait=False`` and the engine is full.
            InvalidRequest: a parameter no node accepts, or a bad timeout.
            EngineClosed: the engine is not running, or closed while this request ran.
        """
        req = await self._submit(x, timeout, wait, _params(params, kw_params), streaming=False)
        if req.state == PENDING:
            try:
                await req.wait_done()
            except BaseException:
                req.cancel()
                raise
        else:
            # Answered without suspending (an idle inline graph): stay fair to the loop
            # and let a surrounding cancel scope act, every few calls.
            self._unsuspended += 1
            if self._unsuspended >= 16:
                self._unsuspended = 0
                await anyio.lowlevel.checkpoint()
        return self._outcome(req)

    def stream(
        self,
        x: Any,
        /,
        *,
        timeout: float | None = None,
        wait: bool = True,
        params: Mapping[str, Any] | None = None,
        **kw_params: Any,
    ) -> Stream:
        """Stream one input's outputs as the graph produces them.

        Use as ``async for out in engine.stream(x)``. Leaving the loop early, calling
        ``aclose()`` or cancelling the consumer cancels the request everywhere.
        Raises (from iteration) what :meth:`run` raises; ``params`` as in :meth:`run`.
        """
        self._check_open()
        merged = _params(params, kw_params)
        self._check_params(merged)
        return Stream(self, x, timeout, wait, merged)

    def map(
        self,
        inputs: Iterable[Any] | AsyncIterable[Any],
        /,
        *,
        ordered: bool = True,
        window: int | None = None,
        timeout: float | None = None,
        return_exceptions: bool = False,
        params: Mapping[str, Any] | None = None,
        **kw_params: Any,
    ) -> MapStream:
        """Run many inputs, pulling the next only when one of at most ``window`` ends.

        Args:
            inputs: a sync or async iterable.
            ordered: yield results in input order (True) or as they finish.
            window: the most of this call's requests in flight (default: ``max_in_flight``,
                or as many items as the graph's channels and replicas can hold, so that
                every stage can be busy).
            timeout: per-request deadline in seconds.
            return_exceptions: yield a failed request's exception instead of raising it.
            params: per-request parameters for every input (as in :meth:`run`).
            **kw_params: more per-request parameters.

        Raises (from iteration) what :meth:`run` raises, unless ``return_exceptions``.
        """
        self._check_open()
        params = _params(params, kw_params)
        self._check_params(params)
        if window is None:
            assert self._scheduler is not None
            window = self.max_in_flight or self._scheduler.holding_capacity()
        if window < 1:
            raise ValueError("window must be >= 1")
        return MapStream(self, inputs, ordered, window, timeout, return_exceptions, params)

    # -- figures -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per request, per node and per edge figures (see README, "Stats")."""
        if self._scheduler is None:
            return {"graph": self.graph.name, "requests": self.counters.as_dict()}
        return snapshot(self.graph.name, self._scheduler, self.counters)

    def items_inside(self) -> int:
        """How many items the graph holds right now (channels and merge buffers)."""
        return 0 if self._scheduler is None else self._scheduler.items_inside()


def _params(params: Mapping[str, Any] | None, kw_params: dict[str, Any]) -> dict[str, Any]:
    """One request's parameters: ``params=`` merged with the keyword ones."""
    if params is None:
        return kw_params
    if not isinstance(params, Mapping):
        raise InvalidRequest(f"params must be a mapping of names to values, got {params!r}")
    both = sorted(set(params) & set(kw_params))
    if both:
        raise InvalidRequest(
            f"parameter(s) {', '.join(both)} given both in params= and as keywords"
        )
    if not kw_params:
        return dict(params)
    return {**params, **kw_params}
