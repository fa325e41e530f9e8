"""Borrowing: a caller runs an idle node's next item in its own task.

A request entering an idle graph (``Engine.run``) would otherwise cost three task
switches on top of the body: wake the worker, run, wake the caller. While the node's
only worker waits on an empty input, the caller runs the item itself, exactly as the
worker would, and the worker (if woken meanwhile) waits until the borrow ends, so the
order of items is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from ._backend import Abandoned
from ._channel import Channel
from ._request import SUCCEEDED, Item, Sink, node_error
from .executors import ThreadReplica

if TYPE_CHECKING:
    from ._worker import NodeRunner

__all__ = ["borrow"]


async def borrow(runner: NodeRunner, it: Item) -> None:
    """Process ``it`` in the caller's task, as the worker would.

    A request entering an idle graph then costs one switch to the replica's thread
    and back, not three task switches on top. The worker, if woken meanwhile,
    waits until the borrow ends, so the order of items is kept. If the request
    ends first (deadline, shutdown), the caller stops waiting for the body at once,
    as it would have waiting for the worker.
    """
    runner._borrowed = True
    try:
        replica = runner.replica_objs[0]
        if (
            isinstance(replica, ThreadReplica)
            and runner.node.info.mode == "function"
            and runner.node.kind != "shard"
            and runner.node.timeout is None
        ):
            await _thread_call(runner, replica, it)
            return
        runner.stats.items_in += 1
        runner.inbox.stats.items += 1  # it crossed the edge, if not the queue
        await runner._process(0, it, None, scoped=True)
    finally:
        runner._borrowed = False
        if runner._borrow_waiters:
            runner.backend.wake_all(runner._borrow_waiters)


async def _thread_call(runner: NodeRunner, replica: ThreadReplica, it: Item) -> None:
    """The common borrow — one call into the replica's thread — without a cancel
    scope: the request's end abandons the wait directly."""
    req = it.req
    runner.stats.items_in += 1
    runner.inbox.stats.items += 1

    handle = 0

    def on_end(give_up: Callable[[], None]) -> None:
        nonlocal handle
        handle = req.own(give_up)

    start = time.perf_counter()
    try:
        it.value = await replica.call_until(it.value, runner._kwargs(req), on_end)
    except Abandoned:
        runner.stats.cancelled += 1  # its request ended while the body ran
        return
    except Exception as exc:
        runner.stats.failed += 1
        req.fail(node_error(runner.name, req, exc))
        return
    finally:
        req.disown(handle)
        runner._computed(0, req, start)
    out = runner.outputs[0][0] if len(runner.outputs) == 1 else None
    if (type(out) is Channel and len(out) < out.capacity) or type(out) is Sink:
        # Room, or the sink of a request that is not a stream: this does not wait.
        await runner.emit(it)
        return
    # The output may be full: stop waiting for room if the request ends meanwhile.
    with anyio.CancelScope() as scope:
        handle = req.own(lambda: scope.cancel() if req.state != SUCCEEDED else None)
        try:
            await runner.emit(it)
        finally:
            req.disown(handle)
