"""Dynamic batching: collect items, call the body once, split the outputs back.

A worker takes up to ``max_size`` items; if fewer are ready it waits up to ``max_wait``
for more. Items whose request ended meanwhile are dropped before the call (and again
before each part of a split batch). Items with different per-request parameters go in
separate calls. If the batched call raises, the batch is bisected until the guilty items
are alone, so only their requests fail; a call past the node's ``timeout`` fails its
whole batch. With several replicas one collects at a time, and with ``ordered=True``
each batch's outputs are released in the order its items were taken (the runner's
bounded reorder buffer).
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from ..graph import Batch
from ._request import PENDING, Item

if TYPE_CHECKING:
    from ._worker import NodeRunner

__all__ = ["BatchError", "collate", "run_batch", "run_batching_worker", "split"]


class BatchError(ValueError):
    """A batch that cannot be built or split as configured: every item of it fails
    (bisecting would hide it by running items one at a time)."""


def collate(batch: Batch, values: list[Any]) -> Any:
    """Build the body's input from ``values`` as ``batch.collate`` says."""
    how = batch.collate
    if callable(how):
        return how(values)
    if how == "list":
        return values
    import torch

    if how == "stack":
        if not isinstance(values[0], torch.Tensor):
            try:
                return torch.as_tensor(values)
            except (ValueError, TypeError) as exc:
                raise BatchError(
                    f"collate='stack' cannot stack {len(values)} inputs ({exc}); inputs "
                    "of different lengths need collate='pad' or a collate callable"
                ) from exc
        shapes = {tuple(v.shape) for v in values if isinstance(v, torch.Tensor)}
        if len(shapes) > 1 or not all(isinstance(v, torch.Tensor) for v in values):
            listed = ", ".join(str(list(shape)) for shape in sorted(shapes)[:4])
            raise BatchError(
                f"collate='stack' got inputs of different shapes ({listed}); inputs of "
                "different lengths need collate='pad' or a collate callable"
            )
        return torch.stack(values)
    # pad: 1-d (or [L, ...]) tensors padded along dim 0 to the longest
    lengths = torch.tensor([v.shape[0] for v in values], dtype=torch.long)
    longest = int(lengths.max())
    first = values[0]
    padded = first.new_full((len(values), longest, *first.shape[1:]), batch.pad_value)
    for i, v in enumerate(values):
        padded[i, : v.shape[0]] = v
    return padded, lengths


def split(batch: Batch, output: Any, n: int) -> list[Any]:
    """One output per item, from the body's batched output."""
    custom = batch.split
    parts = list(custom(output, n)) if custom is not None else _default_split(output, n)
    if len(parts) != n:
        raise BatchError(
            f"batched body returned {len(parts)} outputs for {n} inputs (expected {n})"
        )
    return parts


def _default_split(output: Any, n: int) -> list[Any]:
    import torch

    if isinstance(output, torch.Tensor):
        return list(output.unbind(0))
    if isinstance(output, tuple) and output and all(isinstance(o, torch.Tensor) for o in output):
        return [tuple(col) for col in zip(*(o.unbind(0) for o in output), strict=True)]
    if isinstance(output, dict):
        keys = list(output)
        columns = [_default_split(output[k], n) for k in keys]
        return [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)]
    if isinstance(output, Sequence) and not isinstance(output, str | bytes):
        return list(output)
    raise TypeError(
        f"cannot split a batched output of type {type(output).__name__}; pass Batch(split=...)"
    )


def run_batch(
    fn: Callable[..., Any], batch: Batch, values: list[Any], kw: dict[str, Any]
) -> list[Any]:
    """Collate, call ``fn`` once, split: runs where the replica runs."""
    return split(batch, fn(collate(batch, values), **kw), len(values))


class _Collector:
    """Lets one replica at a time collect a batch.

    Replicas collecting side by side would split the arrivals into half-full batches,
    and with ``ordered=True`` a batch's place in the output order must be the order its
    items were taken in: whoever collects takes its sequence number before handing over.
    """

    __slots__ = ("busy", "waiters")

    def __init__(self) -> None:
        self.busy = False
        self.waiters: deque[Any] = deque()


_COLLECTORS: weakref.WeakKeyDictionary[NodeRunner, _Collector] = weakref.WeakKeyDictionary()


async def run_batching_worker(runner: NodeRunner, index: int) -> None:
    """One replica's loop for a node with ``batch=``."""
    batch = runner.node.batch
    assert batch is not None  # the runner only calls this for batched nodes
    backend = runner.backend
    stats = runner.stats
    ordered = runner._ordered
    # Lanes take turns (several per replica when a Ray actor keeps calls in flight).
    collector = _COLLECTORS.setdefault(runner, _Collector()) if runner.worker_count() > 1 else None
    while True:
        if ordered:
            # Bounded reorder buffer: at most ``window`` batches taken but not yet released.
            while runner._seq - runner._head >= runner._window:
                await backend.park(runner._window_waiters)
        seq = -1
        if collector is not None:
            while collector.busy:
                await backend.park(collector.waiters)
            collector.busy = True
        try:
            items, started = await _collect(runner, batch)
            if ordered and items:
                seq = runner._seq
                runner._seq += 1
        finally:
            if collector is not None:
                collector.busy = False
                backend.wake(collector.waiters)
        if not items:
            return  # the input ended
        outs: list[Item] | None = [] if ordered else None
        try:
            stats.items_in += len(items)
            live = [it for it in items if it.req.state == PENDING]
            stats.cancelled += len(items) - len(live)
            if not live:
                continue
            closed = time.perf_counter()
            waited = closed - started
            tracer = runner.tracer
            for group in _by_params(runner, live):
                stats.batch_sizes[len(group)] += 1
                stats.batch_wait.append(waited)
                bid = (
                    None
                    if tracer is None
                    else tracer.batch_wait(runner, index, group, started, closed)
                )
                await _execute(runner, index, group, bid, outs)
        finally:
            if outs is not None:
                # Even an empty batch takes its turn, or later batches would wait forever.
                await runner._deposit(seq, outs)


async def _collect(runner: NodeRunner, batch: Batch) -> tuple[list[Item], float]:
    """Up to ``max_size`` items, waiting at most ``max_wait`` after the first; ``[]``
    once the input has ended."""
    inbox = runner.inbox
    max_size = batch.max_size
    while True:
        items = inbox.take(max_size)
        if items:
            break
        if not await inbox.wait_readable():
            return [], 0.0
    started = time.perf_counter()
    if len(items) < max_size and batch.max_wait > 0:
        with anyio.move_on_after(batch.max_wait):
            while len(items) < max_size:
                more = inbox.take(max_size - len(items))
                if more:
                    items.extend(more)
                elif not await inbox.wait_readable():
                    break
    return items, started


def _by_params(runner: NodeRunner, items: list[Item]) -> list[list[Item]]:
    if not runner.node.info.params and not runner.node.info.accepts_any_param:
        return [items]
    groups: dict[Any, list[Item]] = {}
    for it in items:
        kw = runner._kwargs(it.req)
        try:
            key: Any = tuple(sorted(kw.items()))
            hash(key)
        except TypeError:
            key = id(it)
        groups.setdefault(key, []).append(it)
    return list(groups.values())


async def _execute(
    runner: NodeRunner,
    index: int,
    items: list[Item],
    batch_id: int | None = None,
    outs: list[Item] | None = None,
) -> None:
    """Run one batch; on failure bisect so that only the guilty requests fail.

    Outputs go downstream at once, or into ``outs`` when the node keeps order across
    replicas.
    """
    batch = runner.node.batch
    assert batch is not None
    live = [it for it in items if it.req.state == PENDING]
    if len(live) < len(items):
        # Cancelled while an earlier group or half of this batch ran: not computed.
        runner.stats.cancelled += len(items) - len(live)
        items = live
        if not items:
            return
    kw = runner._kwargs(items[0].req)
    replica = runner.replica_objs[index]
    values = [it.value for it in items]
    timeout = runner.node.timeout
    start = time.perf_counter()
    whole = False  # fail the whole batch: bisecting would not help
    try:
        if timeout is None:
            outputs = await replica.call_batch(batch, values, kw)
        else:
            with anyio.move_on_after(timeout) as scope:
                outputs = await replica.call_batch(batch, values, kw)
            if scope.cancelled_caught:
                # A batch that ran out of time fails whole: bisecting would rerun it
                # slowly. (A TimeoutError the body raises itself is bisected.)
                whole = True
                raise TimeoutError(
                    f"batch of {len(items)} took longer than the node's timeout={timeout}s"
                )
        if len(outputs) != len(items):
            raise BatchError(
                f"batched body returned {len(outputs)} outputs for {len(items)} inputs"
            )
    except Exception as exc:
        end = time.perf_counter()
        runner.stats.busy_s[index] += end - start
        if runner.tracer is not None:
            runner.tracer.compute(runner, index, [it.req for it in items], start, end, batch_id)
        if whole or len(items) == 1 or isinstance(exc, BatchError):
            for it in items:
                runner.fail_pending(it.req, exc)
            return
        half = len(items) // 2
        await _execute(runner, index, items[:half], batch_id, outs)
        await _execute(runner, index, items[half:], batch_id, outs)
        return
    end = time.perf_counter()
    runner.stats.busy_s[index] += end - start
    runner.stats.service.append(end - start)
    if runner.tracer is not None:
        runner.tracer.compute(runner, index, [it.req for it in items], start, end, batch_id)
    for it, out in zip(items, outputs, strict=True):
        it.value = out
        if outs is not None:
            outs.append(it)
        else:
            await runner.emit(it)
