"""Pipeline parallelism: measured throughput vs the GPipe prediction, in the same run.

A model of p equal stages (Linear + Tanh blocks) is split with
``dataflow.nodes.split_stages``: each stage a thread with one intra-op thread, each batch
split into m micro-batches. GPipe predicts that one batch takes (m + p - 1) stage steps,
i.e. a bubble fraction of (p - 1) / (m + p - 1), each step as long as the slowest stage.
Stage times are measured in the same run two ways: each stage alone on one core
(``alone``) and the engine's own per-item service time while the pipeline ran
(``in run``). Also measured: the unsplit model on one core (the serial baseline) and
back-to-back batches (no flush between batches: the steady state, 1 / max stage time).

    python benchmarks/pipeline.py [--stages P] [--micro-batches M] [--batches N]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

import anyio
import torch
from _common import table, write_result
from torch import nn

import dataflow as df
from dataflow.nodes import split_stages


def build_model(stages: int, blocks: int, dim: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(stages * blocks)]
    return nn.Sequential(*layers).eval()


def time_alone(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``module(x)`` in a fresh thread with one intra-op thread."""
    times: list[float] = []

    def run() -> None:
        torch.set_num_threads(1)
        with torch.inference_mode():
            module(x)
            for _ in range(repeats):
                start = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - start)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return statistics.median(times)


async def run_engine(
    chain: df.Chain, batches: list[torch.Tensor], stage_names: list[str]
) -> dict[str, Any]:
    graph = df.Graph("pipeline", chain)
    async with df.Engine(graph) as engine:
        await engine.run(batches[0])  # warm-up: threads, allocator
        start = time.perf_counter()
        for x in batches:
            await engine.run(x)  # one batch at a time: the pipeline fills and drains
        flushed = time.perf_counter() - start
        service = engine.stats()["nodes"]
        start = time.perf_counter()
        async for _ in engine.map(batches):  # batches back to back: no bubble
            pass
        streamed = time.perf_counter() - start
    return {
        "flushed_s": flushed,
        "streamed_s": streamed,
        "service_s": [service[name]["service_p50_s"] for name in stage_names],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64, help="rows per micro-batch")
    parser.add_argument("--blocks", type=int, default=3, help="blocks per stage")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    p, m = args.stages, args.micro_batches
    # The loop thread's own torch work (split views, the merge's cat) is tiny; with the
    # default pool its idle OpenMP workers spin and steal the stages' cores.
    torch.set_num_threads(1)
    model = build_model(p, args.blocks, args.dim)
    chain = split_stages(model, stages=p, micro_batches=m, placements="thread", threads=1)
    stage_nodes = [n for n in chain if n.kind == "infer"]
    micro = torch.randn(args.rows, args.dim)
    batch_rows = args.rows * m
    batches = [torch.randn(batch_rows, args.dim) for _ in range(args.batches)]

    alone_before = [time_alone(n.body, micro, args.repeats) for n in stage_nodes]
    serial = time_alone(model, batches[0], max(3, args.repeats // m))
    run = anyio.run(run_engine, chain, batches, [n.name for n in stage_nodes])
    alone_after = [time_alone(n.body, micro, args.repeats) for n in stage_nodes]
    alone = [(a + b) / 2 for a, b in zip(alone_before, alone_after, strict=True)]

    bubble = (p - 1) / (m + p - 1)
    measured = batch_rows * args.batches / run["flushed_s"]
    streamed = batch_rows * args.batches / run["streamed_s"]
    rows: list[list[str]] = []
    results: dict[str, Any] = {
        "stages": p,
        "micro_batches": m,
        "rows_per_micro_batch": args.rows,
        "dim": args.dim,
        "batches": args.batches,
        "bubble_fraction": bubble,
        "stage_alone_s": alone,
        "stage_in_run_s": run["service_s"],
        "serial_rows_per_s": batch_rows / serial,
        "flushed_rows_per_s": measured,
        "streamed_rows_per_s": streamed,
    }
    for label, stage_times in (("in run", run["service_s"]), ("alone", alone)):
        slowest = max(stage_times)
        gpipe = batch_rows / ((m + p - 1) * slowest)
        steady = args.rows / slowest
        results[f"gpipe_rows_per_s_{label.replace(' ', '_')}"] = gpipe
        results[f"steady_rows_per_s_{label.replace(' ', '_')}"] = steady
        rows.append(
            [
                f"stage time {label}",
                " / ".join(f"{t * 1e3:.2f}" for t in stage_times),
                f"{gpipe:,.0f}",
                f"{measured:,.0f}",
                f"{measured / gpipe:.3f}",
                f"{steady:,.0f}",
                f"{streamed:,.0f}",
                f"{streamed / steady:.3f}",
            ]
        )
    print(
        f"p={p} stages, m={m} micro-batches of {args.rows} rows, bubble (p-1)/(m+p-1) = "
        f"{bubble:.3f}; serial (unsplit, 1 thread): {batch_rows / serial:,.0f} rows/s"
    )
    print(
        table(
            [
                "prediction from",
                "stage ms",
                "GPipe rows/s",
                "measured",
                "ratio",
                "steady rows/s",
                "streamed",
                "ratio",
            ],
            rows,
        )
    )
    print("target: measured within 10% of the GPipe prediction (ratio 0.90-1.10)")
    results["ratio_in_run"] = measured / results["gpipe_rows_per_s_in_run"]
    results["ratio_alone"] = measured / results["gpipe_rows_per_s_alone"]
    write_result("pipeline", results)
    return results


if __name__ == "__main__":
    main()
