"""Regression tests for issue 10 (cancellation and memory bounds), one per defect."""

from __future__ import annotations

import contextlib
import gc
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
import torch
from anyio import wait_all_tasks_blocked

import dataflow as df
from dataflow.runtime._trace import Tracer
from dataflow.runtime.executors._thread import ThreadReplica

pytestmark = pytest.mark.anyio


# 1 -------------------------------------------------------------------------------------
async def test_1_a_timed_out_stream_frees_its_loop_replica_at_once() -> None:
    """Bug: a loop body ran with no cancel scope tied to its request: a timed-out stream
    left the node busy, so the next request timed out too."""
    release = anyio.Event()

    async def slow(x: int) -> int:
        if x == 0:
            await release.wait()  # never set: only cancellation ends it
        return x

    graph = df.Graph("busy", df.map(slow, name="slow"))
    with anyio.fail_after(10):
        async with df.Engine(graph) as engine:
            with pytest.raises(TimeoutError):
                async for _ in engine.stream(0, timeout=0.2):
                    pass
            assert await engine.run(1, timeout=5) == 1


# 2 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("inline", [True, False])
async def test_2_a_worker_woken_by_a_broken_channel_ends_quietly(inline: bool) -> None:
    """Bug: on cancel shutdown (cancel the task group, then break the inboxes) a worker
    woken from a full channel raised BrokenChannel into the engine's task group."""
    gate = anyio.Event()

    async def held(x: int) -> int:
        await gate.wait()
        return x

    graph = df.Graph(
        "g",
        df.map(lambda x: x, name="src", capacity=1)
        >> df.map(held, name="a", capacity=1)
        >> df.map(lambda x: x, name="b", capacity=1),
    )
    outcomes: list[str] = []

    async def caller(engine: df.Engine, x: int) -> None:
        try:
            await engine.run(x)
            outcomes.append("ok")
        except df.EngineClosed:
            outcomes.append("closed")

    with anyio.fail_after(10):
        engine = df.Engine(graph, shutdown="cancel", inline=inline)
        async with anyio.create_task_group() as tg, engine:
            for x in range(6):
                tg.start_soon(caller, engine, x)
            await wait_all_tasks_blocked()
            # The moment of a cancel shutdown where a woken sender finds the channel
            # broken before its cancellation arrives.
            engine._scheduler.inboxes["a"].close_receiver()  # type: ignore[union-attr]
            await wait_all_tasks_blocked()
    assert len(outcomes) == 6 and set(outcomes) <= {"closed"}


# 3 -------------------------------------------------------------------------------------
async def test_3_a_thread_that_cannot_start_fails_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bug: Thread.start() raising left __aenter__ waiting forever, shielded."""

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    graph = df.Graph("t", df.infer(lambda x: x, name="t", placement="thread"))
    with anyio.fail_after(5), pytest.raises(df.NodeError, match="start new thread"):
        async with df.Engine(graph):
            pass


# 4 -------------------------------------------------------------------------------------
class _SlowSetup:
    torn_down = 0
    entered: threading.Event

    def setup(self) -> None:
        type(self).entered.set()
        time.sleep(0.2)  # allowed: simulates loading weights

    def teardown(self) -> None:
        type(self).torn_down += 1

    def __call__(self, x: int) -> int:
        return x


async def test_4_cancelled_start_up_still_tears_down() -> None:
    """Bug: start-up cancelled while setup() ran never ran teardown()."""
    _SlowSetup.torn_down = 0
    _SlowSetup.entered = threading.Event()
    graph = df.Graph("s", df.infer(_SlowSetup, name="s", placement="thread"))
    with anyio.fail_after(10):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_when_setup_runs() -> None:
                    await anyio.to_thread.run_sync(_SlowSetup.entered.wait)
                    scope.cancel()

                tg.start_soon(cancel_when_setup_runs)
                async with df.Engine(graph):
                    pytest.fail("start-up should have been cancelled")
    assert _SlowSetup.torn_down == 1


# 5 -------------------------------------------------------------------------------------
async def test_5_abandoned_borrowed_calls_do_not_pile_up_in_the_thread() -> None:
    """Bug: 40 run(timeout=0.01) on a 100 ms thread body left 35 calls queued in the
    replica's thread; exit took 3.6 s."""
    calls = 0

    def slow(x: int) -> int:
        nonlocal calls
        calls += 1
        time.sleep(0.1)  # allowed: simulates work
        return x

    graph = df.Graph("b", df.infer(slow, name="slow", placement="thread", capacity=16))
    with anyio.fail_after(10):
        engine = df.Engine(graph)
        async with engine:
            replica = engine._scheduler.runners["slow"].replica_objs[0]  # type: ignore[union-attr]
            assert isinstance(replica, ThreadReplica)
            for i in range(40):
                with pytest.raises(TimeoutError):
                    await engine.run(i, timeout=0.01)
                assert replica._queue.qsize() <= 16
            start = time.perf_counter()
        assert time.perf_counter() - start < 1.0
    assert calls <= 17


# 7 -------------------------------------------------------------------------------------
async def test_7_ordered_replicated_generator_bounds_a_later_requests_outputs() -> None:
    """Bug: an ordered replicated generator node buffered a non-head request's outputs
    without limit (200,000 held), and that request's reader got nothing until the head
    ended. Order is kept per request: the later request streams at once, and with a
    stopped reader its producer waits at the stream's buffer."""
    head = anyio.Event()
    produced = {1: 0, 2: 0}

    async def gen(x: int) -> AsyncIterator[int]:
        if x == 1:
            await head.wait()
            yield 1
            return
        for i in range(10_000):
            produced[2] += 1
            yield i

    graph = df.Graph("o", df.map(gen, name="gen", replicas=2, ordered=True))
    with anyio.fail_after(20):
        async with df.Engine(graph, stream_buffer=8) as engine, anyio.create_task_group() as tg:
            results: dict[int, list[int]] = {}

            async def run(x: int) -> None:
                results[x] = await engine.run(x)

            tg.start_soon(run, 1)
            await wait_all_tasks_blocked()
            later = engine.stream(2)
            assert [await later.__anext__() for _ in range(3)] == [0, 1, 2]  # not held
            await wait_all_tasks_blocked()  # its reader stops: the producer must wait
            assert produced[2] <= 3 + 8 + 8  # read + stream buffer + node-held outputs
            assert "gen" in engine.stats()["nodes"]  # the engine is still serving
            rest = [t async for t in later]
            assert rest == list(range(3, 10_000))
            assert 1 not in results  # the head is still running meanwhile
            head.set()
    assert results[1] == [1]


# 8 -------------------------------------------------------------------------------------
async def test_8_map_yields_a_result_before_pulling_the_next_input() -> None:
    """Bug: MapStream awaited the next input before delivering finished results, so a
    source that waits for the previous answer deadlocked."""
    answered: list[int] = []
    got = anyio.Event()

    async def source() -> AsyncIterator[int]:
        nonlocal got
        for i in range(3):
            yield i
            await got.wait()
            got = anyio.Event()

    async def times_ten(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x * 10

    graph = df.Graph("m", df.map(times_ten, name="m"))
    with anyio.fail_after(5):
        async with df.Engine(graph, inline=False) as engine:
            async for y in engine.map(source()):
                answered.append(y)
                got.set()
    assert answered == [0, 10, 20]


# 9 -------------------------------------------------------------------------------------
async def test_9_inline_run_calls_checkpoint() -> None:
    """Bug: run() on an idle inline graph never checkpointed: 100,000 calls ignored a
    surrounding move_on_after."""
    graph = df.Graph("i", df.map(lambda x: x, name="i"))
    done = 0
    async with df.Engine(graph) as engine:
        with anyio.move_on_after(0.05):
            for i in range(100_000):
                await engine.run(i)
                done += 1
    assert done < 100_000


async def test_9_async_source_map_checkpoints() -> None:
    async def source() -> AsyncIterator[int]:
        for i in range(100_000):
            yield i

    graph = df.Graph("i", df.map(lambda x: x, name="i"))
    done = 0
    async with df.Engine(graph) as engine:
        with anyio.move_on_after(0.05):
            async for _ in engine.map(source()):
                done += 1
    assert done < 100_000


# 10 ------------------------------------------------------------------------------------
async def test_10_deadline_heap_lets_go_of_finished_requests() -> None:
    """Bug: finished run(timeout=3600) calls stayed pinned by the deadline heap."""

    class Big:
        pass

    refs: list[weakref.ref[Big]] = []

    def make(x: int) -> Big:
        big = Big()
        refs.append(weakref.ref(big))
        return big

    graph = df.Graph("d", df.map(make, name="make"))
    async with df.Engine(graph) as engine:
        for i in range(60):
            await engine.run(i, timeout=3600)
        gc.collect()
        assert sum(r() is not None for r in refs) == 0


# 11 ------------------------------------------------------------------------------------
async def test_11_interruptible_calls_do_not_grow_the_requests_registry() -> None:
    """Bug: _call_interruptible added a cleanup per call (25,008 after 25,000 outputs)."""

    def many(x: int) -> Iterator[int]:
        yield from range(300)

    graph = df.Graph("r", df.map(many, name="many") >> df.map(lambda x: x, name="a", replicas=2))
    seen: list[int] = []
    async with df.Engine(graph) as engine:
        runner = engine._scheduler.runners["a"]  # type: ignore[union-attr]
        for replica in runner.replica_objs:
            replica.interruptible = True  # as a Ray replica is
        stream = engine.stream(1)
        async for _ in stream:
            req = stream._req
            assert req is not None
            seen.append(_owned(req))
    assert max(seen) <= 4


async def test_11_own_and_disown_keep_the_registry_flat() -> None:
    graph = df.Graph("r", df.map(lambda x: x, name="a"))
    async with df.Engine(graph) as engine:
        req = engine._new_request({}, False, float("inf"), None)
        for _ in range(1000):
            req.disown(req.own(lambda: None))
        assert req.owned_count() == 0
        released: list[int] = []
        req.own(lambda: released.append(1))
        req.cancel()
        req.cancel()
        assert released == [1]


def _owned(req: Any) -> int:
    count = getattr(req, "owned_count", None)
    if count is not None:
        return int(count())
    return len(getattr(req, "_cleanups", None) or ())  # the code before ownership


# 12 ------------------------------------------------------------------------------------
async def test_12_tracer_bookkeeping_is_bounded_per_request() -> None:
    """Bug: the tracer's per-request ready map grew with every output."""

    def gen(x: int) -> Iterator[int]:
        yield from range(5000)

    tracer = Tracer(record=False)
    graph = df.Graph("t", df.map(gen, name="gen") >> df.map(lambda x: x, name="b"))
    sizes: list[int] = []
    async with df.Engine(graph, trace=tracer) as engine:
        stream = engine.stream(1)
        async for _ in stream:
            sizes.append(sum(len(m) for m in tracer._ready.values()))
    assert max(sizes) <= 64


# 13 ------------------------------------------------------------------------------------
async def test_13_a_stopped_reader_does_not_block_other_requests() -> None:
    """Bug: a stream reader that stopped reading blocked the exit generator's worker."""

    def gen(x: int) -> Iterator[int]:
        yield from range(100)

    graph = df.Graph("s", df.map(gen, name="gen"))
    with anyio.fail_after(10):
        async with df.Engine(graph, stream_buffer=4) as engine:
            stalled = engine.stream(0)
            assert await stalled.__anext__() == 0  # then never read again
            await wait_all_tasks_blocked()
            assert await engine.run(1) == list(range(100))
            await stalled.aclose()


@pytest.mark.parametrize("placement", ["loop", "thread"])
async def test_13_a_stopped_reader_pauses_only_its_own_request_through_any_node(
    placement: str,
) -> None:
    """The generator is upstream of the exit node: the exit must not wait for the
    stalled reader, and the generator of that request alone waits."""
    produced: dict[int, int] = {}

    def gen(x: int) -> Iterator[int]:
        for i in range(200):
            produced[x] = produced.get(x, 0) + 1
            yield i

    graph = df.Graph(
        "s",
        df.map(gen, name="gen", placement=placement, capacity=2)
        >> df.map(lambda v: v, name="exit", capacity=2),
    )
    with anyio.fail_after(10):
        async with df.Engine(graph, stream_buffer=4) as engine:
            stalled = engine.stream(0)
            assert await stalled.__anext__() == 0  # then never read again
            await wait_all_tasks_blocked()
            assert await engine.run(1) == list(range(200))
            assert [y async for y in engine.stream(2)] == list(range(200))
            assert produced[0] <= 4 + 2 + 2 + 4  # buffer + what was on its way
            await stalled.aclose()


# 14 ------------------------------------------------------------------------------------
async def test_14_stack_of_different_shapes_is_a_clear_error() -> None:
    """Bug: collate='stack' with different lengths silently ran one item per call."""
    graph = df.Graph(
        "b",
        df.infer(lambda t: t.sum(1), name="sum", batch=df.Batch(max_size=4, max_wait=0.05)),
    )
    async with df.Engine(graph) as engine:
        results = [
            r
            async for r in engine.map(
                [torch.ones(n) for n in (2, 3, 2, 3)], return_exceptions=True, window=4
            )
        ]
    assert all(isinstance(r, df.NodeError) for r in results)
    assert "collate='pad'" in str(results[0]) and "'sum'" in str(results[0])


# 15 ------------------------------------------------------------------------------------
async def test_15_wrong_row_count_fails_the_batch_naming_the_counts() -> None:
    """Bug: a batched body returning the wrong number of rows gave every request a row."""
    graph = df.Graph(
        "b",
        df.infer(lambda t: t[:1], name="rows", batch=df.Batch(max_size=4, max_wait=0.05)),
    )
    async with df.Engine(graph) as engine:
        results = [
            r
            async for r in engine.map(
                [torch.ones(2) for _ in range(4)], return_exceptions=True, window=4
            )
        ]
    failed = [r for r in results if isinstance(r, df.NodeError)]
    assert failed and "'rows'" in str(failed[0]) and "1 outputs for" in str(failed[0])


async def test_15_a_bodys_own_timeout_error_is_bisected() -> None:
    def body(values: list[int]) -> list[int]:
        if 3 in values:
            raise TimeoutError("the body's own")
        return values

    graph = df.Graph(
        "b",
        df.map(body, name="b", batch=df.Batch(max_size=4, max_wait=0.05, collate="list")),
    )
    async with df.Engine(graph) as engine:
        results = [r async for r in engine.map(range(4), return_exceptions=True, window=4)]
    assert results[:3] == [0, 1, 2] and isinstance(results[3], df.NodeError)


# 16 ------------------------------------------------------------------------------------
def test_16_unnamed_nodes_get_distinct_stable_names() -> None:
    """Bug: two lambdas without name= were a duplicate-name GraphError."""

    def build() -> df.Graph:
        return df.Graph("l", df.map(lambda x: x + 1) >> df.map(lambda x: x * 2))

    assert list(build().nodes) == list(build().nodes) == ["lambda", "lambda_2"]
    with pytest.raises(df.GraphError, match="duplicate"):
        df.Graph("l", df.map(lambda x: x, name="a") >> df.map(lambda x: x, name="a"))


# 17 ------------------------------------------------------------------------------------
async def test_17_a_stream_read_from_two_tasks_is_an_error() -> None:
    """Bug: one Stream iterated from two tasks submitted two requests."""
    gate = anyio.Event()

    async def held(x: int) -> int:
        await gate.wait()
        return x

    graph = df.Graph("s", df.map(held, name="h"))
    errors: list[BaseException] = []
    async with df.Engine(graph) as engine:
        stream = engine.stream(1)

        async def read() -> None:
            try:
                async for _ in stream:
                    pass
            except RuntimeError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            tg.start_soon(read)
            await wait_all_tasks_blocked()
            gate.set()
        assert engine.counters.submitted == 1
    assert len(errors) == 1 and "another task" in str(errors[0])


# admission, grace, params ---------------------------------------------------------------
async def test_admission_is_first_come_first_served() -> None:
    """Bug: a newcomer arriving as a place freed up took it before the longest waiter."""
    gate = anyio.Event()

    entered: list[int] = []

    async def held(x: int) -> int:
        entered.append(x)
        if x == 0:
            await gate.wait()
        return x

    graph = df.Graph("a", df.map(held, name="h"))
    order: list[int] = []
    async with df.Engine(graph, max_in_flight=1) as engine, anyio.create_task_group() as tg:

        async def run(x: int) -> None:
            await engine.run(x)
            order.append(x)

        first = engine.stream(0)

        async def read_first() -> None:
            with contextlib.suppress(df.DataflowError):
                await first.__anext__()

        tg.start_soon(read_first)
        await wait_all_tasks_blocked()
        for x in (1, 2, 3):
            tg.start_soon(run, x)
            await wait_all_tasks_blocked()
        await first.aclose()  # frees the place; the newcomer below must queue behind
        await run(4)
        gate.set()
    assert entered == [0, 1, 2, 3, 4] and sorted(order) == [1, 2, 3, 4]


async def test_grace_bounds_the_wait_for_a_body_that_never_returns() -> None:
    stop = threading.Event()

    def stuck(x: int) -> int:
        stop.wait(30)
        return x

    graph = df.Graph("g", df.infer(stuck, name="stuck", placement="thread"))
    try:
        with anyio.fail_after(10), pytest.raises(df.DataflowError, match="'stuck'"):
            async with df.Engine(graph, grace=0.2) as engine:
                with pytest.raises(TimeoutError):
                    await engine.run(1, timeout=0.05)
    finally:
        stop.set()


async def test_params_mapping_carries_parameters_named_like_engine_arguments() -> None:
    def body(x: int, timeout: int = 0, y: int = 0) -> int:
        return x + timeout + y

    graph = df.Graph("p", df.map(body, name="p"))
    async with df.Engine(graph) as engine:
        assert await engine.run(1, params={"timeout": 3}) == 4
        assert await engine.run(1, timeout=5, params={"timeout": 3}) == 4
        with pytest.raises(df.InvalidRequest, match="both"):
            await engine.run(1, params={"y": 3}, y=1)
        assert [y async for y in engine.map([1, 2], params={"timeout": 1})] == [2, 3]
        assert [y async for y in engine.stream(1, params={"timeout": 2})] == [3]
