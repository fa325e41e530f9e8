"""Tensor sharding: a Linear or MLP split across branches equals the unsharded layer."""

from __future__ import annotations

import anyio
import pytest
import torch
from torch import nn

import dataflow as df
from dataflow.nodes import shard_linear, shard_mlp

pytestmark = pytest.mark.anyio


def _reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module.eval()(x)


async def _run_all(graph: df.Graph, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    results: dict[int, torch.Tensor] = {}
    async with df.Engine(graph) as engine:

        async def one(i: int) -> None:
            results[i] = await engine.run(inputs[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(inputs)):
                tg.start_soon(one, i)
    return [results[i] for i in range(len(inputs))]


@pytest.mark.parametrize("by", ["columns", "rows"])
async def test_sharded_linear_equals_the_layer_for_concurrent_requests(by: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 6)
    sharded = shard_linear(layer, 3, by=by)
    assert [b.name for b in sharded.branches] == ["linear.0", "linear.1", "linear.2"]
    inputs = [torch.randn(4, 12) * (i + 1) for i in range(24)]
    outs = await _run_all(sharded.graph(), inputs)
    for x, out in zip(inputs, outs, strict=True):
        torch.testing.assert_close(out, _reference(layer, x))


async def test_each_branch_holds_only_its_slice() -> None:
    layer = nn.Linear(8, 4)
    cols = shard_linear(layer, 2, by="columns")
    rows = shard_linear(layer, 2, by="rows")
    assert [tuple(b.body.weight.shape) for b in cols.branches] == [(2, 8), (2, 8)]
    assert [tuple(b.body.weight.shape) for b in rows.branches] == [(4, 4), (4, 4)]
    # The bias is added once, by the first row shard.
    assert [b.body.bias is not None for b in rows.branches] == [True, False]


@pytest.mark.parametrize("bias", [True, False])
async def test_sharded_mlp_equals_the_mlp(bias: bool) -> None:
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(6, 16, bias=bias), nn.GELU(), nn.Linear(16, 5, bias=bias))
    sharded = shard_mlp(mlp, 4)
    inputs = [torch.randn(3, 6) for _ in range(16)]
    outs = await _run_all(sharded.graph(), inputs)
    for x, out in zip(inputs, outs, strict=True):
        torch.testing.assert_close(out, _reference(mlp, x))


async def test_shards_inside_a_larger_graph() -> None:
    torch.manual_seed(2)
    layer = nn.Linear(4, 4)
    graph = df.Graph("dag")
    scale = graph.add(df.map(lambda x: x * 2, name="scale"))
    merged = shard_linear(layer, 2, name="proj").add_to(graph, scale)
    graph.add(df.map(torch.relu, name="relu"), merged)
    x = torch.randn(2, 4)
    async with df.Engine(graph) as engine:
        out = await engine.run(x)
    torch.testing.assert_close(out, torch.relu(_reference(layer, x * 2)))


async def test_wrong_input_width_names_the_branch_and_the_engine_keeps_serving() -> None:
    layer = nn.Linear(4, 4)
    async with df.Engine(shard_linear(layer, 2).graph()) as engine:
        with pytest.raises(df.NodeError, match=r"expected inputs with 4 features") as info:
            await engine.run(torch.randn(2, 5))
        assert info.value.node in ("linear.0", "linear.1")
        x = torch.randn(2, 4)
        torch.testing.assert_close(await engine.run(x), _reference(layer, x))


def test_sizes_that_do_not_divide_are_graph_errors() -> None:
    with pytest.raises(df.GraphError, match="6 does not divide into 4 equal parts; use one of"):
        shard_linear(nn.Linear(3, 6), 4, by="columns")
    with pytest.raises(df.GraphError, match="in_features: 3 does not divide into 2"):
        shard_linear(nn.Linear(3, 6), 2, by="rows")
    with pytest.raises(df.GraphError, match="hidden size: 10 does not divide into 3"):
        shard_mlp(nn.Sequential(nn.Linear(2, 10), nn.ReLU(), nn.Linear(10, 2)), 3)


def test_misuse_is_a_graph_error() -> None:
    with pytest.raises(df.GraphError, match="by must be 'columns' or 'rows'"):
        shard_linear(nn.Linear(4, 4), 2, by="diagonal")
    with pytest.raises(df.GraphError, match=r"needs an nn\.Linear"):
        shard_linear(nn.Conv1d(1, 1, 1), 1)  # type: ignore[arg-type]
    with pytest.raises(df.GraphError, match="activation without weights"):
        shard_mlp(nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.Linear(4, 2)), 2)
    with pytest.raises(df.GraphError, match="3 placements for 2 parts"):
        shard_linear(nn.Linear(4, 4), 2, placements=["thread"] * 3)
    with pytest.raises(df.GraphError, match="parts must be an int >= 1"):
        shard_linear(nn.Linear(4, 4), 0)
