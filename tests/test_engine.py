"""The engine façade: run, stream, map, params, errors, lifecycle."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
import torch

import dataflow as df

pytestmark = pytest.mark.anyio


def double(x: int) -> int:
    return 2 * x


def chain_graph() -> df.Graph:
    return df.Graph(
        "chain",
        df.map(lambda x: x + 1, name="inc")
        >> df.infer(double, name="dbl", placement="thread")
        >> df.map(str, name="fmt"),
    )


async def test_run_returns_the_result() -> None:
    async with df.Engine(chain_graph()) as engine:
        assert await engine.run(3) == "8"
        stats = engine.stats()
    assert stats["requests"]["submitted"] == stats["requests"]["succeeded"] == 1


async def test_map_ordered_over_sync_and_async_iterables() -> None:
    async def agen() -> AsyncIterator[int]:
        for i in range(20):
            yield i

    async with df.Engine(chain_graph()) as engine:
        assert [r async for r in engine.map(range(20))] == [str(2 * (i + 1)) for i in range(20)]
        assert [r async for r in engine.map(agen())] == [str(2 * (i + 1)) for i in range(20)]
        unordered = [r async for r in engine.map(range(20), ordered=False)]
        assert sorted(unordered) == sorted(str(2 * (i + 1)) for i in range(20))


async def test_stream_yields_each_output_of_a_generator_node() -> None:
    @df.map
    def count(n: int) -> Iterator[int]:
        yield from range(n)

    async def agen(x: int) -> AsyncIterator[int]:
        for i in range(3):
            yield x * 10 + i

    graph = df.Graph("gen", count >> df.map(agen, name="spread"))
    async with df.Engine(graph) as engine:
        got = [x async for x in engine.stream(2)]
        assert got == [0, 1, 2, 10, 11, 12]
        assert await engine.run(2) == got  # a streaming graph's run gives the list


async def test_thread_generator_node_streams() -> None:
    def words(text: str) -> Iterator[str]:
        for w in text.split():
            yield w.upper()

    graph = df.Graph("tg", df.infer(words, name="words", placement="thread"))
    async with df.Engine(graph) as engine:
        assert [w async for w in engine.stream("a b c")] == ["A", "B", "C"]


async def test_async_body_runs_on_the_loop() -> None:
    async def slow_add(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x + 100

    graph = df.Graph("async", df.map(slow_add, replicas=3))
    async with df.Engine(graph) as engine:
        assert [r async for r in engine.map(range(10))] == [i + 100 for i in range(10)]


async def test_nn_module_runs_in_inference_mode() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    graph = df.Graph("mod", df.infer(layer, name="linear", placement="thread"))
    x = torch.randn(4)
    async with df.Engine(graph) as engine:
        out = await engine.run(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, layer(x).detach())


class Model:
    instances: list[Model] = []

    def __init__(self) -> None:
        self.thread: str | None = None
        self.torn_down = False
        Model.instances.append(self)

    def setup(self) -> None:
        self.thread = threading.current_thread().name

    def teardown(self) -> None:
        self.torn_down = True

    def __call__(self, x: int) -> tuple[int, str | None]:
        return x, self.thread


async def test_class_body_gets_one_instance_per_replica_set_up_in_its_thread() -> None:
    Model.instances.clear()
    graph = df.Graph("cls", df.infer(Model, name="model", placement="thread", replicas=2))
    async with df.Engine(graph) as engine:
        outs = [r async for r in engine.map(range(8))]
    assert len(Model.instances) == 2
    threads = {m.thread for m in Model.instances}
    assert threads == {"dataflow:model:0", "dataflow:model:1"}
    assert all(m.torn_down for m in Model.instances)
    assert [x for x, _ in outs] == list(range(8))
    assert {t for _, t in outs} <= threads


async def test_per_request_params_reach_the_nodes_that_declare_them() -> None:
    def scale(x: int, *, factor: int = 1) -> int:
        return x * factor

    def shift(x: int, offset: int = 0) -> int:
        return x + offset

    graph = df.Graph("params", df.map(scale) >> df.map(shift))
    async with df.Engine(graph) as engine:
        assert await engine.run(2) == 2
        assert await engine.run(2, factor=5) == 10
        assert await engine.run(2, factor=5, offset=1) == 11
        with pytest.raises(df.InvalidRequest, match="temperature"):
            await engine.run(2, temperature=0.5)
        with pytest.raises(df.InvalidRequest, match="temperature"):
            engine.stream(2, temperature=0.5)
        assert engine.stats()["requests"]["submitted"] == 3


async def test_node_error_names_node_and_request_and_chains_the_cause() -> None:
    def fragile(x: int) -> int:
        if x == 3:
            raise ValueError("three is bad")
        return x

    graph = df.Graph("err", df.map(fragile) >> df.map(double))
    async with df.Engine(graph) as engine:
        with pytest.raises(df.NodeError) as info:
            await engine.run(3)
        assert info.value.node == "fragile"
        assert isinstance(info.value.__cause__, ValueError)
        assert "three is bad" in str(info.value)
        assert info.value.request_id == 1
        # The engine keeps serving.
        assert await engine.run(4) == 8
        results = [r async for r in engine.map(range(6), return_exceptions=True)]
        assert isinstance(results[3], df.NodeError)
        assert [r for i, r in enumerate(results) if i != 3] == [0, 2, 4, 8, 10]
        stats = engine.stats()["requests"]
    assert stats["failed"] == 2
    assert stats["succeeded"] == 6


async def test_map_raises_the_first_failure_in_order_and_cancels_the_rest() -> None:
    def fragile(x: int) -> int:
        if x == 2:
            raise ValueError("two")
        return x

    graph = df.Graph("err", df.map(fragile))
    async with df.Engine(graph) as engine:
        seen = []
        with pytest.raises(df.NodeError):
            async for r in engine.map(range(10)):
                seen.append(r)
        assert seen == [0, 1]
        stats = engine.stats()["requests"]
        assert stats["in_flight"] == 0
        assert stats["submitted"] == stats["succeeded"] + stats["failed"] + stats["cancelled"]


async def test_lifecycle_misuse_raises_engine_closed() -> None:
    engine = df.Engine(chain_graph())
    assert engine.state is df.EngineState.UNOPENED
    with pytest.raises(df.EngineClosed, match="async with"):
        await engine.run(1)
    async with engine:
        assert engine.state is df.EngineState.OPEN
    assert engine.state is df.EngineState.CLOSED
    with pytest.raises(df.EngineClosed):
        await engine.run(1)
    with pytest.raises(df.EngineClosed):
        engine.stream(1)
    with pytest.raises(df.EngineClosed):
        engine.map([1])
    with pytest.raises(df.EngineClosed, match="runs once"):
        async with engine:
            pass


async def test_setup_failure_fails_enter_and_leaks_no_thread(no_thread_leak: None) -> None:
    class Broken:
        def setup(self) -> None:
            raise RuntimeError("weights missing")

        def __call__(self, x: int) -> int:
            return x

    graph = df.Graph(
        "broken",
        df.infer(double, name="ok", placement="thread")
        >> df.infer(Broken, name="broken", placement="thread", replicas=2),
    )
    engine = df.Engine(graph)
    with pytest.raises(df.NodeError, match="broken") as info:
        async with engine:
            pass
    assert isinstance(info.value.__cause__, RuntimeError)
    assert engine.state is df.EngineState.CLOSED


async def test_no_thread_survives_the_engine(no_thread_leak: None) -> None:
    graph = df.Graph(
        "threads",
        df.infer(double, name="a", placement="thread", replicas=3)
        >> df.infer(double, name="b", placement="thread", replicas=2),
    )
    async with df.Engine(graph) as engine:
        assert threading.active_count() >= 5
        assert [r async for r in engine.map(range(10))] == [4 * i for i in range(10)]


async def test_bad_timeout_is_invalid_request() -> None:
    async with df.Engine(chain_graph()) as engine:
        for bad in (0, -1, float("nan")):
            with pytest.raises(df.InvalidRequest, match="timeout"):
                await engine.run(1, timeout=bad)


async def test_engine_rejects_non_graph_and_bad_options() -> None:
    with pytest.raises(TypeError, match="Graph"):
        df.Engine("graph")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_in_flight"):
        df.Engine(chain_graph(), max_in_flight=0)
    with pytest.raises(ValueError, match="shutdown"):
        df.Engine(chain_graph(), shutdown="later")  # type: ignore[arg-type]


async def test_shard_merge_and_fan_in() -> None:
    graph = df.Graph("dag")
    src = graph.add(df.shard(lambda t: list(t.split(2)), name="split"))
    part = graph.add(df.infer(lambda t: t * 10, name="times10", placement="thread"), src)
    graph.add(df.merge("concat"), part)
    async with df.Engine(graph) as engine:
        out = await engine.run(torch.arange(7))
    torch.testing.assert_close(out, torch.arange(7) * 10)

    fan = df.Graph("fan")
    a = fan.add(df.map(lambda x: x, name="src"))
    b = fan.add(df.map(lambda x: x + 1, name="plus"), a)
    c = fan.add(df.infer(lambda x: x * 2, name="times", placement="thread"), a)
    fan.add(df.merge(lambda parts: tuple(parts), name="pair"), b, c)
    async with df.Engine(fan) as engine:
        assert [r async for r in engine.map(range(5))] == [(i + 1, 2 * i) for i in range(5)]


async def test_unordered_map_over_a_graph_that_runs_inline() -> None:
    """Requests that finish inside their own submission (every node idle, on the loop)
    still reach an unordered map."""
    graph = df.Graph("loop", df.map(lambda x: x + 1, name="a") >> df.map(double, name="b"))
    async with df.Engine(graph) as engine:
        got = [r async for r in engine.map(range(100), ordered=False)]
        assert sorted(got) == [2 * (i + 1) for i in range(100)]
        got = [r async for r in engine.map(range(100), ordered=False, window=3)]
        assert sorted(got) == [2 * (i + 1) for i in range(100)]


async def test_inline_and_queued_paths_count_the_same() -> None:
    graph = df.Graph("loop", df.map(lambda x: x + 1, name="a") >> df.map(double, name="b"))
    async with df.Engine(graph) as engine:
        assert await engine.run(1) == 4  # idle: runs inline in the caller's task
        assert [r async for r in engine.map(range(50))] == [2 * (i + 1) for i in range(50)]
        nodes = engine.stats()["nodes"]
    assert nodes["a"]["items_in"] == nodes["b"]["items_out"] == 51
