"""Per-item per-hop cost: the engine vs a hand-written asyncio.Queue pipeline vs anyio
memory streams, in the same run.

100,000 small items through a 4-node pass-through graph (loop placement, every edge the
same capacity as the baseline's queues). Prints µs per item per hop and the ratios, and
writes benchmarks/results/hop_cost.json.

    python benchmarks/hop_cost.py [--items N] [--repeats R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
from _common import table, write_result

import dataflow as df

STAGES = 4
_DONE = object()


def _passthrough(x: Any) -> Any:
    return x


async def raw_queue(items: int, capacity: int) -> float:
    """A hand-written asyncio.Queue pipeline: STAGES workers, one queue between each."""
    queues = [asyncio.Queue[Any](capacity) for _ in range(STAGES + 1)]

    async def stage(q_in: asyncio.Queue[Any], q_out: asyncio.Queue[Any]) -> None:
        while True:
            x = await q_in.get()
            if x is _DONE:
                await q_out.put(_DONE)
                return
            await q_out.put(_passthrough(x))

    async def feed() -> None:
        for i in range(items):
            await queues[0].put(i)
        await queues[0].put(_DONE)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(feed)
        for k in range(STAGES):
            tg.start_soon(stage, queues[k], queues[k + 1])
        out = queues[-1]
        while (await out.get()) is not _DONE:
            pass
    return time.perf_counter() - start


async def anyio_streams(items: int, capacity: int) -> float:
    """The same pipeline on anyio memory object streams."""
    pairs = [anyio.create_memory_object_stream[Any](capacity) for _ in range(STAGES + 1)]

    async def stage(k: int) -> None:
        receive = pairs[k][1]
        send = pairs[k + 1][0]
        async with receive, send:
            async for x in receive:
                await send.send(_passthrough(x))

    async def feed() -> None:
        async with pairs[0][0] as send:
            for i in range(items):
                await send.send(i)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(feed)
        for k in range(STAGES):
            tg.start_soon(stage, k)
        async with pairs[-1][1] as receive:
            async for _ in receive:
                pass
    return time.perf_counter() - start


async def engine(items: int, capacity: int, inline: bool = True) -> float:
    """The engine: ``map`` over the inputs through STAGES pass-through nodes."""
    nodes = [df.map(_passthrough, name=f"s{k}", capacity=capacity) for k in range(STAGES)]
    chain = nodes[0]
    graph = df.Graph("hops", chain) if STAGES == 1 else df.Graph("hops", _chain(nodes))
    async with df.Engine(graph, inline=inline) as eng:
        start = time.perf_counter()
        n = 0
        async for _ in eng.map(range(items)):
            n += 1
        elapsed = time.perf_counter() - start
    assert n == items
    return elapsed


def _chain(nodes: list[df.Node]) -> df.Chain:
    chain = nodes[0] >> nodes[1]
    for node in nodes[2:]:
        chain = chain >> node
    return chain


Bench = Callable[[int, int], Coroutine[Any, Any, float]]


async def engine_queued(items: int, capacity: int) -> float:
    """The engine with inlining off: every item crosses every channel."""
    return await engine(items, capacity, inline=False)


def measure(fn: Bench, backend: str, items: int, capacity: int, repeats: int) -> float:
    """Median µs per item per hop over ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        seconds = anyio.run(fn, items, capacity, backend=backend)
        times.append(seconds / items / STAGES * 1e6)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rows = []
    results: dict[str, Any] = {"items": args.items, "stages": STAGES, "runs": []}
    for backend in ("asyncio", "trio"):
        for capacity in (16, 1):
            base = measure(raw_queue, "asyncio", args.items, capacity, args.repeats)
            ours = measure(engine, backend, args.items, capacity, args.repeats)
            queued = measure(engine_queued, backend, args.items, capacity, args.repeats)
            streams = measure(anyio_streams, backend, args.items, capacity, args.repeats)
            run = {
                "backend": backend,
                "capacity": capacity,
                "raw_asyncio_queue_us": base,
                "engine_us": ours,
                "engine_queued_us": queued,
                "anyio_streams_us": streams,
                "engine_vs_raw": ours / base,
                "engine_queued_vs_raw": queued / base,
                "anyio_vs_raw": streams / base,
            }
            results["runs"].append(run)
            rows.append(
                [
                    backend,
                    str(capacity),
                    f"{base:.3f}",
                    f"{ours:.3f} ({ours / base:.2f}x)",
                    f"{queued:.3f} ({queued / base:.2f}x)",
                    f"{streams:.3f} ({streams / base:.2f}x)",
                ]
            )
    header = ["backend", "cap", "raw queue", "engine", "engine inline=False", "anyio streams"]
    print("µs per item per hop (ratio to the raw asyncio.Queue pipeline)")
    print(table(header, rows))
    print("targets: cap 16 ≤ 1.0x (asyncio), ≤ 1.2x (trio); cap 1 ≤ 1.5x; medians of runs")
    write_result("hop_cost", results)
    return results


if __name__ == "__main__":
    main()
