"""engine.stats(): figures checked on graphs where the expected values are known."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

import dataflow as df
from dataflow.runtime._stats import bottleneck, node_busy, percentile

pytestmark = pytest.mark.anyio

SLEEP = 0.02  # seconds a "slow" node body takes per item


def _sleeper(placement: str) -> df.Node:
    if placement == "thread":

        def slow(x: int) -> int:
            time.sleep(SLEEP)  # simulated work in a node body (intended)
            return x

        return df.map(slow, name="slow", placement="thread")

    async def slow_async(x: int) -> int:
        await anyio.sleep(SLEEP)  # simulated work in a node body (intended)
        return x

    return df.map(slow_async, name="slow")


def _ident(name: str, **options: Any) -> df.Node:
    def body(x: int) -> int:
        return x

    return df.map(body, name=name, **options)


def test_percentile_nearest_rank() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(101)], 0.99) == 99.0


@pytest.mark.parametrize("placement", ["thread", "loop"])
async def test_busy_time_and_service_time_of_a_node_that_sleeps(placement: str) -> None:
    graph = df.Graph("sleepy", _ident("first") >> _sleeper(placement))
    n = 5
    async with df.Engine(graph) as engine:
        for i in range(n):  # one at a time: the node is busy exactly n * SLEEP
            assert await engine.run(i) == i
        stats = engine.stats()
    slow = stats["nodes"]["slow"]
    assert slow["items_in"] == slow["items_out"] == slow["succeeded"] == n
    assert n * SLEEP <= slow["busy_s"][0] < n * SLEEP + 0.5
    assert SLEEP <= slow["service_p50_s"] < 10 * SLEEP
    assert slow["busy"][0] == pytest.approx(slow["busy_s"][0] / slow["uptime_s"], rel=0.2)


@pytest.mark.parametrize("placement", ["thread", "loop"])
async def test_node_blocked_on_a_full_edge_is_not_busy(placement: str) -> None:
    """Regression: time spent waiting for room downstream used to count as busy, so
    every node upstream of the bottleneck looked as busy as the bottleneck."""
    fast = _ident("fast", placement=placement)
    slow = _sleeper("thread")
    graph = df.Graph(
        "blocked", fast >> df.map(slow.body, name="slow", placement="thread", capacity=1)
    )
    async with df.Engine(graph) as engine:
        before = engine.stats()
        results = [r async for r in engine.map(range(20), window=20)]
        after = engine.stats()
    assert results == list(range(20))
    busy = node_busy(after, before)
    assert busy["slow"] > 0.5
    assert busy["fast"] < 0.2
    assert after["edges"]["fast->slow"]["blocked_s"] > 0  # fast did wait: on the edge


@pytest.mark.parametrize("position", [0, 1, 2])
async def test_bottleneck_is_the_slow_node(position: int) -> None:
    nodes = [_ident(f"n{i}", capacity=2) for i in range(3)]
    slow = _sleeper("thread")
    nodes[position] = df.map(slow.body, name="slow", placement="thread", capacity=2)
    graph = df.Graph("neck", nodes[0] >> nodes[1] >> nodes[2])
    async with df.Engine(graph) as engine:
        before = engine.stats()
        async for _ in engine.map(range(30), window=30):
            pass
        after = engine.stats()
    for neck in (after["bottleneck"], bottleneck(after, before)):
        assert neck is not None
        assert neck["node"] == "slow", neck
        assert neck["saturated"] and neck["input_full"]
        assert neck["input_blocked_s"] > 0
    windowed = bottleneck(after, before)
    assert windowed is not None and windowed["busy"] > 0.5


async def test_unsaturated_graph_names_the_busiest_node_but_not_as_saturated() -> None:
    graph = df.Graph("idle", _ident("a") >> _sleeper("loop"))
    async with df.Engine(graph) as engine:
        for i in range(3):
            await engine.run(i)
        neck = engine.stats()["bottleneck"]
    assert neck is not None
    assert neck["node"] == "slow"
    assert not neck["saturated"] and not neck["input_full"]


async def test_edge_kept_full_shows_depth_and_blocked_producers() -> None:
    release = anyio.Event()

    async def gate(x: int) -> int:
        await release.wait()
        return x

    graph = df.Graph("full", df.map(gate, name="gate", capacity=4))
    results: list[int] = []

    async def call(i: int) -> None:
        results.append(await engine.run(i))

    async with df.Engine(graph) as engine, anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(call, i)
        await anyio.wait_all_tasks_blocked()
        stats = engine.stats()
        edge = stats["edges"]["input->gate"]
        assert edge["capacity"] == 4
        assert edge["depth"] == 4  # kept full: the gate holds the rest
        assert stats["requests"]["in_flight"] == 10
        neck = stats["bottleneck"]
        assert neck is not None and neck["node"] == "gate" and neck["input_full"]
        release.set()
    stats = engine.stats()
    edge = stats["edges"]["input->gate"]
    assert sorted(results) == list(range(10))
    assert edge["items"] == 10
    assert edge["blocked_s"] > 0  # callers waited for room
    assert stats["nodes"]["gate"]["items_in"] == 10


async def test_failed_and_succeeded_counts_per_node_and_request() -> None:
    def picky(x: int) -> int:
        if x % 2:
            raise ValueError("odd")
        return x

    graph = df.Graph("picky", _ident("a") >> df.map(picky, name="picky"))
    async with df.Engine(graph) as engine:
        outs = [r async for r in engine.map(range(10), return_exceptions=True)]
        stats = engine.stats()
    assert sum(isinstance(o, df.NodeError) for o in outs) == 5
    node = stats["nodes"]["picky"]
    assert (node["items_in"], node["failed"], node["succeeded"], node["items_out"]) == (
        10,
        5,
        5,
        5,
    )
    reqs = stats["requests"]
    assert (reqs["succeeded"], reqs["failed"], reqs["in_flight"]) == (5, 5, 0)
    assert reqs["submitted"] == reqs["succeeded"] + reqs["failed"] + reqs["cancelled"]


async def test_batch_size_histogram() -> None:
    def double(xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    node = df.map(double, name="double", batch=df.Batch(max_size=4, max_wait=1.0, collate="list"))
    async with df.Engine(df.Graph("batches", node)) as engine:
        outs = [r async for r in engine.map(range(8), window=8)]
        stats = engine.stats()
    assert outs == [2 * i for i in range(8)]
    assert stats["nodes"]["double"]["batch_sizes"] == {4: 2}
