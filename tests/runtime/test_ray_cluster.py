"""Ray placement on a simulated multi-node cluster (``ray.cluster_utils.Cluster``).

A second node with a custom ``side`` resource joins the session's cluster; stages
pinned to it by ``resources`` run there. Removing it mid-run fails its in-flight items
with ``NodeError``; a replacement node takes the restarted actor.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import dataflow as df

ray = pytest.importorskip("ray", reason="Ray placement needs the ray extra")
from dataflow.runtime.executors._ray import ActorLost  # noqa: E402  (needs ray)
from tests.runtime import test_ray as base  # noqa: E402  (needs ray)
from tests.runtime.test_ray import get  # noqa: E402

ray_cluster = base.ray_cluster  # the session's cluster (fixture)
probe = base.probe  # fixture

pytestmark = pytest.mark.anyio

SIDE = {"side": 1}


def scale(x: int) -> int:
    return 3 * x


def shift(x: int) -> int:
    return x + 1


def pinned(placement: str, hold: Any = None, probe: Any = None) -> df.Graph:
    """scale on the side node, shift on the head (ray-placed: the probe records where)."""

    def where(x: int) -> int:
        return scale(x)

    def where_am_i(x: int) -> int:
        if probe is not None:
            ray.get(probe.set.remote("shift-at", ray.get_runtime_context().get_node_id()))
        return shift(x)

    on_side = {"num_cpus": 0, "resources": SIDE, "max_restarts": 1, "start_timeout": 60}
    # The driver runs on the head node: pin the second stage there by node affinity.
    on_head = {"num_cpus": 0, "node": ray.get_runtime_context().get_node_id()}
    if placement != "ray":
        on_side = on_head = {}
    body = hold if hold is not None else where
    g = df.Graph(f"pinned-{placement}")
    first = g.add(df.map(body, name="scale", placement=placement, options=on_side))
    g.add(df.map(where_am_i, name="shift", placement=placement, options=on_head), first)
    return g


async def test_stages_pinned_to_nodes_match_in_process_and_survive_losing_a_node(
    ray_cluster: Any, probe: Any
) -> None:
    cluster = ray_cluster
    assert cluster is not None, "the session's Ray was not started by the test fixture"
    side = cluster.add_node(num_cpus=0, resources={"side": 2})
    cluster.wait_for_nodes()
    try:
        inputs = list(range(6))
        async with df.Engine(pinned("thread")) as engine:
            expected = [y async for y in engine.map(inputs)]

        def hold(x: int) -> int:
            ray.get(probe.set.remote(f"at-{x}", ray.get_runtime_context().get_node_id()))
            if x < 0:
                ray.get(probe.wait.remote("never"))
            return scale(x)

        async with df.Engine(pinned("ray", hold, probe)) as engine:
            assert [y async for y in engine.map(inputs)] == expected
            assert await get(probe.wait.remote("at-0")) == side.node_id  # by resources
            head = ray.get_runtime_context().get_node_id()
            assert await get(probe.wait.remote("shift-at")) == head  # by node affinity

            async def lose_the_node() -> None:
                await get(probe.wait.remote("at--1"))  # the item is in the side actor
                await anyio.to_thread.run_sync(cluster.remove_node, side)

            async with anyio.create_task_group() as tg:
                tg.start_soon(lose_the_node)
                with anyio.fail_after(90), pytest.raises(df.NodeError) as info:
                    await engine.run(-1)
            assert info.value.node == "scale"
            assert isinstance(info.value.__cause__, ActorLost)
            assert "died while serving" in str(info.value)
            # A replacement machine joins; the next item restarts the actor there.
            side = cluster.add_node(num_cpus=0, resources={"side": 2})
            with anyio.fail_after(90):
                assert await engine.run(5) == expected[5]
            assert await get(probe.wait.remote("at-5")) == side.node_id
    finally:
        if side in cluster.list_all_nodes():
            cluster.remove_node(side)


def test_the_ray_cluster_example_runs_on_a_cluster(ray_cluster: Any) -> None:
    """examples/ray_cluster.py, as written, joining this session's cluster."""
    assert ray_cluster is not None, "the session's Ray was not started by the test fixture"
    example = Path(__file__).resolve().parents[2] / "examples" / "ray_cluster.py"
    run = subprocess.run(
        [sys.executable, str(example), "--address", ray_cluster.address, "-n", "20"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "20 requests in" in run.stdout
    assert "describe   items_out=63" in run.stdout  # 21 requests x 3 words
