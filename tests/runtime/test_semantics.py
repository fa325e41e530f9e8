"""The contracts of DESIGN.md section 4, on asyncio and trio: one outcome per request,
backpressure, admission, cancellation, deadlines, ordering, shutdown."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from anyio import wait_all_tasks_blocked

import dataflow as df

pytestmark = pytest.mark.anyio


class Gate:
    """A node body that holds each item until the test lets it through."""

    def __init__(self) -> None:
        self.open = anyio.Event()
        self.entered = 0

    async def __call__(self, x: int) -> int:
        self.entered += 1
        await self.open.wait()
        return x


class Counter:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x: int) -> int:
        self.calls.append(x)
        return x


def balanced(stats: dict[str, int]) -> bool:
    return stats["submitted"] == (
        stats["succeeded"] + stats["failed"] + stats["cancelled"] + stats["in_flight"]
    )


async def test_deadline_cancels_the_request_everywhere() -> None:
    gate, after = Gate(), Counter()
    graph = df.Graph("g", df.map(gate, name="gate") >> df.map(after, name="after"))
    async with df.Engine(graph) as engine:
        with pytest.raises(TimeoutError):
            await engine.run(1, timeout=0.05)
        gate.open.set()
        assert await engine.run(2) == 2
        stats = engine.stats()
    # The timed-out item left the gate after its deadline and was dropped, not computed.
    assert after.calls == [2]
    assert sum(n["cancelled"] for n in stats["nodes"].values()) == 1
    assert stats["requests"]["timed_out"] == stats["requests"]["cancelled"] == 1
    assert balanced(stats["requests"])


async def test_cancelling_the_caller_cancels_the_request() -> None:
    gate, after = Gate(), Counter()
    graph = df.Graph("g", df.map(gate, name="gate") >> df.map(after, name="after"))
    async with df.Engine(graph) as engine:
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run, 1)
            await wait_all_tasks_blocked()
            assert gate.entered == 1
            tg.cancel_scope.cancel()
        gate.open.set()
        assert await engine.run(2) == 2
        stats = engine.stats()
    assert after.calls == [2]
    assert stats["requests"]["cancelled"] == 1
    assert stats["requests"]["timed_out"] == 0


async def test_deadline_racing_the_result_gives_one_agreed_outcome() -> None:
    """Results arriving as their deadline expires: what callers saw equals the stats."""
    rng = random.Random(3)

    def work(x: float) -> float:
        time.sleep(x)  # simulated work in a node body (intended)
        return x

    graph = df.Graph("race", df.infer(work, name="work", placement="thread", replicas=4))
    results = timeouts = 0
    async with df.Engine(graph) as engine:

        async def one(delay: float) -> None:
            nonlocal results, timeouts
            try:
                await engine.run(delay, timeout=0.004)
                results += 1
            except TimeoutError:
                timeouts += 1

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(one, rng.uniform(0.002, 0.006))
        stats = engine.stats()["requests"]
    assert results + timeouts == 200
    assert stats["succeeded"] == results
    assert stats["timed_out"] == stats["cancelled"] == timeouts
    assert stats["in_flight"] == 0


async def test_exactly_one_outcome_under_faults_and_random_cancellations() -> None:
    rng = random.Random(11)

    def flaky(x: int) -> int:
        if x % 7 == 3:
            raise ValueError(f"fault on {x}")
        return x

    def work(x: int) -> int:
        time.sleep(rng.uniform(0, 0.002))  # simulated work in a node body (intended)
        return x

    async def hop(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x

    graph = df.Graph(
        "faults",
        df.map(flaky)
        >> df.infer(work, name="work", placement="thread", replicas=2)
        >> df.map(hop, replicas=2),
    )
    seen = {"result": 0, "error": 0, "timeout": 0, "cancelled": 0}
    async with df.Engine(graph, max_in_flight=16) as engine:

        async def one(x: int) -> None:
            with anyio.move_on_after(rng.choice([0.0005, 0.002, 10])) as scope:
                try:
                    assert await engine.run(x, timeout=rng.choice([0.001, 0.003, None])) == x
                    seen["result"] += 1
                except df.NodeError as exc:
                    assert isinstance(exc.__cause__, ValueError)
                    seen["error"] += 1
                except TimeoutError:
                    seen["timeout"] += 1
            if scope.cancelled_caught:
                seen["cancelled"] += 1

        async with anyio.create_task_group() as tg:
            for x in range(300):
                tg.start_soon(one, x)
        stats = engine.stats()["requests"]
        assert engine.items_inside() == 0
    assert sum(seen.values()) == 300
    assert stats["in_flight"] == 0
    assert balanced(stats)
    # A caller that saw an outcome saw the one the stats counted; only a caller cancelled
    # from outside may miss the outcome its request reached at the same moment.
    assert seen["result"] <= stats["succeeded"]
    assert seen["error"] <= stats["failed"]
    assert seen["timeout"] <= stats["timed_out"]
    missed = (
        stats["succeeded"]
        - seen["result"]
        + stats["failed"]
        - seen["error"]
        + stats["cancelled"]
        - seen["timeout"]
    )
    # Callers cancelled while waiting for admission never submitted anything.
    never_submitted = 300 - stats["submitted"]
    assert missed + never_submitted == seen["cancelled"]


async def test_leaving_a_stream_early_cancels_its_generator() -> None:
    produced: list[int] = []

    def forever(x: int) -> Iterator[int]:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    graph = df.Graph("inf", df.map(forever))
    with anyio.fail_after(10):  # a request that was not cancelled would never drain
        async with df.Engine(graph, stream_buffer=4) as engine:
            stream = engine.stream(0)
            got = []
            async for tok in stream:
                got.append(tok)
                if len(got) == 3:
                    break
            await stream.aclose()
            assert got == [0, 1, 2]
            async with engine.stream(0) as second:
                async for tok in second:
                    if tok == 5:
                        break
            stats = engine.stats()["requests"]
    assert stats["cancelled"] == 2
    assert stats["in_flight"] == 0
    # Bounded by what the stream buffer and channels could hold, not runaway.
    assert len(produced) < 3 + 6 + 40


async def test_break_alone_cancels_the_stream() -> None:
    async def forever(x: int) -> AsyncIterator[int]:
        i = 0
        while True:
            await anyio.lowlevel.checkpoint()
            yield i
            i += 1

    graph = df.Graph("inf", df.map(forever))
    with anyio.fail_after(10):
        async with df.Engine(graph) as engine:
            async for tok in engine.stream(0):
                if tok == 2:
                    break
            stats = engine.stats()["requests"]
    assert stats["cancelled"] == 1


async def test_admission_waits_or_refuses() -> None:
    gate = Gate()
    graph = df.Graph("adm", df.map(gate, name="gate", replicas=4))
    async with df.Engine(graph, max_in_flight=2) as engine:
        done: list[int] = []

        async def one(x: int) -> None:
            done.append(await engine.run(x))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 1)
            tg.start_soon(one, 2)
            await wait_all_tasks_blocked()
            with pytest.raises(df.Overloaded, match="max_in_flight=2"):
                await engine.run(3, wait=False)
            tg.start_soon(one, 4)  # waits for room
            await wait_all_tasks_blocked()
            # Three in flight, one of them waiting for admission: only two got in.
            assert engine.stats()["requests"]["in_flight"] == 3
            assert gate.entered == 2
            gate.open.set()
        assert sorted(done) == [1, 2, 4]
        # Waiting for admission honours the deadline too.
        gate.open = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 5)
            tg.start_soon(one, 6)
            await wait_all_tasks_blocked()
            with pytest.raises(TimeoutError):
                await engine.run(7, timeout=0.02)
            assert gate.entered == 5  # 1, 2, 4, 5, 6: 7 never got in
            gate.open.set()
        stats = engine.stats()["requests"]
    assert stats["submitted"] == 6  # the refused request is not counted
    assert stats["succeeded"] == 5
    assert stats["timed_out"] == 1  # it timed out waiting for admission


async def test_backpressure_bounds_items_inside_with_a_slow_consumer() -> None:
    pulled = 0

    def inputs() -> Iterator[int]:
        nonlocal pulled
        for i in range(300):
            pulled += 1
            yield i

    graph = df.Graph(
        "bp",
        df.map(lambda x: x, name="a", capacity=4)
        >> df.infer(lambda x: x, name="b", placement="thread", capacity=4)
        >> df.map(lambda x: x, name="c", capacity=4),
    )
    async with df.Engine(graph) as engine:
        window = 8
        consumed = 0
        peak_inside = peak_ahead = 0
        async for _ in engine.map(inputs(), window=window):
            consumed += 1
            await anyio.sleep(0.0005)  # the consumer is much slower than the graph (intended)
            peak_inside = max(peak_inside, engine.items_inside())
            peak_ahead = max(peak_ahead, pulled - consumed)
        assert consumed == 300
    assert peak_ahead <= window
    assert peak_inside <= window


async def test_graph_memory_is_bounded_by_capacities_not_input() -> None:
    """A generator fans one input out to many items: channels, not input, bound them."""

    def many(n: int) -> Iterator[int]:
        yield from range(n)

    graph = df.Graph(
        "fanout",
        df.map(many, capacity=2) >> df.map(lambda x: x, name="copy", capacity=3),
    )
    async with df.Engine(graph, stream_buffer=2) as engine:
        bound = 2 + 3 + 2 + 2  # channel capacities + stream buffer + items in hand
        peak = 0
        count = 0
        async for _ in engine.stream(2000):
            count += 1
            await anyio.lowlevel.checkpoint()
            peak = max(peak, engine.items_inside())
        assert count == 2000
    assert peak <= bound


async def test_replicas_keep_order_when_ordered() -> None:
    rng = random.Random(5)

    def jitter(x: int) -> int:
        time.sleep(rng.uniform(0, 0.002))  # simulated work in a node body (intended)
        return x

    def tokens(n: int) -> Iterator[int]:
        yield from range(n)

    ordered = df.Graph(
        "ord",
        df.map(tokens) >> df.infer(jitter, name="j", placement="thread", replicas=4),
    )
    async with df.Engine(ordered) as engine:
        assert [t async for t in engine.stream(60)] == list(range(60))
        assert engine.stats()["nodes"]["j"]["items_in"] == 60

    unordered = df.Graph(
        "unord",
        df.map(tokens) >> df.infer(jitter, name="j", placement="thread", replicas=4, ordered=False),
    )
    async with df.Engine(unordered) as engine:
        assert sorted([t async for t in engine.stream(60)]) == list(range(60))


async def test_drain_lets_in_flight_requests_finish(no_thread_leak: None) -> None:
    gate = Gate()
    graph = df.Graph(
        "drain", df.map(gate) >> df.infer(lambda x: -x, name="neg", placement="thread")
    )
    results: list[int] = []
    async with anyio.create_task_group() as tg:
        engine = df.Engine(graph)
        async with engine:

            async def caller() -> None:
                results.append(await engine.run(5))

            async def release_when_draining() -> None:
                await wait_all_tasks_blocked()
                assert engine.state is df.EngineState.CLOSING
                gate.open.set()

            tg.start_soon(caller)
            await wait_all_tasks_blocked()
            tg.start_soon(release_when_draining)
    assert results == [-5]
    assert engine.stats()["requests"]["succeeded"] == 1


async def test_cancel_shutdown_fails_in_flight_requests(no_thread_leak: None) -> None:
    gate = Gate()  # never opened
    graph = df.Graph("cancel", df.map(gate) >> df.infer(lambda x: x, name="t", placement="thread"))
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg, df.Engine(graph, shutdown="cancel") as engine:

        async def caller() -> None:
            try:
                await engine.run(1)
            except df.EngineClosed as exc:
                errors.append(exc)

        tg.start_soon(caller)
        await wait_all_tasks_blocked()
    assert len(errors) == 1
    assert engine.stats()["requests"]["cancelled"] == 1


async def test_an_exception_in_the_block_cancels_and_propagates(no_thread_leak: None) -> None:
    gate = Gate()
    graph = df.Graph("exc", df.map(gate) >> df.infer(lambda x: x, name="t", placement="thread"))
    errors: list[BaseException] = []

    async def caller(engine: df.Engine) -> None:
        try:
            await engine.run(1)
        except df.EngineClosed as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        with pytest.raises(KeyError):
            async with df.Engine(graph) as engine:
                tg.start_soon(caller, engine)
                await wait_all_tasks_blocked()
                raise KeyError("boom")
    assert len(errors) == 1
    assert engine.stats()["requests"]["cancelled"] == 1


async def test_shard_failure_fails_the_request_once_and_drops_other_parts() -> None:
    def part(x: int) -> int:
        if x == 2:
            raise ValueError("bad part")
        return x

    graph = df.Graph(
        "sh",
        df.shard(lambda n: list(range(n)), name="split")
        >> df.map(part, replicas=2)
        >> df.merge("sum"),
    )
    async with df.Engine(graph) as engine:
        with pytest.raises(df.NodeError, match="bad part"):
            await engine.run(5)
        assert await engine.run(2) == 1
        stats = engine.stats()
    assert stats["requests"]["failed"] == 1
    assert stats["nodes"]["merge_sum"]["pending_parts"] == 0
    assert engine.items_inside() == 0


async def test_concurrent_shards_never_mix() -> None:
    def work(x: tuple[int, int]) -> tuple[int, int]:
        time.sleep(random.uniform(0, 0.001))  # simulated work in a node body (intended)
        return x

    graph = df.Graph(
        "mix",
        df.shard(lambda r: [(r, i) for i in range(5)], name="split")
        >> df.infer(work, name="work", placement="thread", replicas=3, ordered=False)
        >> df.merge(lambda parts: parts, name="gather"),
    )
    async with df.Engine(graph) as engine:
        async for parts in engine.map(range(50), ordered=False):
            rid = parts[0][0]
            assert parts == [(rid, i) for i in range(5)]


async def test_an_ordered_replicated_generator_streams_every_request_at_once() -> None:
    """With replicas and ordered=True, order is kept within each request: a request's
    tokens go out as they are produced whatever other requests are doing (a later one
    is not held behind an earlier one that is still running)."""
    gates = [anyio.Event() for _ in range(6)]

    async def tokens(x: int) -> AsyncIterator[int]:
        for i in range(3):
            yield x * 10 + i
            if x == 0:
                await gates[i].wait()

    graph = df.Graph("gen", df.map(tokens, replicas=2))
    async with df.Engine(graph) as engine:
        first = engine.stream(0)
        assert await first.__anext__() == 0  # while its generator is still running
        # Request 1 runs to its end on the other replica while request 0 waits.
        assert [t async for t in engine.stream(1)] == [10, 11, 12]
        for i in (1, 2):
            gates[i - 1].set()
            assert await first.__anext__() == i
        gates[2].set()
        with pytest.raises(StopAsyncIteration):
            await first.__anext__()


async def test_a_caller_borrowing_an_idle_thread_node_keeps_order_and_deadlines() -> None:
    """A request entering an idle graph runs the thread node from the caller's task;
    requests arriving meanwhile queue behind it, and a deadline still ends the wait."""
    started = threading.Event()
    release = threading.Event()

    def body(x: int) -> int:
        if x == 0:
            started.set()
            release.wait(10)
        return x

    graph = df.Graph("borrow", df.infer(body, name="t", placement="thread"))
    order: list[int] = []
    async with df.Engine(graph) as engine:

        async def call(x: int) -> None:
            order.append(await engine.run(x))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 0)
            await anyio.to_thread.run_sync(started.wait)
            for x in (1, 2):
                tg.start_soon(call, x)
                await wait_all_tasks_blocked()
            with pytest.raises(TimeoutError):
                await engine.run(3, timeout=0.01)
            release.set()
        stats = engine.stats()
    assert order == [0, 1, 2]
    assert stats["requests"]["timed_out"] == 1
    assert stats["edges"]["input->t"]["items"] == 4
