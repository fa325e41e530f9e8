"""Dynamic batching vs the best offline batch size vs no batching, same model, same run.

The model is a 4-layer d=256 ``nn.TransformerEncoder`` over sequences of 32 tokens.

* ``offline``: the model called directly on ready-made batches of 1..64; the best
  items/s is the target (what a perfect batcher could reach).
* ``dynamic``: an engine ``infer`` node with ``batch=df.Batch(max_size=32)`` (thread
  placement) and 64 concurrent clients, each sending its next request when the last
  returns.
* ``unbatched``: the same node without ``batch=``, same 64 clients.

Prints items/s and ratios; writes benchmarks/results/batching.json.

    python benchmarks/batching.py [--items 2048] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import anyio
import torch
from _common import table, write_result
from torch import nn

import dataflow as df

SEQ, DIM, LAYERS, CLIENTS = 32, 256, 4, 64


def make_model() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(DIM, 4, 4 * DIM, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False).eval()


def offline(model: nn.Module, sizes: list[int], items: int) -> dict[int, float]:
    """items/s of direct calls per batch size."""
    out: dict[int, float] = {}
    x = torch.randn(max(sizes), SEQ, DIM)
    with torch.inference_mode():
        for size in sizes:
            model(x[:size])  # warm
            calls = max(2, items // size // 2)
            start = time.perf_counter()
            for _ in range(calls):
                model(x[:size])
            out[size] = calls * size / (time.perf_counter() - start)
    return out


async def through_engine(model: nn.Module, items: int, batch: df.Batch | None) -> float:
    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)  # type: ignore[no-any-return]

    node = df.infer(encode, name="encoder", placement="thread", threads=1, batch=batch)
    sample = torch.randn(SEQ, DIM) if batch is not None else torch.randn(1, SEQ, DIM)
    per_client = items // CLIENTS
    async with df.Engine(df.Graph("encoder", node)) as engine:
        await engine.run(sample)

        async def client() -> None:
            for _ in range(per_client):
                await engine.run(sample)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(CLIENTS):
                tg.start_soon(client)
        wall = time.perf_counter() - start
    return per_client * CLIENTS / wall


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="torch threads everywhere")
    parser.add_argument("--max-wait", type=float, default=0.002)
    parser.add_argument(
        "--max-size", type=int, default=32, help="half the clients: two batches in flight"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = make_model()
    sizes = [1, 8, 16, 32, 64]
    off = offline(model, sizes, args.items)
    best_size = max(off, key=lambda s: off[s])
    best = off[best_size]
    dyn = anyio.run(
        through_engine, model, args.items, df.Batch(max_size=args.max_size, max_wait=args.max_wait)
    )
    plain = anyio.run(through_engine, model, args.items // 4, None)
    results: dict[str, Any] = {
        "config": vars(args),
        "offline_items_per_s": off,
        "best_offline_batch": best_size,
        "dynamic_items_per_s": dyn,
        "unbatched_items_per_s": plain,
        "dynamic_vs_best": dyn / best,
        "unbatched_vs_best": plain / best,
    }
    rows = [[f"offline batch {s}", f"{v:.0f}", f"{v / best:.2f}"] for s, v in off.items()]
    rows.append([f"engine dynamic, {CLIENTS} clients", f"{dyn:.0f}", f"{dyn / best:.2f}"])
    rows.append([f"engine unbatched, {CLIENTS} clients", f"{plain:.0f}", f"{plain / best:.2f}"])
    print(table(["variant", "items/s", "vs best offline"], rows))
    print("targets: dynamic ≥ 0.95x best offline; unbatched 0.3-0.6x")
    write_result("batching", results)
    return results


if __name__ == "__main__":
    main()
