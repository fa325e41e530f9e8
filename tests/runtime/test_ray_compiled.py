"""Compiled ray-placed nodes (``options={"compiled": True}``): Ray Compiled Graphs.

Shares the session's Ray cluster and the :class:`Probe` with test_ray.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import dataflow as df

ray = pytest.importorskip("ray", reason="Ray placement needs the ray extra")
from tests.runtime import test_ray as base  # noqa: E402  (needs ray)
from tests.runtime.test_ray import FREE, get  # noqa: E402

ray_cluster = base.ray_cluster  # the session's cluster (fixture)
probe = base.probe  # fixture

pytestmark = pytest.mark.anyio

COMPILED = {**FREE, "compiled": True}


def triple(x: int, *, shift: int = 0) -> int:
    if x < 0:
        raise ValueError(f"negative input {x}")
    return 3 * x + shift


def plus_one(x: int) -> int:
    return x + 1


def chain(placement: str, compiled: bool) -> df.Graph:
    opts = (COMPILED if compiled else FREE) if placement == "ray" else {}
    return df.Graph(
        f"compiled-{placement}-{compiled}",
        df.map(triple, placement=placement, options=opts)
        >> df.map(plus_one, placement=placement, options=opts),
    )


async def outcomes(graph: df.Graph) -> list[Any]:
    out: list[Any] = []
    async with df.Engine(graph) as engine:
        for x in (2, -1, 5):
            try:
                out.append(await engine.run(x, shift=1))
            except df.NodeError as exc:
                out.append((exc.node, type(exc.__cause__).__name__))
        out.append([y async for y in engine.map(range(20))])
    return out


async def test_a_compiled_node_gives_the_same_results_as_thread_placement(
    ray_cluster: Any,
) -> None:
    expected = await outcomes(chain("thread", False))
    assert await outcomes(chain("ray", True)) == expected
    assert expected[1] == ("triple", "ValueError")


async def test_a_compiled_node_after_a_ref_passing_node_gets_values(ray_cluster: Any) -> None:
    g = df.Graph(
        "mixed",
        df.map(triple, placement="ray", options=FREE)
        >> df.map(plus_one, placement="ray", options=COMPILED),
    )
    async with df.Engine(g) as engine:
        assert [y async for y in engine.map(range(4))] == [1, 4, 7, 10]


async def test_a_deadline_stops_waiting_for_a_compiled_execution(probe: Any) -> None:
    def slow(x: int) -> int:
        if x == 0:
            ray.get(probe.wait.remote("release"))
        return x

    node = df.map(slow, placement="ray", options={**COMPILED, "max_in_flight": 2})
    async with df.Engine(df.Graph("compiled-deadline", node)) as engine:
        with pytest.raises(TimeoutError):
            await engine.run(0, timeout=0.3)
        await get(probe.set.remote("release"))
        with anyio.fail_after(30):
            assert await engine.run(7) == 7  # the graph goes on serving
        stats = engine.stats()
    assert stats["requests"]["timed_out"] == 1


def count(n: int) -> Iterator[int]:
    yield from range(n)


@pytest.mark.parametrize(
    ("node", "why"),
    [
        (df.map(triple, replicas=2, placement="ray", options=COMPILED), "replicas=2"),
        (
            df.infer(triple, batch=df.Batch(max_size=4), placement="ray", options=COMPILED),
            "batches",
        ),
        (df.map(count, placement="ray", options=COMPILED), "generator"),
        (df.shard(plus_one, placement="ray", options=COMPILED), "shard node"),
        (df.map(triple, placement="ray", options={"compiled": "yes"}), "True or False"),
    ],
)
async def test_a_node_that_cannot_be_compiled_is_a_graph_error(node: df.Node, why: str) -> None:
    with pytest.raises(df.GraphError, match=why) as info:
        async with df.Engine(df.Graph("not-compilable", node)):
            pass
    assert info.value.nodes == (node.name,)


async def test_a_compiled_chain_runs_as_one_graph_and_fails_at_the_node_that_raised(
    ray_cluster: Any,
) -> None:
    def check(x: int) -> int:
        if x == 13:
            raise ValueError("unlucky")
        return x

    g = df.Graph(
        "one-graph",
        df.map(plus_one, name="head", placement="ray", options=COMPILED)
        >> df.map(check, name="middle", placement="ray", options=COMPILED)
        >> df.map(plus_one, name="tail", placement="ray", options=COMPILED),
    )
    async with df.Engine(g) as engine:
        head = engine._scheduler.runners["head"].replica_objs[0]  # type: ignore[union-attr]
        assert [n.name for n in head.chain] == ["middle", "tail"]  # one graph, three actors
        assert await engine.run(1) == 3
        with pytest.raises(df.NodeError) as info:
            await engine.run(12)
        assert [y async for y in engine.map(range(5))] == [2, 3, 4, 5, 6]  # it goes on
        stats = engine.stats()
    # The chain's reader thread went with the engine.
    assert not [t.name for t in threading.enumerate() if t.name.endswith(":ray-dag")]
    assert info.value.node == "middle"
    assert isinstance(info.value.__cause__, ValueError)
    assert stats["nodes"]["middle"]["failed"] == 1
    assert stats["nodes"]["head"]["failed"] == 0
