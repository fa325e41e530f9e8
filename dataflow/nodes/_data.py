"""Data sharding: split a batch along dim 0, run the parts apart, merge them in order.

:func:`split_batch` is a shard node and :func:`concat` / :func:`sum_parts` are merge
nodes that check the parts' shapes before combining them, so a part of the wrong shape
fails its request with a message naming the part instead of a bare ``torch.cat`` error.
The engine tags every part with its request and index, so parts of concurrent requests
never mix and the merge receives them in index order whatever replica finished first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._errors import GraphError
from ..graph import Chain, Node, infer, merge, shard

__all__ = ["concat", "data_parallel", "split_batch", "sum_parts"]


def _rows(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise ValueError("cannot split a 0-d tensor along dim 0")
        return int(value.shape[0])
    if (
        isinstance(value, tuple | list)
        and value
        and all(isinstance(v, torch.Tensor) for v in value)
    ):
        rows = {int(v.shape[0]) if v.dim() else -1 for v in value}
        if len(rows) != 1 or -1 in rows:
            shapes = ", ".join(str(tuple(v.shape)) for v in value)
            raise ValueError(f"tensors to split together differ in dim 0: {shapes}")
        return rows.pop()
    raise TypeError(f"split_batch takes a tensor or a tuple of tensors, got {type(value).__name__}")


def _split_rows(value: Any, bounds: list[int]) -> list[Any]:
    if isinstance(value, torch.Tensor):
        return list(torch.tensor_split(value, bounds))
    columns = [torch.tensor_split(v, bounds) for v in value]
    return [tuple(col[i] for col in columns) for i in range(len(bounds) + 1)]


def split_batch(
    parts: int | None = None,
    *,
    size: int | None = None,
    even: bool = False,
    name: str = "split_batch",
    **options: Any,
) -> Node:
    """A shard node that splits a batch (a tensor, or a tuple of tensors with the same
    dim 0) along dim 0.

    Args:
        parts: split into this many parts of nearly equal rows (the first ones larger).
        size: or: parts of ``size`` rows each, the last one smaller if need be.
        even: with ``parts``, require the rows to divide evenly.
        name: the node's name.
        **options: more node options (``capacity``, ...).

    Raises:
        GraphError: neither or both of ``parts`` and ``size``, or not an int >= 1.

    The node fails a request (``NodeError`` naming it) whose batch has fewer rows than
    ``parts``, or, with ``even``, rows that ``parts`` does not divide.
    """
    if (parts is None) == (size is None):
        raise GraphError(f"split_batch {name!r}: give exactly one of parts= or size=")
    count = parts if parts is not None else size
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        what = "parts" if parts is not None else "size"
        raise GraphError(f"split_batch {name!r}: {what} must be an int >= 1, got {count!r}")

    def split(value: Any) -> list[Any]:
        rows = _rows(value)
        if parts is not None:
            if rows < parts:
                raise ValueError(f"a batch of {rows} rows cannot be split into {parts} parts")
            if even and rows % parts:
                raise ValueError(f"a batch of {rows} rows does not divide into {parts} equal parts")
            base, extra = divmod(rows, parts)
            bounds, at = [], 0
            for i in range(parts - 1):
                at += base + (i < extra)
                bounds.append(at)
        else:
            assert size is not None
            if rows == 0:
                raise ValueError("cannot split an empty batch")
            bounds = list(range(size, rows, size))
        return _split_rows(value, bounds)

    split.__name__ = name
    return shard(split, name=name, **options)


def _check_shapes(parts: Sequence[Any], dim: int | None, what: str) -> None:
    """Raise ValueError naming the first part whose shape disagrees with part 0."""
    if not parts:
        raise ValueError(f"{what}: no parts to merge")
    for i, part in enumerate(parts):
        if not isinstance(part, torch.Tensor):
            raise TypeError(f"{what}: part {i} is a {type(part).__name__}, not a tensor")
    first = parts[0]
    ndim = first.dim()
    axis = None if dim is None else dim % ndim if ndim else dim
    for i, part in enumerate(parts[1:], start=1):
        same = part.dim() == ndim and all(
            a == b
            for k, (a, b) in enumerate(zip(part.shape, first.shape, strict=True))
            if k != axis
        )
        if not same:
            rule = "have one shape" if dim is None else f"agree on every dimension but dim {dim}"
            raise ValueError(
                f"{what}: part {i} has shape {tuple(part.shape)} but part 0 has "
                f"{tuple(first.shape)}; parts must {rule}"
            )
        if part.device != first.device or part.dtype != first.dtype:
            raise ValueError(
                f"{what}: part {i} is {part.dtype} on {part.device} but part 0 is "
                f"{first.dtype} on {first.device}"
            )


def concat(dim: int = 0, *, name: str = "concat", **options: Any) -> Node:
    """A merge node that concatenates tensor parts along ``dim`` after checking that
    they agree on every other dimension (a mismatch fails the request, naming the part).
    """

    def combine(parts: list[torch.Tensor]) -> torch.Tensor:
        _check_shapes(parts, dim, f"concat along dim {dim}")
        return torch.cat(parts, dim=dim)

    combine.__name__ = name
    return merge(combine, name=name, **options)


def sum_parts(*, name: str = "sum_parts", **options: Any) -> Node:
    """A merge node that adds tensor parts of one shape (a mismatch fails the request)."""

    def combine(parts: list[torch.Tensor]) -> torch.Tensor:
        _check_shapes(parts, None, "sum")
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total

    combine.__name__ = name
    return merge(combine, name=name, **options)


def data_parallel(
    module: nn.Module | Any,
    replicas: int,
    *,
    parts: int | None = None,
    placement: str = "thread",
    threads: int | None = 1,
    name: str = "data_parallel",
    **options: Any,
) -> Chain:
    """Split each batch along dim 0, run the parts on ``replicas`` copies of ``module``,
    concatenate the results in order: ``split >> infer(replicas=...) >> concat``.

    Args:
        module: the model (an ``nn.Module`` or any callable body for :func:`df.infer`).
        replicas: how many replicas run parts at once.
        parts: parts per batch (default ``replicas``).
        placement: where the replicas run (``"thread"``, ``"cuda:N"``, ...).
        threads: torch intra-op threads per replica (None: share the cores).
        name: prefix of the three node names (``NAME.split``, ``NAME``, ``NAME.merge``).
        **options: more options for the infer node.
    """
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise GraphError(f"data_parallel {name!r}: replicas must be an int >= 1")
    split = split_batch(parts if parts is not None else replicas, name=f"{name}.split")
    # The merge puts parts back by index, so replicas need not keep order among themselves.
    body = infer(
        module,
        name=name,
        placement=placement,
        replicas=replicas,
        threads=threads,
        ordered=False,
        **options,
    )
    return split >> body >> concat(0, name=f"{name}.merge")
