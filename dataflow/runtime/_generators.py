"""Generator bodies on the general path: each output emitted as it is yielded.

A generator whose stream's reader is behind waits for it in a task of its own (the
engine's task group), so the node's workers move on to other requests; outputs that must
keep their order (an ordered, replicated node) wait in place instead. A Ray generator's
stream stays with the lane that opened it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio

from ._request import PENDING, SUCCEEDED, Item, Request, Tag, node_error

if TYPE_CHECKING:
    from ._ordering import _Slot
    from ._worker import NodeRunner

__all__ = ["run_generator"]


async def run_generator(
    runner: NodeRunner, index: int, it: Item, kw: dict[str, Any], collect: _Slot | None
) -> None:
    """Run a generator body on ``it``, emitting (or collecting) each output."""
    req = it.req
    outs: Any = runner.replica_objs[index].iterate(it.value, kw)
    try:
        if await _pump(runner, index, req, it.tag, outs, collect, 0):
            outs = None  # it goes on in a task of its own, which closes it
    finally:
        if outs is not None:
            await outs.aclose()
    if outs is not None:
        req.release(1)


async def _pump(
    runner: NodeRunner,
    index: int,
    req: Request,
    tag: Tag,
    outs: Any,
    collect: _Slot | None,
    i: int,
    detached: bool = False,
) -> bool:
    """Emit a generator's outputs; True if it was handed to a task of its own
    because its stream's reader is behind. A generator for a stream whose buffer is
    full waits for its reader (in that task, so this node's workers move on): what a
    stream holds is its buffer plus what was already on its way to the exit."""
    # (Not a Ray generator: its stream stays with the lane that opened it.)
    detach = collect is None and runner.tg is not None and not runner._interruptible
    while True:
        start = time.perf_counter()
        try:
            value = await anext(outs)
        except StopAsyncIteration:
            return False
        finally:
            runner._computed(index, req, start)
        if req.state != PENDING:
            return False
        req.outstanding += 1
        item = Item(req, value, (*tag, (i, 0)))
        i += 1
        if req.streaming and req.behind:
            # The reader is behind: only this request's generator waits for it (in
            # a task of its own; in place where outputs must keep their order).
            if detach and not detached:
                runner.detached += 1
                runner.tg.start_soon(_go_on, runner, index, item, outs, i)
                return True
            await req.wait_reader()
            if req.state != PENDING:
                return False
        await runner._emit(item, collect)
        if req.state != PENDING:
            return False


async def _go_on(runner: NodeRunner, index: int, item: Item, outs: Any, i: int) -> None:
    """The rest of a detached generator: wait for the reader, then go on."""
    req = item.req
    handed = False
    try:
        with anyio.CancelScope() as scope:
            handle = req.own(lambda: scope.cancel() if req.state != SUCCEEDED else None)
            try:
                await req.wait_reader()
                if req.state == PENDING:
                    await runner.emit(item)
                if req.state == PENDING:
                    handed = await _pump(runner, index, req, item.tag[:-1], outs, None, i, True)
            except Exception as exc:
                runner.stats.failed += 1
                req.fail(node_error(runner.name, req, exc))
            finally:
                req.disown(handle)
        if scope.cancelled_caught:
            runner.stats.cancelled += 1
    finally:
        runner.detached -= 1
        if not handed:
            with anyio.CancelScope(shield=True):
                await outs.aclose()
            req.release(1)
