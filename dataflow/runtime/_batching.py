"""Dynamic batching: collect items, call the body once, split the outputs back.

A worker takes up to ``max_size`` items; if fewer are ready it waits up to ``max_wait``
for more. Items whose request ended meanwhile are dropped before the call. Items with
different per-request parameters go in separate calls. If the batched call raises, the
batch is bisected until the guilty items are alone, so only their requests fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from ..graph import Batch
from ._request import PENDING, Item

if TYPE_CHECKING:
    from ._worker import NodeRunner

__all__ = ["collate", "run_batch", "run_batching_worker", "split"]


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
            return torch.as_tensor(values)
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
        raise ValueError(f"batched body returned {len(parts)} outputs for {n} inputs")
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


async def run_batching_worker(runner: NodeRunner, index: int) -> None:
    """One replica's loop for a node with ``batch=``."""
    batch = runner.node.batch
    assert batch is not None  # the runner only calls this for batched nodes
    inbox = runner.inbox
    stats = runner.stats
    max_size = batch.max_size
    while True:
        items = inbox.take(max_size)
        if not items:
            if not await inbox.wait_readable():
                return
            continue
        started = time.perf_counter()
        if len(items) < max_size and batch.max_wait > 0:
            with anyio.move_on_after(batch.max_wait):
                while len(items) < max_size:
                    more = inbox.take(max_size - len(items))
                    if more:
                        items.extend(more)
                    elif not await inbox.wait_readable():
                        break
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
            bid = None if tracer is None else tracer.batch_wait(runner, index, group, started, closed)
            await _execute(runner, index, group, bid)


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
    runner: NodeRunner, index: int, items: list[Item], batch_id: int | None = None
) -> None:
    """Run one batch; on failure bisect so that only the guilty requests fail."""
    batch = runner.node.batch
    assert batch is not None
    kw = runner._kwargs(items[0].req)
    replica = runner.replica_objs[index]
    values = [it.value for it in items]
    start = time.perf_counter()
    try:
        outputs = await replica.call_batch(batch, values, kw)
    except Exception as exc:
        end = time.perf_counter()
        runner.stats.busy_s[index] += end - start
        if runner.tracer is not None:
            runner.tracer.compute(runner, index, [it.req for it in items], start, end, batch_id)
        if len(items) == 1:
            runner.fail_pending(items[0].req, exc)
            return
        half = len(items) // 2
        await _execute(runner, index, items[:half], batch_id)
        await _execute(runner, index, items[half:], batch_id)
        return
    end = time.perf_counter()
    runner.stats.busy_s[index] += end - start
    runner.stats.service.append(end - start)
    if runner.tracer is not None:
        runner.tracer.compute(runner, index, [it.req for it in items], start, end, batch_id)
    for it, out in zip(items, outputs, strict=True):
        it.value = out
        await runner.emit(it)
