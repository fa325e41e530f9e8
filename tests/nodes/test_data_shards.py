"""Data sharding along dim 0, and merges that check their parts' shapes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch
from torch import nn

import dataflow as df
from dataflow.nodes import concat, data_parallel, split_batch, sum_parts

pytestmark = pytest.mark.anyio


async def test_data_parallel_equals_the_module_for_concurrent_requests() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU())
    graph = df.Graph("dp", data_parallel(model, 2, parts=3))
    inputs = [torch.randn(7 + i % 3, 5) for i in range(30)]
    results: dict[int, torch.Tensor] = {}
    async with df.Engine(graph) as engine:

        async def one(i: int) -> None:
            results[i] = await engine.run(inputs[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(inputs)):
                tg.start_soon(one, i)
        stats = engine.stats()["nodes"]["data_parallel"]
    with torch.inference_mode():
        for i, x in enumerate(inputs):
            torch.testing.assert_close(results[i], model(x))
    assert stats["items_in"] == 3 * len(inputs)


async def _one(graph: df.Graph, x: Any) -> Any:
    async with df.Engine(graph) as engine:
        return await engine.run(x)


async def test_split_by_size_keeps_row_order() -> None:
    graph = df.Graph("rows", split_batch(size=2) >> concat(0))
    x = torch.arange(7).reshape(7, 1)
    assert torch.equal(await _one(graph, x), x)


async def test_tuples_of_tensors_split_together() -> None:
    seen: list[int] = []

    def count(pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seen.append(pair[0].shape[0])
        return pair[0] + pair[1]

    graph = df.Graph("pairs", split_batch(3) >> df.map(count) >> concat(0))
    a, b = torch.randn(5, 2), torch.randn(5, 2)
    torch.testing.assert_close(await _one(graph, (a, b)), a + b)
    assert sorted(seen) == [1, 2, 2]


async def test_shapes_that_do_not_divide_fail_the_request_and_not_the_engine() -> None:
    graph = df.Graph("even", split_batch(3, even=True) >> concat(0))
    async with df.Engine(graph) as engine:
        with pytest.raises(df.NodeError, match="5 rows does not divide into 3 equal") as info:
            await engine.run(torch.zeros(5, 1))
        assert info.value.node == "split_batch"
        with pytest.raises(df.NodeError, match="2 rows cannot be split into 3 parts"):
            await engine.run(torch.zeros(2, 1))
        with pytest.raises(df.NodeError, match="takes a tensor or a tuple of tensors"):
            await engine.run("text")
        assert (await engine.run(torch.zeros(6, 1))).shape == (6, 1)


@pytest.mark.parametrize(
    ("merge", "message"),
    [
        (
            concat(-1, name="m"),
            r"part 1 has shape \(1, 2\) but part 0 has \(2, 2\); parts "
            r"must agree on every dimension but dim -1",
        ),
        (
            sum_parts(name="m"),
            r"part 1 has shape \(1, 2\) but part 0 has \(2, 2\); parts "
            r"must have one shape",
        ),
    ],
)
async def test_mismatched_parts_at_merge_are_named(merge: df.Node, message: str) -> None:
    @df.shard
    def uneven(x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[0] == 3:
            return [x[:2, :2], x[2:, 2:]]  # a shard that splits wrongly
        return [x[:, :2], x[:, 2:]]

    graph = df.Graph("bad", uneven >> merge)
    async with df.Engine(graph) as engine:
        with pytest.raises(df.NodeError, match=message) as info:
            await engine.run(torch.zeros(3, 4))
        assert info.value.node == "m"
        assert (await engine.run(torch.ones(2, 4))).shape[0] == 2


def test_split_batch_options_are_checked() -> None:
    with pytest.raises(df.GraphError, match="exactly one of parts= or size="):
        split_batch()
    with pytest.raises(df.GraphError, match="exactly one of parts= or size="):
        split_batch(2, size=3)
    with pytest.raises(df.GraphError, match="size must be an int >= 1"):
        split_batch(size=0)
    with pytest.raises(df.GraphError, match="replicas must be an int >= 1"):
        data_parallel(nn.Identity(), 0)
