"""Model-stage splitting: pipeline parallelism over a chain of infer nodes.

:func:`split_stages` cuts a model made of blocks that run one after another into
contiguous stages, each an ``infer`` node with its own placement (a thread with one
intra-op thread on CPU, ``cuda:i`` on GPUs). With micro-batching, each input batch is
split along dim 0, the micro-batches stream through the stages over bounded channels —
stage ``s`` works on micro-batch ``j`` while stage ``s+1`` works on ``j-1``, as in GPipe —
and are concatenated back in order.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._errors import GraphError
from ..graph import Chain, Node, infer
from ..graph import _placement as placement_mod
from ._data import concat, split_batch

__all__ = ["blocks_of", "measure_blocks", "partition", "split_stages"]


def blocks_of(module: nn.Module, blocks: str | None = None) -> list[tuple[str, nn.Module]]:
    """The named blocks of ``module``, in the order they run.

    Args:
        module: an ``nn.Sequential``, an ``nn.ModuleList``, or a module holding its
            blocks in one ``nn.ModuleList``/``nn.Sequential`` attribute and nothing else
            with parameters (its ``forward`` must apply the blocks one after another).
        blocks: the name of that attribute (found automatically when there is one).

    Raises:
        GraphError: no block list can be found, or the module has parameters outside it
            (an embedding or a head the stages would silently drop).
    """
    if not isinstance(module, nn.Module):
        raise GraphError(f"split_stages needs an nn.Module, got {type(module).__name__}")
    kind = type(module).__name__
    if blocks is None and isinstance(module, nn.Sequential | nn.ModuleList):
        found: nn.Module = module
    else:
        lists = {
            n: m for n, m in module.named_children() if isinstance(m, nn.ModuleList | nn.Sequential)
        }
        if blocks is not None:
            if blocks not in lists:
                raise GraphError(
                    f"{kind} has no nn.ModuleList or nn.Sequential attribute {blocks!r}; "
                    f"it has: {', '.join(lists) or 'none'}"
                )
            found = lists[blocks]
        elif len(lists) == 1:
            blocks, found = next(iter(lists.items()))
        else:
            raise GraphError(
                f"cannot tell the blocks of {kind}: it has "
                f"{len(lists)} block lists ({', '.join(lists) or 'none'}); pass blocks='name' "
                "or give an nn.Sequential"
            )
        inside = {id(p) for p in found.parameters()} | {id(b) for b in found.buffers()}
        outside = [
            n
            for n, t in (*module.named_parameters(), *module.named_buffers())
            if id(t) not in inside
        ]
        if outside:
            raise GraphError(
                f"{kind} has weights outside its block list {blocks!r} "
                f"({', '.join(outside[:4])}{', ...' if len(outside) > 4 else ''}); split an "
                f"nn.Sequential of every step instead, e.g. nn.Sequential(embed, *blocks, head)"
            )
    named = list(found.named_children())
    if not named:
        raise GraphError(f"{kind} has no blocks to split")
    return named


def partition(costs: Sequence[float], stages: int) -> list[int]:
    """Split blocks with ``costs`` into ``stages`` contiguous non-empty groups that
    minimise the largest group's total (the pipeline's bottleneck).

    Returns:
        The index of the first block of each stage after the first (``stages - 1``
        increasing split points).

    Raises:
        GraphError: ``stages`` is not between 1 and ``len(costs)``.
    """
    n = len(costs)
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise GraphError(f"stages must be an int >= 1, got {stages!r}")
    if stages > n:
        raise GraphError(f"cannot make {stages} stages from {n} block(s); use at most {n}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[j][i]: the smallest bottleneck covering blocks [0, i) with j stages.
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    for i in range(1, n + 1):
        best[1][i] = prefix[i]
    for j in range(2, stages + 1):
        for i in range(j, n + 1):
            for k in range(j - 1, i):
                value = max(best[j - 1][k], prefix[i] - prefix[k])
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, k
    points: list[int] = []
    i = n
    for j in range(stages, 1, -1):
        i = cut[j][i]
        points.append(i)
    return points[::-1]


def measure_blocks(
    blocks: Sequence[nn.Module], sample: Any, *, repeats: int = 3, threads: int | None = 1
) -> list[float]:
    """Median seconds each block takes on the output of the blocks before it, measured
    in a fresh thread with ``threads`` intra-op threads (as a stage will run).

    Raises:
        GraphError: a block raised on the sample (the cause is chained).
    """
    result: list[float] = []
    failure: list[BaseException] = []

    def run() -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        x = sample
        with torch.inference_mode():
            for i, block in enumerate(blocks):
                try:
                    block.eval()
                    out = block(x)  # warm-up: allocator, lazy init
                    times = []
                    for _ in range(max(1, repeats)):
                        start = time.perf_counter()
                        out = block(x)
                        times.append(time.perf_counter() - start)
                except Exception as exc:
                    failure.append(GraphError(f"block {i} failed on the sample: {exc}"))
                    failure[-1].__cause__ = exc
                    return
                result.append(statistics.median(times))
                x = out

    worker = threading.Thread(target=run, name="dataflow:measure_blocks")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result


def _split_points(named: list[tuple[str, nn.Module]], points: Sequence[int | str]) -> list[int]:
    n = len(named)
    names = {name: i for i, (name, _) in enumerate(named)}
    valid = ", ".join(repr(k) for k in list(names)[1:8]) + (", ..." if n > 8 else "")
    out: list[int] = []
    for p in points:
        if isinstance(p, str):
            if p not in names:
                raise GraphError(
                    f"split point {p!r} is not a block of the module; blocks after the "
                    f"first: {valid}"
                )
            index = names[p]
        elif isinstance(p, int) and not isinstance(p, bool):
            index = p
        else:
            raise GraphError(f"split point {p!r} must be a block index or name")
        if not 0 < index < n:
            raise GraphError(
                f"split point {p!r} does not exist: a stage starts at a block index from 1 "
                f"to {n - 1} (the module has {n} blocks)"
            )
        if out and index <= out[-1]:
            raise GraphError(
                f"split points must increase: {p!r} (block {index}) comes after block {out[-1]}"
            )
        out.append(index)
    return out


def _is_cuda(placement: str, gpus: int) -> bool:
    return placement.startswith("cuda") or (placement == "auto" and gpus > 0)


def split_stages(
    module: nn.Module,
    *,
    stages: int | None = None,
    split_points: Sequence[int | str] | None = None,
    balance: str = "params",
    sample: Any = None,
    blocks: str | None = None,
    placements: str | Sequence[str] | None = None,
    micro_batch: int | None = None,
    micro_batches: int | None = None,
    threads: int | None = 1,
    capacity: int | None = None,
    name: str = "stage",
) -> Chain:
    """Split ``module`` into a chain of infer nodes, one per stage (pipeline parallelism).

    Give either ``split_points`` or ``stages``. Stage ``i`` is the node ``NAME.i`` whose
    body is an ``nn.Sequential`` of its blocks. With ``micro_batch`` or
    ``micro_batches`` the chain starts with ``NAME.split`` (a shard along dim 0) and ends
    with ``NAME.merge`` (a concat in order), so the stages work on different
    micro-batches of one request at once; without, stages overlap across requests.

    Args:
        module: see :func:`blocks_of`.
        stages: make this many stages, balanced by ``balance``.
        split_points: or: the blocks (index or name) at which stages 1, 2, ... start.
        balance: ``"params"`` (parameter count) or ``"time"`` (measured on ``sample``).
        sample: an input for ``balance="time"``.
        blocks: the name of the block-list attribute of a non-Sequential module.
        placements: one placement for every stage or one per stage; default
            ``"cuda:i"`` spread over the GPUs when there are any, else ``"thread"``.
        micro_batch: rows per micro-batch (the last may be smaller).
        micro_batches: or: micro-batches per input batch (nearly equal rows).
        threads: torch intra-op threads per stage (1: one core per stage).
        capacity: the input capacity of each stage, in micro-batches.
        name: the prefix of the node names.

    Returns:
        The chain ``[NAME.split >>] NAME.0 >> ... >> NAME.{p-1} [>> NAME.merge]``.

    Raises:
        GraphError: split points that do not exist, are out of order or empty stages;
            more stages than blocks; both or neither of ``stages``/``split_points``; a
            placement list of the wrong length; an unknown ``balance``; or what
            :func:`blocks_of` raises.

    CUDA stages move their blocks to their device (in place, like ``module.to``).
    Consecutive CUDA stages hand tensors over on the device, each on its own stream.
    """
    named = blocks_of(module, blocks)
    if (stages is None) == (split_points is None):
        raise GraphError("split_stages: give exactly one of stages= or split_points=")
    if micro_batch is not None and micro_batches is not None:
        raise GraphError("split_stages: give at most one of micro_batch= or micro_batches=")
    for what, value in (("micro_batch", micro_batch), ("micro_batches", micro_batches)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise GraphError(f"split_stages: {what} must be an int >= 1, got {value!r}")
    if split_points is not None:
        if isinstance(split_points, str | int):
            raise GraphError("split_points must be a list of block indices or names")
        points = _split_points(named, split_points)
    else:
        assert stages is not None
        if balance == "params":
            costs: list[float] = [
                float(sum(p.numel() for p in block.parameters())) for _, block in named
            ]
            if not any(costs):
                costs = [1.0] * len(named)
        elif balance == "time":
            if sample is None:
                raise GraphError("split_stages: balance='time' needs a sample= input to time")
            costs = measure_blocks([b for _, b in named], sample, threads=threads)
        else:
            raise GraphError(f"split_stages: balance must be 'params' or 'time', got {balance!r}")
        points = partition(costs, stages)

    bounds = [0, *points, len(named)]
    count = len(bounds) - 1
    gpus = placement_mod.cuda_device_count()
    if placements is None:
        chosen = [f"cuda:{i * gpus // count}" if gpus else "thread" for i in range(count)]
    elif isinstance(placements, str):
        chosen = [placements] * count
    else:
        chosen = list(placements)
        if len(chosen) != count:
            raise GraphError(
                f"split_stages: {len(chosen)} placements for {count} stages; give one per "
                "stage or a single string"
            )

    nodes: list[Node] = []
    for i in range(count):
        lo, hi = bounds[i], bounds[i + 1]
        body = nn.Sequential(OrderedDict(named[lo:hi]))
        # Hand tensors on over the device only when the next stage is on a GPU too.
        device_out = i + 1 < count and _is_cuda(chosen[i], gpus) and _is_cuda(chosen[i + 1], gpus)
        nodes.append(
            infer(
                body,
                name=f"{name}.{i}",
                placement=chosen[i],
                threads=threads,
                capacity=capacity,
                options={"cuda_output": "device"} if device_out else None,
            )
        )
    if micro_batch is not None or micro_batches is not None:
        first = split_batch(micro_batches, size=micro_batch, name=f"{name}.split")
        nodes = [first, *nodes, concat(0, name=f"{name}.merge")]
    return Chain(tuple(nodes))
