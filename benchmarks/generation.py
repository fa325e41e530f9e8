"""Continuous batching vs a hand-written static batch-32 decode loop, same model, same run.

The model is the shipped tiny LM (graphs/weights/tiny_lm.safetensors). Three ways to
produce tokens:

* ``static``: a hand-written loop: prefill 32 prompts into one cache, then step all 32
  together, sampling with one batched ``torch.multinomial``; no engine, no streaming.
* ``engine``: ``graphs/tiny_lm.py`` through the engine: 32 client tasks, each streaming
  ``--rounds`` requests one after another, with exponential (Poisson) think time between
  them, every token delivered to its client's ``async for`` as it is produced.
* ``single``: the same model unbatched, one request at a time (the per-request baseline).

Prints aggregate tokens/s and the ratios, time to first token (ms and in static decode
steps) and inter-token latency p50/p99; writes benchmarks/results/generation.json.

    python benchmarks/generation.py [--tokens 128] [--rounds 3] [--threads 1] [--details]

``--details`` streams ``df.Chunk`` outputs (``details=True``: token ids, counts, finish
reasons) instead of plain text, to measure what the per-token bookkeeping costs.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import anyio
import torch
from _common import PROMPTS, poisson_clients, table, write_result

from graphs import tiny_lm
from graphs._tiny_lm_model import load_tiny_lm

BATCH = 32


def static_loop(tokens: int, temperature: float) -> dict[str, float]:
    """The hand-written baseline: one static batch of 32, prefill then decode."""
    model = load_tiny_lm(tiny_lm.WEIGHTS / "tiny_lm.safetensors")
    cache = model.new_cache(BATCH)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    rows = [cache.prefill(s, list(PROMPTS[s % len(PROMPTS)].encode())) for s in range(BATCH)]
    logits = torch.stack(rows)
    slots = list(range(BATCH))
    first = time.perf_counter()
    for _ in range(tokens):
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()
        logits = cache.step(slots, nxt)
    wall = time.perf_counter() - start
    step = (time.perf_counter() - first) / tokens
    return {"tokens_per_s": BATCH * tokens / wall, "step_ms": step * 1000, "wall_s": wall}


def single(tokens: int, temperature: float, requests: int) -> dict[str, float]:
    """Unbatched: each request alone through the same model (no engine)."""
    model = load_tiny_lm(tiny_lm.WEIGHTS / "tiny_lm.safetensors")
    cache = model.new_cache(1)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for r in range(requests):
        logits = cache.prefill(0, list(PROMPTS[r % len(PROMPTS)].encode()))[None]
        for _ in range(tokens):
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1).tolist()
            logits = cache.step([0], nxt)
        cache.free(0)
    wall = time.perf_counter() - start
    return {"tokens_per_s": requests * tokens / wall, "wall_s": wall}


async def engine_run(
    tokens: int, temperature: float, rounds: int, gap_s: float, threads: int, details: bool
) -> dict[str, Any]:
    graph = tiny_lm.build(max_batch=BATCH, threads=threads)

    def params(c: int, r: int) -> dict[str, Any]:
        return {
            "max_new_tokens": tokens,
            "temperature": temperature,
            "seed": c * 100 + r,
            "details": details,
        }

    def count(chunk: Any) -> int:
        return len(chunk.token_ids) if details else len(chunk.encode())

    return await poisson_clients(
        graph,
        "tiny_lm",
        PROMPTS,
        clients=BATCH,
        rounds=rounds,
        gap_s=gap_s,
        params=params,
        count=count,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="requests per client")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="mean think time")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for every variant (1: the 2 cores are shared with the loop)",
    )
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument(
        "--details", action="store_true", help="stream df.Chunk outputs (details=True)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    static = static_loop(args.tokens, args.temperature)
    ours = anyio.run(
        engine_run,
        args.tokens,
        args.temperature,
        args.rounds,
        args.gap_ms / 1000,
        args.threads,
        args.details,
        backend=args.backend,
    )
    alone = single(args.tokens, args.temperature, 4)
    step_ms = static["step_ms"]
    results: dict[str, Any] = {
        "config": vars(args),
        "static_batch32": static,
        "engine_continuous": ours,
        "single_unbatched": alone,
        "engine_vs_static": ours["tokens_per_s"] / static["tokens_per_s"],
        "single_vs_static": alone["tokens_per_s"] / static["tokens_per_s"],
        "ttft_p50_in_static_steps": ours["ttft_p50_ms"] / step_ms,
    }
    print(
        table(
            ["variant", "tokens/s", "vs static", "TTFT p50", "ITL p50/p99"],
            [
                ["static batch-32 loop", f"{static['tokens_per_s']:.0f}", "1.00", "-", "-"],
                [
                    f"engine, {BATCH} Poisson clients",
                    f"{ours['tokens_per_s']:.0f}",
                    f"{results['engine_vs_static']:.2f}",
                    f"{ours['ttft_p50_ms']:.1f} ms ({results['ttft_p50_in_static_steps']:.1f} "
                    "steps)",
                    f"{ours['itl_p50_ms']:.1f}/{ours['itl_p99_ms']:.1f} ms",
                ],
                [
                    "unbatched, one at a time",
                    f"{alone['tokens_per_s']:.0f}",
                    f"{results['single_vs_static']:.2f}",
                    "-",
                    "-",
                ],
            ],
        )
    )
    print(
        f"static step {step_ms:.2f} ms; engine mean rows/step "
        f"{ours['mean_rows_per_step']:.1f}; targets: engine ≥ 0.90x static, TTFT p50 ≤ 3 steps"
    )
    write_result("generation", results)
    return results


if __name__ == "__main__":
    main()
