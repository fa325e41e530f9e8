"""Items that share a call: a Ray node sends what waits in its input in as few actor
calls as it may.

A call to a Ray actor costs the same whether its body takes microseconds or seconds --
hundreds of microseconds of submitting, scheduling and replying, in the engine's process
and in the actor's. When items queue at such a node (its ``max_in_flight`` calls are
outstanding, or the items arrived together), one call carries several of them, each
with its own output and its own outcome: the body still runs once per item, an item that
fails fails only its request, and outputs leave in the order they would have. The call
either hands each output on as a ref of its own, at once (a node feeding Ray nodes, see
executors/_ray_handed), or brings them all back in one reply. Items share a call only

- while it stays short: at most ``coalesce`` items (a Ray option) and about
  :data:`_BUDGET_S` of the body's recent time per item, so a heavy body (to which the
  overhead hardly matters) goes one item per call and no output waits long for the
  others; until the node has reported its first times, one item per call;
- with the same parameters, and with inputs from the same upstream call (Ray runs or
  fails a call as a whole: inputs that might fail apart never go in one call).

Nothing waits to fill a call: a lone item goes at once. But a take that ends in part of
an upstream call's items, after others, leaves that part in the input (:func:`aligned`):
the next take starts with it and finds the rest of that call's items too, so calls line
up with the calls upstream instead of splitting each in two (the input holds as many
items as one call may carry, so one call's outputs often straddle two takes).

A call carrying several items is cancelled where it runs once every one of their
requests ended (one that ended before only loses its output).
"""

from __future__ import annotations

import time
from itertools import islice
from typing import TYPE_CHECKING, Any

import anyio

from ._request import PENDING, Item, node_error
from .executors import UpstreamFailed

if TYPE_CHECKING:
    from ._ordering import _Slot
    from ._worker import NodeRunner

__all__ = ["aligned", "group_limit", "run_coalesced"]

_BUDGET_S = 0.002  # the most body time per shared call, by the node's recent times


def group_limit(runner: NodeRunner, most: int) -> int:
    """How many items one call may carry now (see the module's rules)."""
    service = runner.stats.service
    if most <= 1 or not service:
        return 1
    recent = max(islice(reversed(service), 8))  # a slow one among the last few counts
    if recent <= 0.0:
        return most
    return max(1, min(most, int(_BUDGET_S / recent)))


def aligned(runner: NodeRunner, index: int, items: list[Item]) -> list[Item]:
    """``items`` (just taken from the input, in order) less a trailing part of one
    upstream call's items that follows other items: that part goes back in front of the
    input, for the next take. Nothing waits: the next take comes as soon as these
    items are sent, and a take of one call's items alone goes as it is."""
    replica = runner.replica_objs[index]
    key = replica.group_key
    last = key(items[-1].value)
    if last is None:
        return items
    start = len(items) - 1
    while start > 0 and key(items[start - 1].value) is last:
        start -= 1
    if start == 0 or len(items) - start >= replica.group_size(last):
        return items  # one call's items alone, or all of them
    runner.inbox.unget(items[start:])
    return items[:start]


async def run_coalesced(runner: NodeRunner, index: int, items: list[Item]) -> None:
    """Send ``items`` (taken from the input at once, in order) to replica ``index`` in as
    few calls as the rules allow, and each output on; a trailing part of an upstream
    call's items may go back to the input instead (:func:`aligned`)."""
    if len(items) > 1:
        items = aligned(runner, index, items)
    replica = runner.replica_objs[index]
    ordered = runner._ordered
    # Slots in input order now, before another lane takes later items.
    slots = [runner._open_slot(it.req) for it in items] if ordered else []
    limit = group_limit(runner, replica.coalesce)
    stats = runner.stats
    group: list[int] = []
    params: dict[str, Any] = {}
    key: Any = None
    closed = [0]  # items whose slots are closed
    try:
        for i, it in enumerate(items):
            stats.items_in += 1
            if it.req.state != PENDING:
                stats.cancelled += 1
                continue
            kw = runner._kwargs(it.req)
            k = replica.group_key(it.value)
            if group and (len(group) >= limit or k is not key or kw != params):
                await _run(runner, index, items, slots, group, params, closed)
                group = []
            if not group:
                key, params = k, kw
            group.append(i)
        if group:
            await _run(runner, index, items, slots, group, params, closed)
    finally:
        await _close(runner, items, slots, closed, len(items))


async def _close(
    runner: NodeRunner, items: list[Item], slots: list[_Slot], closed: list[int], upto: int
) -> None:
    """Close the slots of the items before ``upto`` (all their outputs are out)."""
    while slots and closed[0] < upto:
        i = closed[0]
        closed[0] += 1
        await runner._close_slot(items[i].req, slots[i])


async def _run(
    runner: NodeRunner,
    index: int,
    items: list[Item],
    slots: list[_Slot],
    group: list[int],
    kw: dict[str, Any],
    closed: list[int],
) -> None:
    """One call for the items at ``group`` (indices into ``items``), then close the
    slots of every item up to the group's last."""
    tracer = runner.tracer
    if tracer is not None:
        for i in group:
            tracer.take(runner, index, items[i])
    if runner.replica_objs[index].hand_on:
        await _hand_on(runner, index, items, slots, group, kw)
    else:
        await _fetch(runner, index, items, slots, group, kw)
    await _close(runner, items, slots, closed, group[-1] + 1)


async def _hand_on(
    runner: NodeRunner,
    index: int,
    items: list[Item],
    slots: list[_Slot],
    group: list[int],
    kw: dict[str, Any],
) -> None:
    replica = runner.replica_objs[index]
    try:
        calls = await replica.submit_group([items[i].value for i in group], kw)
    except Exception as exc:  # nothing was submitted (the actor is gone for good)
        _failed(runner, items, group, exc)
        return
    runner.stats.batch_sizes[len(group)] += 1
    for i, call in zip(group, calls, strict=True):
        it = items[i]
        runner.adopt(index, it.req, call)
        it.value = call.value
        await runner._emit(it, slots[i] if slots else None)


async def _fetch(
    runner: NodeRunner,
    index: int,
    items: list[Item],
    slots: list[_Slot],
    group: list[int],
    kw: dict[str, Any],
) -> None:
    replica = runner.replica_objs[index]
    start = time.perf_counter()
    outcomes: list[tuple[float, Any]] | None = None
    with anyio.CancelScope() as scope:
        # The wait (and with it the call, in Ray) ends once every request did.
        live = len(group)

        def ended() -> None:
            nonlocal live
            live -= 1
            if live == 0:
                scope.cancel()

        owned = [(items[i].req, items[i].req.own(ended)) for i in group]
        try:
            outcomes = await replica.call_many([items[i].value for i in group], kw)
        except Exception as exc:  # nothing ran (the actor is gone for good)
            _failed(runner, items, group, exc)
            return
        finally:
            for req, handle in owned:
                req.disown(handle)
    stats = runner.stats
    if outcomes is None:  # every request ended meanwhile
        stats.cancelled += len(group)
        return
    end = time.perf_counter()
    stats.batch_sizes[len(group)] += 1
    tracer = runner.tracer
    for i, (seconds, out) in zip(group, outcomes, strict=True):
        it = items[i]
        req = it.req
        if isinstance(out, UpstreamFailed):
            stats.cancelled += 1  # the node that computed its input fails the request
        elif isinstance(out, BaseException):
            stats.failed += 1
            req.fail(node_error(runner.name, req, out))
        else:
            stats.busy_s[index] += seconds
            stats.service.append(seconds)
            if tracer is not None:
                tracer.compute(runner, index, (req,), max(start, end - seconds), end)
            it.value = out
            await runner._emit(it, slots[i] if slots else None)


def _failed(runner: NodeRunner, items: list[Item], group: list[int], exc: Exception) -> None:
    for i in group:
        req = items[i].req
        runner.stats.failed += 1
        req.fail(node_error(runner.name, req, exc))
