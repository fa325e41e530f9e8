"""Tensor sharding: one layer's weights split across parallel branches.

A ``Linear`` split by output columns gives each branch a slice of the outputs; a merge
concatenates them. Split by input rows, each branch multiplies its slice of the input
features by its slice of the weight and a merge adds the partial sums. A two-layer MLP
splits the first layer by columns and the second by rows (Megatron-LM's layout), so the
activation stays inside each branch and one sum merges them.

The branches are separate infer nodes fed by one upstream node (a fan-out), each with
its own placement and its own slice of the weights; the merge gathers the request's
parts from every branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import GraphError
from ..graph import Graph, Node, infer
from ..graph import map as map_node
from ._data import concat, sum_parts

__all__ = ["Sharded", "shard_linear", "shard_mlp"]


@dataclass(frozen=True)
class Sharded:
    """Branch nodes that each hold a slice of the weights, and the merge that joins them.

    Attributes:
        name: the prefix of the node names.
        branches: one infer node per slice, fed by the same upstream node.
        merge: the merge node gathering one part from every branch.
    """

    name: str
    branches: tuple[Node, ...]
    merge: Node

    def add_to(self, graph: Graph, upstream: Node | str) -> Node:
        """Add the branches (each fed by ``upstream``) and the merge to ``graph``.

        Returns:
            The merge node, to name as the upstream of what follows.
        """
        for branch in self.branches:
            graph.add(branch, upstream)
        return graph.add(self.merge, *self.branches)

    def graph(self, name: str | None = None) -> Graph:
        """A graph of its own: an entry node fanning out to the branches, then the merge."""
        graph = Graph(name or self.name)
        entry = graph.add(map_node(_identity, name=f"{self.name}.in"))
        self.add_to(graph, entry)
        graph.plan()
        return graph


def _identity(x: Any) -> Any:
    return x


class _Slice(nn.Module):
    """``F.linear`` of one slice: ``x[..., lo:hi] @ W.T (+ b)``, checking the input width."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, in_features: int, cols: slice
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self.in_features = in_features
        self.cols = cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected inputs with {self.in_features} features in the last dim, got "
                f"shape {tuple(x.shape)}"
            )
        return nn.functional.linear(x[..., self.cols], self.weight, self.bias)


def _check_parts(what: str, size: int, parts: int) -> int:
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise GraphError(f"{what}: parts must be an int >= 1, got {parts!r}")
    if size % parts:
        divisors = [d for d in range(1, min(size, 64) + 1) if size % d == 0]
        raise GraphError(
            f"{what}: {size} does not divide into {parts} equal parts; use one of "
            f"{', '.join(map(str, divisors))}"
        )
    return size // parts


def _placements(what: str, placements: str | Sequence[str], parts: int) -> list[str]:
    if isinstance(placements, str):
        return [placements] * parts
    chosen = list(placements)
    if len(chosen) != parts:
        raise GraphError(f"{what}: {len(chosen)} placements for {parts} parts")
    return chosen


def _branches(
    name: str, modules: list[nn.Module], placements: list[str], threads: int | None
) -> tuple[Node, ...]:
    return tuple(
        infer(module, name=f"{name}.{i}", placement=placements[i], threads=threads)
        for i, module in enumerate(modules)
    )


def shard_linear(
    layer: nn.Linear,
    parts: int,
    *,
    by: str = "columns",
    placements: str | Sequence[str] = "thread",
    threads: int | None = 1,
    name: str = "linear",
) -> Sharded:
    """Split an ``nn.Linear`` across ``parts`` branches.

    Args:
        layer: the layer (its weights are copied into the slices).
        parts: how many branches.
        by: ``"columns"`` (split the outputs, merge by concat along the last dim) or
            ``"rows"`` (split the inputs, merge by sum; the bias is added once).
        placements: one placement for every branch or one per branch.
        threads: torch intra-op threads per branch.
        name: the prefix of the node names (``NAME.0`` ... and ``NAME.merge``).

    Raises:
        GraphError: not an ``nn.Linear``, an unknown ``by``, or a size that ``parts``
            does not divide.
    """
    if not isinstance(layer, nn.Linear):
        raise GraphError(f"shard_linear {name!r}: needs an nn.Linear, got {type(layer).__name__}")
    weight, bias = layer.weight, layer.bias
    fan_in = layer.in_features
    chosen_placements = _placements(f"shard_linear {name!r}", placements, parts)
    modules: list[nn.Module] = []
    if by == "columns":
        step = _check_parts(f"shard_linear {name!r} out_features", layer.out_features, parts)
        for i in range(parts):
            rows = slice(i * step, (i + 1) * step)
            b = None if bias is None else bias[rows]
            modules.append(_Slice(weight[rows], b, fan_in, slice(None)))
        merge = concat(-1, name=f"{name}.merge")
    elif by == "rows":
        step = _check_parts(f"shard_linear {name!r} in_features", fan_in, parts)
        for i in range(parts):
            cols = slice(i * step, (i + 1) * step)
            modules.append(_Slice(weight[:, cols], bias if i == 0 else None, fan_in, cols))
        merge = sum_parts(name=f"{name}.merge")
    else:
        raise GraphError(f"shard_linear {name!r}: by must be 'columns' or 'rows', got {by!r}")
    return Sharded(name, _branches(name, modules, chosen_placements, threads), merge)


def shard_mlp(
    mlp: nn.Sequential,
    parts: int,
    *,
    placements: str | Sequence[str] = "thread",
    threads: int | None = 1,
    name: str = "mlp",
) -> Sharded:
    """Split a two-layer MLP ``nn.Sequential(Linear, activation, Linear)`` across
    ``parts`` branches: the first layer by columns, the second by rows, merged by sum.

    The activation must work element by element (ReLU, GELU, SiLU, Tanh, ...): each
    branch applies it to its own slice of the hidden units.

    Raises:
        GraphError: not that shape, or a hidden size ``parts`` does not divide.
    """
    what = f"shard_mlp {name!r}"
    layers = list(mlp.children()) if isinstance(mlp, nn.Sequential) else []
    if (
        len(layers) != 3
        or not isinstance(layers[0], nn.Linear)
        or not isinstance(layers[2], nn.Linear)
        or any(True for _ in layers[1].parameters())
    ):
        raise GraphError(
            f"{what}: needs nn.Sequential(nn.Linear, activation without weights, nn.Linear)"
        )
    fc1, act, fc2 = layers
    assert isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
    if fc1.out_features != fc2.in_features:
        raise GraphError(
            f"{what}: the first layer gives {fc1.out_features} features but the second "
            f"takes {fc2.in_features}"
        )
    step = _check_parts(f"{what} hidden size", fc1.out_features, parts)
    chosen_placements = _placements(what, placements, parts)
    modules: list[nn.Module] = []
    for i in range(parts):
        hidden = slice(i * step, (i + 1) * step)
        b1 = None if fc1.bias is None else fc1.bias[hidden]
        up = _Slice(fc1.weight[hidden], b1, fc1.in_features, slice(None))
        down = _Slice(fc2.weight[:, hidden], fc2.bias if i == 0 else None, step, slice(None))
        modules.append(nn.Sequential(up, act, down))
    merge = sum_parts(name=f"{name}.merge")
    return Sharded(name, _branches(name, modules, chosen_placements, threads), merge)
