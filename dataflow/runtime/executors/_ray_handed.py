"""Ray calls whose output went on before anybody knew they had ended.

A ray-placed node whose consumers are all plain ray-placed nodes hands the ref of its
output on as soon as its call is submitted (:class:`HandedCall`, a
:class:`~._base.Handed`): the next node submits its own call with it at once and Ray
resolves the ref in that actor, as a plain chain of actor calls does. Nobody waits for
such a call by itself -- a wait per hop per item costs the engine's process more than
the hop -- so its outcome is learnt where a value that depends on it is waited for anyway:

- a consumer's own call succeeded: every handed-on call behind its inputs succeeded too,
  since Ray runs a call only once its inputs exist (:func:`confirm`);
- a consumer's call failed: the statuses behind its inputs say whether a handed-on call
  failed first (:func:`blame`); that call fails the request at its own node (an actor
  that died is replaced there) and the consumer's item is dropped
  (:class:`~._base.UpstreamFailed`);
- the request ended first: the calls it still owns are cancelled in Ray.

One actor call may carry several queued items (runtime/_coalesce): a :class:`Group`,
one output ref per item (each item's own :class:`HandedCall`) and one status list for
all, read per item. An item whose body raised travels on as a ``Raised`` output: the
next actors skip it (their status marks it skipped, never failed), so only the node
where it raised is blamed. A group is cancelled in Ray only once every item's request
ended, and holds its place until the call is seen to end.

A call holds one of its replica's ``max_in_flight`` places (:class:`Places`), the
bound on calls outstanding per actor, until it is seen to end or -- when the replica
needs the place -- seen to have finished in Ray (or a merge waiting for more of a
request's parts than there are places upstream would wait on itself).

The body's time, measured in the actor, is the call's small status object; the busy
time it adds to the node's stats is fetched for many calls at once
(:class:`Unreported`), never one fetch per call.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray

from .._request import SUCCEEDED
from ._base import Handed, Report, UpstreamFailed
from ._ray_actor import Raised
from ._ray_refs import RayRef, cancel, ready_or_woken

if TYPE_CHECKING:
    from .._backend import Backend
    from .._request import Request

__all__ = ["Group", "HandedCall", "Places", "Unreported", "blame", "confirm", "handed_calls"]

_REPORT_EVERY = 32  # successful calls whose busy times are fetched together
_REPORT_AFTER_S = 1.0  # ... or fewer, once this long passed since the last fetch


class Group:
    """One actor call computing one or more items, each a :class:`HandedCall`.

    Its status is one small object for all of them (see ``_NodeActor.call_group``);
    it holds one of the replica's places until every item is seen to end, or until the
    replica, short of places, sees the call finished in Ray.
    """

    __slots__ = ("_places", "holds", "live", "size", "status")

    def __init__(self, status: Any, places: Places, size: int) -> None:
        self.status = status
        self._places = places
        self.size = size  # items in the call
        self.holds = True  # one of the replica's places
        self.live = size  # items not yet seen to end

    def give_place(self) -> None:
        if self.holds:
            self.holds = False
            self._places.give_back()

    def item_ended(self) -> None:
        self.live -= 1
        if self.live == 0:
            self.give_place()


class Places:
    """A replica's ``max_in_flight`` places for calls in flight.

    A handed-on call holds its place until somebody sees it end (usually the chain's
    last node, much later). When none is free, the one waiting for a place also watches
    the oldest call holding one: once that call has finished in Ray -- its status exists,
    whatever it says -- its place comes back, so each stage of a chain keeps its own
    ``max_in_flight`` calls going, not the chain as a whole. That costs one readiness
    callback per wait, none when places are free.
    """

    __slots__ = ("_backend", "_count", "_free", "_held", "_waiters")

    def __init__(self, backend: Backend, count: int) -> None:
        self._backend = backend
        self._count = count
        self._free = count
        self._held: deque[Group] = deque()  # oldest first (some gave theirs back)
        self._waiters: deque[Any] = deque()

    def held_by(self, call: Group) -> None:
        """``call`` took the place :meth:`take` gave."""
        held = self._held
        held.append(call)
        if len(held) > 2 * self._count:
            # Calls mostly give their places back oldest first, but one that runs long
            # keeps the ones behind it here: drop those that gave theirs back, so this
            # stays within twice the places whatever the traffic.
            self._held = deque(c for c in held if c.holds)

    async def take(self) -> None:
        while self._free <= 0:
            held = self._held
            while held and not held[0].holds:
                held.popleft()
            if not held:
                await self._backend.park(self._waiters)
                continue
            oldest = held[0]
            finished = await ready_or_woken(self._backend, oldest.status, self._waiters)
            if finished:
                oldest.give_place()
        self._free -= 1

    def give_back(self) -> None:
        self._free += 1
        if self._waiters:
            self._backend.wake(self._waiters)


class Unreported:
    """Calls that ended well and whose busy times (in their status objects) are still to
    be fetched: in batches, so a hop costs no fetch of its own."""

    __slots__ = ("_calls", "_since")

    def __init__(self) -> None:
        self._calls: list[HandedCall] = []
        self._since = time.perf_counter()

    def add(self, call: HandedCall) -> None:
        self._calls.append(call)
        if len(self._calls) >= _REPORT_EVERY or time.perf_counter() - self._since > _REPORT_AFTER_S:
            self.flush()

    def flush(self) -> None:
        """Fetch the waiting busy times (their calls ended: the statuses exist) and report."""
        calls, self._calls = self._calls, []
        self._since = time.perf_counter()
        if not calls:
            return
        groups = list({id(c.group): c.group for c in calls}.values())
        try:
            statuses = ray.get([g.status for g in groups], timeout=0)
        except Exception:  # Ray is shutting down: report the calls, without their times
            statuses = [None] * len(groups)
        got = {id(g): status for g, status in zip(groups, statuses, strict=True)}
        for call in calls:
            status = got[id(call.group)]
            seconds = status[call.slot] if status is not None else 0.0
            call.report_success(seconds if isinstance(seconds, float) else 0.0)


SKIPPED = object()  # an item's input had failed already: its body did not run


class HandedCall(Handed):
    """One item of a submitted :class:`Group`, whose output (:attr:`value`, a
    :class:`RayRef`) went on at once.

    ``failure`` turns the item's error (the body's, or Ray's for the whole call) into
    what its node fails the request with; ``unreported`` collects its busy time once it
    ended well.
    """

    __slots__ = (
        "_failure",
        "_handle",
        "_report",
        "_req",
        "_unreported",
        "ended_at",
        "error",
        "group",
        "slot",
    )

    def __init__(
        self,
        value: RayRef,
        group: Group,
        slot: int,
        unreported: Unreported,
        failure: Callable[[BaseException], BaseException],
    ) -> None:
        super().__init__(value)
        self.group = group
        self.slot = slot  # which of the group's items
        self._unreported = unreported
        self._failure = failure
        self._report: Report | None = None
        self._req: Request | None = None
        self._handle = 0
        self.ended_at = 0.0  # when the engine learnt that it ended (0: not yet)
        self.error: BaseException | None = None  # what it failed with

    @property
    def ended(self) -> bool:
        return self.ended_at != 0.0

    def adopt(self, req: Request, report: Report) -> None:
        self._req = req
        self._report = report
        # The request's end (any way but success) cancels the call where it runs.
        self._handle = req.own(self._request_ended)

    def _end(self) -> None:
        self.ended_at = time.perf_counter()
        self.group.item_ended()
        if self._req is not None:
            self._req.disown(self._handle)

    def succeeded(self) -> None:
        if not self.ended:
            self._end()
            self._unreported.add(self)

    def report_success(self, seconds: float) -> None:
        if self._report is not None:
            self._report(seconds, self.ended_at)

    def failed(self, exc: BaseException) -> None:
        """It raised (its status says so): its node fails the request."""
        if not self.ended:
            self._end()
            self.error = self._failure(exc)
            self._tell(self.error)

    def dropped(self) -> None:
        """It did not run for its request (an input failed, the request ended)."""
        if not self.ended:
            self._end()
            self._tell(None)

    def _tell(self, outcome: BaseException | None) -> None:
        if self._report is not None:
            self._report(outcome, self.ended_at)

    def _request_ended(self) -> None:
        req = self._req
        group = self.group
        if not self.ended and req is not None and req.state != SUCCEEDED and group.live == 1:
            # The last of the group's items whose request still wanted it: nobody does.
            # (Ray cancels a call as a whole, so not while another item's request waits.)
            cancel(group.status)
        self.dropped()

    def outcome(self) -> tuple[bool, Any]:
        """``(ended, error)`` in Ray, without waiting: ``(False, None)`` while the call
        runs, ``(True, None)`` if the body succeeded, ``(True, SKIPPED)`` if its input
        had failed already."""
        status = self.group.status
        ready, _ = ray.wait([status], timeout=0)
        if not ready:
            return False, None
        try:
            entries = ray.get(status, timeout=0)
        except Exception as exc:  # the whole call failed (its actor died, cancelled)
            return True, exc
        entry = entries[self.slot]
        if entry is None:
            return True, SKIPPED
        if isinstance(entry, Raised):
            return True, entry.error
        return True, None


def _calls(inputs: list[Any]) -> list[HandedCall]:
    return [c for v in inputs if type(v) is RayRef for c in v.calls]


def confirm(inputs: list[Any]) -> None:
    """A call that took ``inputs`` succeeded: so did every call they were handed on by."""
    for call in _calls(inputs):
        call.succeeded()


def blame(exc: BaseException, inputs: list[Any]) -> None:
    """Raise :class:`UpstreamFailed` (from ``exc``) if a call an input was handed on by
    failed: the first of them (upstream first) fails the request at its node, the ones
    that only saw its error are dropped. Otherwise ``exc`` is the call's own."""
    origin: HandedCall | None = None
    for call in _calls(inputs):
        if call.ended:
            if call.error is not None and origin is None:
                origin = call  # already blamed, by another consumer of it
            continue
        ended, error = call.outcome()
        if not ended:
            continue
        if error is None:
            call.succeeded()
        elif error is SKIPPED:
            call.dropped()  # the input it was handed failed: blamed upstream of it
        elif origin is None:
            origin = call
            call.failed(error)
        else:
            call.dropped()
    if origin is not None:
        raise UpstreamFailed(f"its input from node {origin.value.node!r} failed") from exc


def handed_calls(inputs: list[Any], own: HandedCall | None = None) -> tuple[HandedCall, ...]:
    """The calls a value computed from ``inputs`` depends on and nobody has seen end yet
    (upstream first), with ``own`` -- the call computing it -- last."""
    pending = [c for c in _calls(inputs) if not c.ended]
    if own is not None:
        pending.append(own)
    return tuple(pending)
