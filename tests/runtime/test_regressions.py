"""Regression tests, each named after the bug it pins (found in review of the core)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import pytest
from anyio import wait_all_tasks_blocked

import dataflow as df
from tests.runtime.test_semantics import Gate

pytestmark = pytest.mark.anyio


async def test_cancel_shutdown_refuses_callers_still_waiting_for_room() -> None:
    """Bug: shutdown="cancel" left callers parked on a full channel waiting forever."""
    graph = df.Graph("full", df.map(Gate(), name="gate", capacity=1))
    outcomes: list[str] = []

    async def caller(engine: df.Engine, x: int) -> None:
        try:
            await engine.run(x)
            outcomes.append("result")
        except df.EngineClosed:
            outcomes.append("closed")

    engine = df.Engine(graph, shutdown="cancel", inline=False)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, engine:
            for x in range(4):
                tg.start_soon(caller, engine, x)
                await wait_all_tasks_blocked()
    assert outcomes == ["closed"] * 4
    assert engine.stats()["requests"]["cancelled"] == 4


async def test_an_interrupted_drain_cancels_bodies_that_never_return() -> None:
    """Bug: cancelling the task that drains left the engine waiting on the bodies."""
    graph = df.Graph("stuck", df.map(Gate(), name="gate"))
    errors: list[BaseException] = []

    async def caller(engine: df.Engine) -> None:
        try:
            await engine.run(1)
        except df.EngineClosed as exc:
            errors.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as scope:
                engine = df.Engine(graph, inline=False)
                async with engine:
                    tg.start_soon(caller, engine)
                    await wait_all_tasks_blocked()

                    async def interrupt_the_drain() -> None:
                        await wait_all_tasks_blocked()
                        scope.cancel()

                    tg.start_soon(interrupt_the_drain)
    assert engine.state is df.EngineState.CLOSED
    assert len(errors) == 1


async def test_a_borrowed_call_meets_its_deadline_while_its_output_is_full() -> None:
    """Bug: a caller running a thread node itself waited past its deadline for room."""
    gate = Gate()
    graph = df.Graph(
        "borrow",
        df.infer(lambda x: x, name="t", placement="thread")
        >> df.map(gate, name="gate", capacity=1),
    )
    async with df.Engine(graph) as engine, anyio.create_task_group() as tg:
        tg.start_soon(engine.run, 0)  # held by the gate
        await wait_all_tasks_blocked()
        tg.start_soon(engine.run, 1)  # fills the gate's channel
        await wait_all_tasks_blocked()
        with anyio.fail_after(5), pytest.raises(TimeoutError):
            await engine.run(2, timeout=0.05)
        gate.open.set()


async def test_map_with_admission_full_and_a_batched_node() -> None:
    """Bug: a batch submission with no admission room divided by zero."""

    def double_all(xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    graph = df.Graph(
        "adm",
        df.map(lambda x: x + 1, name="inc")
        >> df.map(double_all, name="dbl", batch=df.Batch(max_size=4, collate="list")),
    )
    async with df.Engine(graph, max_in_flight=1) as engine:
        assert [r async for r in engine.map(range(5), window=3)] == [2, 4, 6, 8, 10]


async def test_the_deadline_heap_drops_requests_that_ended() -> None:
    """Bug: every request with a deadline stayed in the heap (with its outputs) until the
    deadline passed, however long ago it ended."""
    graph = df.Graph("d", df.map(lambda x: x, name="id"))
    async with df.Engine(graph) as engine:
        for x in range(300):
            await engine.run(x, timeout=3600)
        assert engine._deadlines is not None
        assert len(engine._deadlines._heap) <= 64 + 1


async def test_time_of_nodes_run_inline_is_not_charged_to_the_producer() -> None:
    """Bug: a node's busy time included the downstream nodes it ran inline."""

    def tokens(n: int) -> Iterator[int]:
        yield from range(n)

    def slow(x: int) -> int:
        time.sleep(0.005)  # simulated work in a node body (intended)
        return x

    graph = df.Graph(
        "busy", df.map(tokens) >> df.map(lambda x: x, name="a") >> df.map(slow, name="b")
    )
    async with df.Engine(graph) as engine:
        assert len(await engine.run(20)) == 20
        nodes = engine.stats()["nodes"]
    assert sum(nodes["b"]["busy_s"]) >= 20 * 0.005
    assert sum(nodes["a"]["busy_s"]) < sum(nodes["b"]["busy_s"]) / 4
