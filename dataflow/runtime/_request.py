"""Requests, the items that carry them through the graph, and their outcomes.

Every accepted request ends exactly once (:meth:`Request.finish`): succeeded, failed or
cancelled. Whatever races to end it — the last output reaching the sink, a node failing,
the deadline, the caller going away — the first one wins and the others are no-ops, so
the caller's outcome and the engine's counters always agree.

A request counts its live items (``outstanding``). Nodes that emit several items per
input (shards, generators, fan-out) add to it; the sink and dropped items subtract. When
it reaches zero every output has been delivered and the request succeeds.

A request also *owns* the work done on its behalf (see ``docs/contracts.md``): whoever
starts something for it that must stop when it ends — a cancel scope around a body, a
thread call, a reorder-buffer entry, a parked generation slot — registers a release
function with :meth:`Request.own` and gets a handle back; when the work ends normally it
calls :meth:`Request.disown` with the handle (O(1), so nothing grows per item). Whatever
is still owned when the request ends is released exactly once, from :meth:`Request.finish`,
whichever way it ends.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._errors import DataflowError, InvalidRequest, NodeError

if TYPE_CHECKING:
    from ._backend import Backend

__all__ = ["Deadlines", "Item", "Request", "RequestCounters", "Sink", "node_error"]

PENDING, SUCCEEDED, FAILED, CANCELLED = 0, 1, 2, 3
STATE_NAMES = ("pending", "succeeded", "failed", "cancelled")

# (index, total) per open shard or generator; total 0 = a generator, count unknown.
Tag = tuple[tuple[int, int], ...]


class Item:
    """One value travelling along an edge on behalf of one request."""

    __slots__ = ("port", "req", "tag", "value")

    def __init__(self, req: Request, value: Any, tag: Tag = (), port: int = 0) -> None:
        self.req = req
        self.value = value
        self.tag = tag
        self.port = port


class RequestCounters:
    """Outcome counts; ``submitted == succeeded + failed + cancelled + in_flight``."""

    __slots__ = ("cancelled", "failed", "submitted", "succeeded", "timed_out")

    def __init__(self) -> None:
        self.submitted = 0
        self.succeeded = 0
        self.failed = 0
        self.cancelled = 0
        self.timed_out = 0  # included in ``cancelled``

    @property
    def in_flight(self) -> int:
        return self.submitted - self.succeeded - self.failed - self.cancelled

    def as_dict(self) -> dict[str, int]:
        return {
            "submitted": self.submitted,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "timed_out": self.timed_out,
            "in_flight": self.in_flight,
        }


class Request:
    """One input's journey through the graph, and the place its outcome lands.

    ``streaming`` requests keep their outputs in a bounded buffer read by the caller's
    ``async for``; others keep them in a list returned by ``run``.
    """

    __slots__ = (
        "_buffer_limit",
        "_next_handle",
        "_on_finish",
        "_owned",
        "_reader",
        "_writers",
        "admitted",
        "backend",
        "consumed",
        "deadline",
        "error",
        "id",
        "late",
        "on_consume",
        "outputs",
        "outstanding",
        "params",
        "scheduled_at",
        "state",
        "streaming",
        "watcher",
    )

    def __init__(
        self,
        rid: int,
        backend: Backend,
        params: dict[str, Any],
        on_finish: Callable[[Request], None],
        *,
        streaming: bool = False,
        buffer: int = 16,
        deadline: float = math.inf,
    ) -> None:
        self.id = rid
        self.backend = backend
        self.params = params
        self.state = PENDING
        self.error: BaseException | None = None
        self.outstanding = 1
        self.outputs: deque[Any] = deque()
        self.streaming = streaming
        self.deadline = deadline
        self._buffer_limit = buffer
        self._reader: deque[Any] = deque()  # the caller waiting for outputs or the end
        self._writers: deque[Any] = deque()  # the sink waiting for buffer room
        # Work done for this request that its end must release: handle -> release().
        self._owned: dict[int, Callable[[], None]] | None = None
        self._next_handle = 0
        self._on_finish = on_finish
        # One observer of the end (``Engine.map``), cheaper than a cleanup list.
        self.watcher: Callable[[Request], None] | None = None
        self.admitted = False  # holds one of the engine's max_in_flight places
        self.scheduled_at = 0.0  # when a generate node first gave it a slot (perf_counter)
        # Outputs the stream's reader has taken, and who to tell when it takes one: a
        # generation node parks a slow reader's sequence on these instead of blocking.
        self.consumed = 0
        self.on_consume: Callable[[Request], None] | None = None
        # Outputs that reached the exit while the stream's buffer was full, waiting there
        # in order (see Sink); None when there are none.
        self.late: deque[Item] | None = None

    def __repr__(self) -> str:
        return f"<Request {self.id} {STATE_NAMES[self.state]}>"

    @property
    def done(self) -> bool:
        return self.state != PENDING

    @property
    def buffer_limit(self) -> int:
        """The most outputs a stream holds for its reader (the engine's ``stream_buffer``)."""
        return self._buffer_limit

    # -- ownership of the work done for this request ----------------------------------
    def own(self, release: Callable[[], None]) -> int:
        """Register work done for this request: ``release()`` runs once when the request
        ends, unless :meth:`disown` is called with the returned handle first. A request
        that already ended releases at once (and the handle is 0)."""
        if self.state != PENDING:
            release()
            return 0
        owned = self._owned
        if owned is None:
            owned = self._owned = {}
        self._next_handle += 1
        handle = self._next_handle
        owned[handle] = release
        return handle

    def disown(self, handle: int) -> None:
        """The work registered under ``handle`` ended by itself: nothing to release."""
        owned = self._owned
        if owned is not None:
            owned.pop(handle, None)

    def owned_count(self) -> int:
        """How many pieces of work this request owns now (for tests and stats)."""
        return 0 if self._owned is None else len(self._owned)

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the request ends: :meth:`own` for work that lasts as long as
        the request (register it once per request, not once per item)."""
        self.own(fn)

    # -- ending --------------------------------------------------------------------
    def finish(self, state: int, error: BaseException | None = None) -> bool:
        """End the request; True if this call ended it, False if it had already ended."""
        if self.state != PENDING:
            return False
        self.state = state
        self.error = error
        if state != SUCCEEDED and not self.streaming:
            self.outputs.clear()
        self._on_finish(self)
        owned, self._owned = self._owned, None
        if owned:
            for fn in owned.values():
                fn()
        if self.watcher is not None:
            self.watcher(self)
        if self._reader:
            self.backend.wake_all(self._reader)
        if self._writers:
            self.backend.wake_all(self._writers)
        return True

    def fail(self, error: BaseException) -> bool:
        return self.finish(FAILED, error)

    def cancel(self, error: BaseException | None = None) -> bool:
        return self.finish(CANCELLED, error)

    # -- outputs -------------------------------------------------------------------
    def deliver(self, value: Any) -> bool:
        """Accept one output from the sink; False if a stream's buffer is full."""
        if self.state != PENDING:
            self.outstanding -= 1
            return True
        outputs = self.outputs
        if self.streaming and len(outputs) >= self._buffer_limit:
            return False
        outputs.append(value)
        self.outstanding -= 1
        if self.outstanding == 0:
            self.finish(SUCCEEDED)
        elif self._reader:
            self.backend.wake(self._reader)
        return True

    def release(self, count: int = 1) -> None:
        """``count`` items of this request were dropped or consumed without output."""
        self.outstanding -= count
        if self.outstanding == 0 and self.state == PENDING:
            self.finish(SUCCEEDED)

    async def wait_room(self) -> None:
        """Wait until a stream's buffer has room or the request ended (sink side)."""
        while self.state == PENDING and len(self.outputs) >= self._buffer_limit:
            await self.backend.park(self._writers)

    @property
    def behind(self) -> bool:
        """A stream whose reader is behind: its buffer is full or outputs wait at the
        exit. Its producers wait (:meth:`wait_reader`) rather than make more."""
        return self.streaming and (len(self.outputs) >= self._buffer_limit or self.late is not None)

    async def wait_reader(self) -> None:
        """Wait until the stream's reader caught up (or the request ended)."""
        while self.state == PENDING and self.behind:
            await self.backend.park(self._writers)

    async def wait_done(self) -> None:
        """Wait until the request ended (caller side of ``run``)."""
        while self.state == PENDING:
            await self.backend.park(self._reader)

    async def next_output(self) -> tuple[bool, Any]:
        """Wait for the next output of a stream: ``(True, value)`` or ``(False, None)``
        at the end. Raises the request's error if it failed or was cancelled."""
        outputs = self.outputs
        while True:
            if outputs:
                value = outputs.popleft()
                self.consumed += 1
                if self.on_consume is not None:
                    self.on_consume(self)
                if self._writers:
                    # The exit's queue and a waiting generator may both wait for room.
                    self.backend.wake_all(self._writers)
                return True, value
            if self.state != PENDING:
                if self.state == SUCCEEDED:
                    return False, None
                raise self.outcome_error()
            await self.backend.park(self._reader)

    def outcome_error(self) -> BaseException:
        error = self.error
        if error is None:
            return DataflowError(f"request {self.id} was cancelled")
        return error


class Sink:
    """The graph's exit: hands the sink node's outputs to their requests.

    A stream whose reader is behind (its buffer full) does not hold up the exit for
    other requests: its outputs wait in a queue of its own (``Request.late``), handed
    over in order by a task of its own (in the engine's task group, :attr:`tg`) as the
    reader makes room. What waits there is bounded because producers of a stream wait
    for its reader before producing more (``Request.wait_reader``): at most what was
    already on its way to the exit.
    """

    __slots__ = ("_behind", "tg")

    def __init__(self) -> None:
        self.tg: Any = None
        self._behind: set[Request] = set()  # requests with outputs waiting here

    def put_nowait(self, item: Item) -> bool:
        """Deliver ``item``; False (not delivered) if its stream's buffer is full and
        there is no task group to wait in."""
        req = item.req
        late = req.late
        if late is not None:
            late.append(item)  # behind that request's earlier outputs
            return True
        if req.deliver(item.value):
            return True
        if self.tg is None:
            return False
        req.late = deque((item,))
        self._behind.add(req)
        self.tg.start_soon(self._deliver_late, req)
        return True

    async def send(self, item: Item) -> None:
        """Deliver ``item``, waiting for room in its stream's buffer if need be."""
        if self.put_nowait(item):
            return
        req = item.req
        while not req.deliver(item.value):
            await req.wait_room()

    def late(self) -> int:
        """Outputs waiting for slow readers (for tests and stats)."""
        return sum(len(r.late) for r in self._behind if r.late is not None)

    async def _deliver_late(self, req: Request) -> None:
        import anyio

        queue = req.late
        assert queue is not None
        try:
            with anyio.CancelScope() as scope:
                handle = req.own(lambda: scope.cancel() if req.state != SUCCEEDED else None)
                try:
                    while queue:
                        item = queue[0]
                        while not req.deliver(item.value):
                            await req.wait_room()
                        queue.popleft()
                finally:
                    req.disown(handle)
        finally:
            req.late = None  # what is left belongs to a request that ended
            self._behind.discard(req)
            if req._writers:
                req.backend.wake_all(req._writers)  # its producers may go on


class Deadlines:
    """Expires requests at their deadlines: one task for the whole engine.

    The deadline belongs to the request, not to the caller's wait, so a result arriving
    at the same moment as the deadline ends the request exactly one way and the caller
    sees that way. A heap entry is owned by its request: when the request ends the entry
    lets go of it at once (so a finished request and its outputs are never kept alive
    here), and dead entries are compacted away once they outnumber the live ones.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._heap: list[list[Any]] = []  # [deadline, request id, request or None]
        self._waiters: deque[Any] = deque()
        self._live = 0

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, req: Request) -> None:
        heap = self._heap
        if len(heap) > 64 and len(heap) > 2 * self._live:
            # Most entries belong to requests that already ended: drop them.
            self._heap = heap = [e for e in heap if e[2] is not None]
            heapq.heapify(heap)
        earliest = heap[0][0] if heap else math.inf
        entry: list[Any] = [req.deadline, req.id, req]
        heapq.heappush(heap, entry)
        self._live += 1
        req.own(lambda: self._release(entry))
        if req.deadline < earliest:
            self.backend.wake(self._waiters)

    def _release(self, entry: list[Any]) -> None:
        entry[2] = None
        self._live -= 1

    async def run(self) -> None:
        """Expire requests forever (until cancelled with the engine's task group)."""
        import anyio

        while True:
            heap = self._heap
            now = self.backend.time()
            while heap and (heap[0][2] is None or heap[0][0] <= now):
                req = heapq.heappop(heap)[2]
                if req is not None and req.state == PENDING:
                    req.finish(CANCELLED, TimeoutError(f"request {req.id} passed its deadline"))
            delay = heap[0][0] - now if heap else math.inf
            with anyio.move_on_after(delay):
                await self.backend.park(self._waiters)


def node_error(node: str, req: Request, exc: BaseException) -> DataflowError:
    """The error a request fails with when node ``node`` raised ``exc`` for it."""
    if isinstance(exc, InvalidRequest):
        return exc  # the body judged the request's input: the caller's error, as raised
    err = NodeError(node, req.id, exc)
    err.__cause__ = exc
    return err
