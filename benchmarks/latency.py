"""Round-trip latency of one request at a time (no concurrency).

1. ``engine.run`` through a 4-node loop-placement pass-through graph: p50/p99 in µs
   (target p50 ≤ 15 µs).
2. A graph with one thread-placement node vs a hand-written ``loop.run_in_executor``
   round trip of the same function, in the same run (target ≤ 1.0x).

Writes benchmarks/results/latency.json.

    python benchmarks/latency.py [--requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import time
from typing import Any

from _common import table, write_result

import dataflow as df


def _passthrough(x: Any) -> Any:
    return x


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return p50 * 1e6, p99 * 1e6


async def loop_graph(requests: int) -> list[float]:
    nodes = [df.map(_passthrough, name=f"s{k}") for k in range(4)]
    return await round_trips(
        df.Graph("loop4", nodes[0] >> nodes[1] >> nodes[2] >> nodes[3]), requests
    )


async def thread_graph(requests: int) -> list[float]:
    graph = df.Graph("thread1", df.infer(_passthrough, name="t", placement="thread"))
    return await round_trips(graph, requests)


async def round_trips(graph: df.Graph, requests: int) -> list[float]:
    """Seconds per ``engine.run``, one request at a time, after a warm-up."""
    samples = []
    async with df.Engine(graph) as engine:
        for i in range(requests // 10):
            await engine.run(i)
        for i in range(requests):
            start = time.perf_counter()
            await engine.run(i)
            samples.append(time.perf_counter() - start)
    return samples


async def run_in_executor(requests: int) -> list[float]:
    loop = asyncio.get_running_loop()
    samples = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        for i in range(requests // 10):
            await loop.run_in_executor(pool, _passthrough, i)
        for i in range(requests):
            start = time.perf_counter()
            await loop.run_in_executor(pool, _passthrough, i)
            samples.append(time.perf_counter() - start)
    return samples


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    runs: dict[str, list[tuple[float, float]]] = {"loop4": [], "thread1": [], "executor": []}
    for _ in range(args.repeats):
        # Interleave so that machine noise hits every variant alike.
        runs["loop4"].append(_percentiles(asyncio.run(loop_graph(args.requests))))
        runs["executor"].append(_percentiles(asyncio.run(run_in_executor(args.requests))))
        runs["thread1"].append(_percentiles(asyncio.run(thread_graph(args.requests))))
    med = {
        k: (statistics.median(p[0] for p in v), statistics.median(p[1] for p in v))
        for k, v in runs.items()
    }
    ratio = med["thread1"][0] / med["executor"][0]
    rows = [
        ["4-node loop graph", f"{med['loop4'][0]:.1f}", f"{med['loop4'][1]:.1f}", "p50 ≤ 15 µs"],
        ["run_in_executor", f"{med['executor'][0]:.1f}", f"{med['executor'][1]:.1f}", ""],
        [
            "1 thread node",
            f"{med['thread1'][0]:.1f}",
            f"{med['thread1'][1]:.1f}",
            f"{ratio:.2f}x executor (≤ 1.0x)",
        ],
    ]
    print(table(["round trip", "p50 µs", "p99 µs", "target"], rows))
    result = {
        "requests": args.requests,
        "repeats": args.repeats,
        "loop4_p50_us": med["loop4"][0],
        "loop4_p99_us": med["loop4"][1],
        "executor_p50_us": med["executor"][0],
        "executor_p99_us": med["executor"][1],
        "thread1_p50_us": med["thread1"][0],
        "thread1_p99_us": med["thread1"][1],
        "thread_vs_executor_p50": ratio,
    }
    write_result("latency", result)
    return result


if __name__ == "__main__":
    main()
