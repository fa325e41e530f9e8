"""Dynamic batching (``batch=df.Batch(...)``): equal results, isolation, cancellation,
statistics, and order across replicas."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import torch

import dataflow as df

pytestmark = pytest.mark.anyio


class Recorder:
    """Remembers the values of every batch a body was called with (thread-safe)."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self._lock = threading.Lock()

    def add(self, values: Any) -> None:
        with self._lock:
            self.batches.append(list(values))


def affine(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


async def test_batched_outputs_equal_unbatched_outputs() -> None:
    calls = Recorder()

    def batched(x: torch.Tensor) -> torch.Tensor:
        calls.add(x.tolist())
        return affine(x)

    inputs = [torch.tensor([float(i), -float(i)]) for i in range(64)]
    plain = df.Graph("plain", df.infer(affine, placement="thread"))
    many = df.Graph(
        "batched",
        df.infer(batched, placement="thread", batch=df.Batch(max_size=16, max_wait=0.01)),
    )
    async with df.Engine(plain) as engine:
        expected = [out async for out in engine.map(inputs)]
    async with df.Engine(many) as engine:
        got = [out async for out in engine.map(inputs, window=64)]
        sizes = engine.stats()["nodes"]["batched"]["batch_sizes"]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert max(len(b) for b in calls.batches) > 1  # it really batched
    assert sum(size * n for size, n in sizes.items()) == 64


async def test_padded_batches_equal_unbatched_outputs() -> None:
    def total(x: torch.Tensor) -> torch.Tensor:
        return x.sum()

    def total_padded(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        padded, lengths = batch
        mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
        return (padded * mask).sum(dim=1)

    inputs = [torch.arange(1, n + 2, dtype=torch.float32) for n in range(20)]
    node = df.infer(total_padded, batch=df.Batch(max_size=8, max_wait=0.01, collate="pad"))
    async with df.Engine(df.Graph("pad", node)) as engine:
        got = [out async for out in engine.map(inputs, window=20)]
    assert [float(g) for g in got] == [float(total(x)) for x in inputs]


async def test_failure_in_a_batch_fails_only_the_guilty_request() -> None:
    calls = Recorder()

    def body(values: list[int]) -> list[int]:
        calls.add(values)
        if 13 in values:
            raise ValueError("unlucky")
        return [v * 10 for v in values]

    node = df.map(body, name="tens", batch=df.Batch(max_size=16, max_wait=0.05, collate="list"))
    async with df.Engine(df.Graph("g", node)) as engine:
        results = [r async for r in engine.map(range(16), window=16, return_exceptions=True)]
        stats = engine.stats()
    for i, result in enumerate(results):
        if i == 13:
            assert isinstance(result, df.NodeError) and result.node == "tens"
            assert isinstance(result.__cause__, ValueError)
        else:
            assert result == i * 10
    assert stats["requests"]["failed"] == 1 and stats["requests"]["succeeded"] == 15
    # Bisection: the guilty item was retried alone; far fewer calls than one per item.
    assert [13] in calls.batches
    assert len(calls.batches) < 16


async def test_request_cancelled_while_pending_is_removed_before_the_batch_runs() -> None:
    calls = Recorder()

    def body(values: list[int]) -> list[int]:
        calls.add(values)
        return values

    # The batch only closes when full, so early requests wait in it until they end.
    node = df.map(body, name="b", batch=df.Batch(max_size=4, max_wait=60, collate="list"))
    async with df.Engine(df.Graph("g", node)) as engine:
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def cancelled_caller() -> None:
                with scope:
                    await engine.run(100)

            tg.start_soon(cancelled_caller)
            await anyio.wait_all_tasks_blocked()  # 100 is pending in the batch
            scope.cancel()
        with pytest.raises(TimeoutError):
            await engine.run(200, timeout=0.05)
        results: list[int] = []
        async with anyio.create_task_group() as tg:
            for i in range(2):

                async def one(i: int = i) -> None:
                    results.append(await engine.run(i))

                tg.start_soon(one)
        stats = engine.stats()
    assert sorted(results) == [0, 1]
    assert [sorted(b) for b in calls.batches] == [[0, 1]]  # 100 and 200 never computed
    assert stats["requests"]["cancelled"] == 2
    assert stats["nodes"]["b"]["cancelled"] == 2


async def test_batch_statistics_report_sizes_and_wait() -> None:
    def body(values: list[int]) -> list[int]:
        return values

    node = df.map(body, name="b", batch=df.Batch(max_size=8, max_wait=5, collate="list"))
    async with df.Engine(df.Graph("g", node)) as engine:
        assert [r async for r in engine.map(range(8), window=8)] == list(range(8))
        stats = engine.stats()["nodes"]["b"]
    assert stats["batch_sizes"] == {8: 1}
    assert 0 <= stats["batch_wait_p50_s"] < 5  # closed when full, not at max_wait


async def test_requests_with_different_parameters_go_in_separate_calls() -> None:
    calls = Recorder()

    def body(values: list[int], *, scale: int = 1) -> list[int]:
        calls.add([(v, scale) for v in values])
        return [v * scale for v in values]

    node = df.map(body, batch=df.Batch(max_size=8, max_wait=0.05, collate="list"))
    async with df.Engine(df.Graph("g", node)) as engine, anyio.create_task_group() as tg:
        out: dict[tuple[int, int], int] = {}
        for v in range(4):
            for scale in (1, 3):

                async def one(v: int = v, scale: int = scale) -> None:
                    out[v, scale] = await engine.run(v, scale=scale)

                tg.start_soon(one)
    assert out == {(v, s): v * s for v in range(4) for s in (1, 3)}
    assert all(len({s for _, s in batch}) == 1 for batch in calls.batches)


def numbers(n: int) -> Iterator[int]:
    yield from range(n)


async def test_replicas_keep_each_streams_order_across_batches() -> None:
    def slow_when_first_is_even(values: list[int]) -> list[int]:
        # Batches finish out of order: one replica is slow when the other is fast.
        if (values[0] // 4) % 2 == 0:
            time.sleep(0.01)  # simulated work (intended)
        return [v + 1000 for v in values]

    gen = df.map(numbers, name="numbers")
    batched = df.infer(
        slow_when_first_is_even,
        placement="thread",
        replicas=2,
        batch=df.Batch(max_size=4, max_wait=0.001, collate="list"),
    )
    async with df.Engine(df.Graph("g", gen >> batched)) as engine:
        out = [v async for v in engine.stream(48)]
    assert out == [v + 1000 for v in range(48)]


async def test_slow_batch_past_the_node_timeout_fails_its_requests() -> None:
    release = threading.Event()

    def body(values: list[int]) -> list[int]:
        if 7 in values:
            release.wait(10)  # stuck until the test has seen the timeout
        return values

    node = df.infer(
        body,
        name="t",
        placement="thread",
        timeout=0.05,
        batch=df.Batch(max_size=1, collate="list"),
    )
    async with df.Engine(df.Graph("g", node)) as engine:
        with pytest.raises(df.NodeError) as info:
            await engine.run(7)
        assert isinstance(info.value.__cause__, TimeoutError)
        release.set()
        assert await engine.run(3) == 3
