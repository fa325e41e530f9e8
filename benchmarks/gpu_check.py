"""GPU check: correctness of CUDA placements against a CPU float64 reference, and a
copy-heavy pipeline on per-replica CUDA streams vs the default stream.

Correctness: fresh random weights and inputs (the seed is printed) through a CUDA infer
node, a micro-batched ``split_stages`` pipeline (stages handing tensors over on the
device), a tensor-sharded MLP and a data-parallel node, each compared with the same model
run in float64 on the CPU.

Overlap: every item is a large pinned host tensor copied to the GPU, multiplied, and
copied back. With one stream per replica, one replica's copies overlap another's compute;
on the default stream everything serialises. Target: streams >= 1.5x the default stream.

Without a GPU it says so and exits 0.

    python benchmarks/gpu_check.py [--size N] [--items K] [--replicas R]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import torch
from _common import table, write_result
from torch import nn

import dataflow as df
from dataflow.nodes import data_parallel, shard_mlp, split_stages

TOLERANCE = 1e-4  # float32 (TF32 off) against float64, relative to the output's scale


def _mlp(dim: int, depth: int) -> nn.Sequential:
    return nn.Sequential(*(nn.Sequential(nn.Linear(dim, dim), nn.GELU()) for _ in range(depth)))


def _reference(model: nn.Module) -> nn.Module:
    # A float64 copy taken before the engine moves the model's weights to the GPU.
    return copy.deepcopy(model).double().cpu().eval()


async def _outputs(graph: df.Graph, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    async with df.Engine(graph) as engine:
        return [out async for out in engine.map(inputs)]


def check_correctness(seed: int) -> list[dict[str, Any]]:
    """Each CUDA graph against the CPU float64 reference on fresh inputs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(seed)
    gpus = torch.cuda.device_count()
    dim = 256
    inputs = [torch.randn(64, dim) for _ in range(16)]
    cases: list[tuple[str, nn.Module, Callable[[nn.Module], df.Graph]]] = [
        (
            "infer on cuda",
            _mlp(dim, 4),
            lambda m: df.Graph("one", df.infer(m, name="mlp", placement="cuda")),
        ),
        (
            f"split_stages x4 on {min(gpus, 4)} GPU(s), 8 micro-batches",
            _mlp(dim, 8),
            lambda m: df.Graph(
                "stages",
                split_stages(
                    m,
                    stages=4,
                    placements=[f"cuda:{i * gpus // 4}" for i in range(4)],
                    micro_batches=8,
                ),
            ),
        ),
        (
            "shard_mlp x4 (column/row)",
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
            lambda m: shard_mlp(
                m,  # type: ignore[arg-type]
                4,
                placements=[f"cuda:{i % gpus}" for i in range(4)],
            ).graph(),
        ),
        (
            "data_parallel x2 replicas",
            _mlp(dim, 4),
            lambda m: df.Graph("dp", data_parallel(m, 2, parts=4, placement="cuda")),
        ),
    ]
    results = []
    for label, model, build in cases:
        reference = _reference(model)
        outs = anyio.run(_outputs, build(model), inputs)
        worst = 0.0
        with torch.inference_mode():
            for x, out in zip(inputs, outs, strict=True):
                expected = reference(x.double())
                scale = float(expected.abs().max()) or 1.0
                worst = max(worst, float((out.double() - expected).abs().max()) / scale)
        results.append({"case": label, "max_rel_error": worst, "ok": worst <= TOLERANCE})
    return results


async def _throughput(size: int, items: int, replicas: int, matmuls: int, stream: str) -> float:
    layer = nn.Sequential(*(nn.Linear(size, size, bias=False) for _ in range(matmuls)))
    node = df.infer(
        layer,
        name="copy_heavy",
        placement="cuda",
        replicas=replicas,
        ordered=False,
        options={"cuda_stream": stream},
    )
    # Inputs already in pinned memory, as a loader with pin_memory=True gives them.
    inputs = [torch.randn(size, size).pin_memory() for _ in range(replicas * 2)]
    async with df.Engine(df.Graph("copy_heavy", node)) as engine:
        async for _ in engine.map(inputs, ordered=False):  # warm-up
            pass
        start = time.perf_counter()
        async for _ in engine.map((inputs[i % len(inputs)] for i in range(items)), ordered=False):
            pass
        return items / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="each item is size x size")
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--matmuls", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing run")
        return 0
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"device: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, seed {seed}")

    checks = check_correctness(seed)
    print(
        table(
            ["graph", "max rel error vs float64 CPU", "ok"],
            [[c["case"], f"{c['max_rel_error']:.2e}", "yes" if c["ok"] else "NO"] for c in checks],
        )
    )

    own = anyio.run(_throughput, args.size, args.items, args.replicas, args.matmuls, "own")
    default = anyio.run(_throughput, args.size, args.items, args.replicas, args.matmuls, "default")
    mb = args.size * args.size * 4 / 2**20
    print(
        f"\ncopy-heavy pipeline: {args.items} items of {mb:.0f} MiB in and out, "
        f"{args.matmuls} matmul(s) each, {args.replicas} replicas"
    )
    print(
        table(
            ["streams", "items/s", "vs default"],
            [
                ["default stream", f"{default:.1f}", "1.00x"],
                ["stream per replica", f"{own:.1f}", f"{own / default:.2f}x"],
            ],
        )
    )
    print("target: stream per replica >= 1.5x the default stream")
    write_result(
        "gpu_check",
        {
            "device": torch.cuda.get_device_name(0),
            "seed": seed,
            "correctness": checks,
            "size": args.size,
            "items": args.items,
            "replicas": args.replicas,
            "own_streams_items_per_s": own,
            "default_stream_items_per_s": default,
            "speedup": own / default,
        },
    )
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
