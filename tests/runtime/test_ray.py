"""Ray placement (dataflow/runtime/executors/_ray.py), on asyncio and trio.

One local Ray instance (2 CPUs, no dashboard) serves the whole session. Test actors
reserve no CPU (``num_cpus=0``) so that several engines' actors fit at once; a
:class:`Probe` actor lets node bodies in Ray workers and the test synchronise on events.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest

import dataflow as df

ray = pytest.importorskip("ray", reason="Ray placement needs the ray extra")
from dataflow.runtime.executors._ray import ActorLost  # noqa: E402  (needs ray)

pytestmark = pytest.mark.anyio

FREE = {"num_cpus": 0}  # test actors reserve no CPU: several engines' actors fit at once


HEAD = {"head": 0.001}  # pins an actor to the head node (multi-node tests add others)
_SESSION: dict[str, Any] = {}  # the cluster, shared by every test_ray*.py module


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One simulated Ray cluster for the whole session (starting one costs seconds): a
    head node with 2 CPUs and a ``head`` resource; multi-node tests add nodes to it."""
    from ray.cluster_utils import Cluster

    if "cluster" not in _SESSION and not ray.is_initialized():
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 2, "resources": {"head": 1}, "include_dashboard": False},
        )
        ray.init(address=cluster.address, log_to_driver=False)
        _SESSION["cluster"] = cluster
    yield _SESSION.get("cluster")
    cluster = _SESSION.pop("cluster", None)
    if cluster is not None:
        ray.shutdown()
        cluster.shutdown()


class Probe:
    """Events and counters shared by node bodies (in Ray workers) and the test."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}
        self.values: dict[str, Any] = {}
        self.counts: Counter[str] = Counter()

    def _event(self, key: str) -> asyncio.Event:
        return self.events.setdefault(key, asyncio.Event())

    async def set(self, key: str, value: Any = None) -> None:
        self.values[key] = value
        self._event(key).set()

    async def wait(self, key: str) -> Any:
        await self._event(key).wait()
        return self.values.get(key)

    async def wait_any(self, *keys: str) -> str:
        """Wait until one of ``keys`` is set; returns that key."""
        waits = {asyncio.ensure_future(self._event(k).wait()): k for k in keys}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return waits[next(iter(done))]

    async def add(self, key: str) -> int:
        self.counts[key] += 1
        n = self.counts[key]
        await self.set(f"{key}={n}")
        return n

    async def count(self, key: str) -> int:
        return self.counts[key]


@pytest.fixture
async def probe(ray_cluster: Any) -> AsyncIterator[Any]:
    handle = ray.remote(num_cpus=0, resources=HEAD)(Probe).remote()
    yield handle
    ray.kill(handle)


async def get(ref: Any, timeout: float = 60.0) -> Any:
    """The value of ``ref`` on any backend; the timeout only guards against a hang."""
    with anyio.fail_after(timeout):
        return await anyio.to_thread.run_sync(ray.get, ref, abandon_on_cancel=True)


# -- same results as thread placement ------------------------------------------------------
class Scale:
    """A class body: one instance per replica, state made by setup()."""

    def setup(self) -> None:
        self.factor = 10

    def __call__(self, xs: Any) -> Any:
        return [x * self.factor for x in xs]


def split(x: int) -> list[int]:
    return [x, x + 1, x + 2]


def total(parts: list[int]) -> int:
    return sum(parts)


def offset(x: int, *, shift: int = 0) -> int:
    if x < 0:
        raise ValueError(f"negative input {x}")
    return x + shift


def count_to(n: int) -> Iterator[int]:
    yield from range(n)


def build(placement: str) -> df.Graph:
    opts = FREE if placement == "ray" else {}
    g = df.Graph(f"same-{placement}")
    src = g.add(df.map(offset, placement=placement, options=opts))
    parts = g.add(df.shard(split, placement=placement, options=opts), src)
    scaled = g.add(
        df.infer(
            Scale,
            placement=placement,
            replicas=2,
            batch=df.Batch(max_size=4, max_wait=0.001, collate="list"),
            options=opts,
        ),
        parts,
    )
    g.add(df.merge(total), scaled)
    return g


async def outcomes(graph: df.Graph, inputs: list[int]) -> list[Any]:
    async with df.Engine(graph) as engine:
        results: list[Any] = []
        for x in inputs:
            try:
                results.append(await engine.run(x, shift=x % 3))
            except df.NodeError as exc:
                results.append((exc.node, type(exc.__cause__).__name__, str(exc.__cause__)))
        results.append([y async for y in engine.map([x for x in inputs if x >= 0])])
    return results


async def test_ray_gives_the_same_results_as_thread_placement(ray_cluster: Any) -> None:
    inputs = [3, -1, 0, 7, 12, -5, 2, 9]
    expected = await outcomes(build("thread"), inputs)
    assert await outcomes(build("ray"), inputs) == expected
    # The failing inputs fail alone, with the body's own exception.
    assert expected[1] == ("offset", "ValueError", "negative input -1")


async def test_a_generator_gives_the_same_stream_as_thread_placement(ray_cluster: Any) -> None:
    async def tokens(placement: str) -> list[int]:
        node = df.map(count_to, placement=placement, options=FREE if placement == "ray" else {})
        async with df.Engine(df.Graph("gen", node)) as engine:
            return [t async for t in engine.stream(5)] + [t async for t in engine.stream(0)]

    assert await tokens("ray") == await tokens("thread") == [0, 1, 2, 3, 4]


# -- streaming, cancellation, deadlines -----------------------------------------------------
async def test_tokens_stream_out_of_the_actor_as_they_are_produced(probe: Any) -> None:
    def talk(n: int) -> Iterator[str]:
        yield "first"
        # Only a caller that already holds the first token can let the second come.
        ray.get(probe.wait.remote("go"))
        yield "second"

    graph = df.Graph("stream", df.map(talk, placement="ray", options=FREE))
    async with df.Engine(graph) as engine:
        stream = engine.stream(1)
        got = [await stream.__anext__()]
        await get(probe.set.remote("go"))
        got += [t async for t in stream]
    assert got == ["first", "second"]


async def test_leaving_a_stream_stops_the_generator_in_the_actor(probe: Any) -> None:
    def endless(n: int) -> Iterator[int]:
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:
            ray.get(probe.set.remote("closed", i))

    graph = df.Graph("endless", df.map(endless, placement="ray", options=FREE))
    async with df.Engine(graph) as engine:
        async for token in engine.stream(0):
            if token == 3:
                break
        # The generator's finally ran in the actor: it was stopped, not left running.
        stopped_at = await get(probe.wait.remote("closed"))
        assert stopped_at >= 3
        async for token in engine.stream(0):
            assert token == 0  # the actor is free again: a new stream starts at once
            break


async def test_a_deadline_cancels_the_queued_call_in_the_actor(probe: Any) -> None:
    def work(x: int) -> int:
        ray.get(probe.add.remote("begun"))
        if x == 0:
            ray.get(probe.wait.remote("release"))
        ray.get(probe.add.remote(f"ran-{x}"))
        return x

    node = df.infer(work, placement="ray", options={**FREE, "max_in_flight": 2})
    async with df.Engine(df.Graph("cancel", node)) as engine, anyio.create_task_group() as tg:
        tg.start_soon(engine.run, 0)
        await get(probe.wait.remote("begun=1"))  # item 0 holds the actor
        # Item 1 waits in the actor's queue (the second lane) until its deadline.
        with pytest.raises(TimeoutError):
            await engine.run(1, timeout=0.3)
        await get(probe.set.remote("release"))
        assert await engine.run(2) == 2
        # Calls run in order in the actor, so item 1 was skipped, not merely ignored.
        assert await get(probe.count.remote("ran-1")) == 0
        assert await get(probe.count.remote("begun")) == 2
        stats = engine.stats()
    assert stats["requests"]["timed_out"] == 1


# -- backpressure ---------------------------------------------------------------------------
async def test_backpressure_holds_across_the_actor_boundary(probe: Any) -> None:
    def produce(n: int) -> Iterator[int]:
        for i in range(n):
            probe.add.remote("made")  # not waited for: only backpressure may slow this loop
            yield i

    node = df.map(produce, placement="ray", capacity=1, options={**FREE, "max_in_flight": 2})
    # Made but unread: 2 in Ray (max_in_flight), 1 being emitted, 1 in the stream buffer,
    # 1 read (5 in practice), and the one the producer counted before blocking, + 1 slack.
    bound = 7
    async with df.Engine(df.Graph("bp", node), stream_buffer=1) as engine:
        stream = engine.stream(200)
        first = await stream.__anext__()
        # A producer without backpressure passes the bound within milliseconds; this
        # waits for that to happen (and it must not), bounded so the test ends.
        with anyio.move_on_after(1.0):
            await get(probe.wait.remote(f"made={bound + 1}"))
        assert await get(probe.count.remote("made")) <= bound
        rest = [t async for t in stream]
    assert [first, *rest] == list(range(200))


# -- failure and recovery -------------------------------------------------------------------
async def test_a_killed_actor_fails_its_items_then_restarts(probe: Any) -> None:
    class Serve:
        def setup(self) -> None:
            ray.get(probe.add.remote("setup"))

        def teardown(self) -> None:
            ray.get(probe.add.remote("teardown"))

        def __call__(self, x: str) -> str:
            if x == "hold":
                n = ray.get(probe.add.remote("hold"))
                me = ray.get_runtime_context().current_actor
                ray.get(probe.set.remote(f"holding-{n}", me))
                ray.get(probe.wait.remote("never"))
            return str(ray.get_runtime_context().get_actor_id())

    async def killed_mid_request(engine: df.Engine, n: int) -> df.NodeError:
        async with anyio.create_task_group() as tg:

            async def kill() -> None:
                ray.kill(await get(probe.wait.remote(f"holding-{n}")))

            tg.start_soon(kill)
            with pytest.raises(df.NodeError) as info:
                await engine.run("hold")
        return info.value

    node = df.infer(Serve, name="serve", placement="ray", options={**FREE, "max_restarts": 1})
    async with df.Engine(df.Graph("kill", node)) as engine:
        first = await engine.run("a")
        err = await killed_mid_request(engine, 1)
        assert err.node == "serve"
        assert isinstance(err.__cause__, ActorLost)
        assert "died while serving" in str(err)
        assert isinstance(err.__cause__.__cause__, ray.exceptions.RayActorError)
        # Recovery: a new actor, set up again, serves the next item.
        second = await engine.run("b")
        assert second != first
        assert await get(probe.count.remote("setup")) == 2
        await killed_mid_request(engine, 2)
        # max_restarts=1 is used up: items fail at once, clearly, without hanging.
        with anyio.fail_after(30), pytest.raises(df.NodeError, match="max_restarts=1"):
            await engine.run("c")
    # The dead actors never tore down; the killed ones were not replaced at stop.
    assert await get(probe.count.remote("teardown")) == 0


async def test_teardown_runs_in_each_actor_at_stop(probe: Any) -> None:
    class Model:
        def setup(self) -> None:
            self.pid = ray.get(probe.add.remote("setup"))

        def teardown(self) -> None:
            ray.get(probe.add.remote("teardown"))

        def __call__(self, x: int) -> int:
            return x + self.pid * 0

    node = df.infer(Model, placement="ray", replicas=2, options=FREE)
    async with df.Engine(df.Graph("life", node)) as engine:
        assert await get(probe.count.remote("setup")) == 2
        assert [y async for y in engine.map(range(10))] == list(range(10))
        assert await get(probe.count.remote("teardown")) == 0
    assert await get(probe.count.remote("teardown")) == 2


async def test_a_failing_setup_fails_engine_start(ray_cluster: Any) -> None:
    class Broken:
        def setup(self) -> None:
            raise OSError("weights not found")

        def __call__(self, x: int) -> int:
            return x

    engine = df.Engine(df.Graph("broken", df.infer(Broken, placement="ray", options=FREE)))
    with pytest.raises(df.NodeError, match="weights not found") as info:
        async with engine:
            pass
    assert isinstance(info.value.__cause__, OSError)


async def test_an_actor_the_cluster_cannot_place_fails_start_clearly(ray_cluster: Any) -> None:
    opts = {**FREE, "resources": {"no_such_accelerator": 1}, "start_timeout": 0.5}
    graph = df.Graph("unplaceable", df.infer(offset, name="big", placement="ray", options=opts))
    with anyio.fail_after(30), pytest.raises(df.NodeError, match=r"did not start within 0\.5 s"):
        async with df.Engine(graph):
            pass


# -- options and imports ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_cpu": 1}, "unknown Ray option.*'num_cpu'"),
        ({"num_cpus": -1}, "'num_cpus' must be a number >= 0"),
        ({"max_in_flight": 0}, "'max_in_flight' must be an int >= 1"),
        ({"max_restarts": 1.5}, "'max_restarts' must be an int"),
        ({"address": 6379}, "'address' must be a string"),
        ({"resources": {"TPU": -1}}, "'resources'"),
        ({"start_timeout": 0}, "'start_timeout' must be > 0"),
        ({"runtime_env": "."}, "'runtime_env' must be a dict"),
        ({"label_selector": {"zone": 1}}, "'label_selector' must map label names to strings"),
        ({"accelerator_type": 100}, "'accelerator_type' must be a string"),
        ({"node": ""}, "'node' must be a Ray node id"),
        ({"soft": True}, "'soft' only applies together with 'node'"),
        ({"coalesce": 0}, "'coalesce' must be an int >= 1"),
        ({"node": "ab", "soft": "yes"}, "'soft' must be True or False"),
    ],
)
async def test_invalid_ray_options_are_a_graph_error(options: dict[str, Any], match: str) -> None:
    node = df.infer(offset, name="bad", placement="ray", options=options)
    with pytest.raises(df.GraphError, match=match) as info:
        async with df.Engine(df.Graph("opts", node)):
            pass
    assert info.value.nodes == ("bad",)


def test_import_dataflow_does_not_import_ray() -> None:
    code = "import sys, dataflow; assert 'ray' not in sys.modules, 'ray was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
