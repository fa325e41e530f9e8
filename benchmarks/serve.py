"""Streaming over HTTP vs in-process: tokens/s and time to first token, 64 clients.

The same graph and load run twice in one go: 64 concurrent ``engine.stream`` consumers in
this process, then 64 concurrent HTTP clients (httpx, SSE, ``/v1/completions``) against
``dataflow serve`` in a child process. The graph is a synthetic decoder (``build`` below):
each token costs one ``step_ms`` decode step on the event loop, so the numbers measure
the serving path, not a model. The HTTP overhead ratio is in-process tokens/s over HTTP
tokens/s (1.0 = free).

    python benchmarks/serve.py [--clients 64] [--tokens 64] [--step-ms 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import anyio

import dataflow as df

HERE = Path(__file__).resolve()


def build(step_ms: float = 2.0, replicas: int = 64) -> df.Graph:
    """A synthetic decoder: one token per ``step_ms``, ``max_new_tokens`` tokens."""

    @df.infer(placement="loop", replicas=replicas, ordered=False)
    async def decode(prompt: str, max_new_tokens: int = 64) -> AsyncIterator[str]:
        for i in range(max_new_tokens):
            await anyio.sleep(step_ms / 1000)
            yield f"t{i} "

    return df.Graph("synthetic", decode)


def summarise(label: str, wall: float, ttfts: list[float], tokens: int) -> dict[str, Any]:
    ttfts.sort()
    return {
        "mode": label,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2],
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
    }


async def run_clients(clients: int, one: Callable[[int], Coroutine[Any, Any, None]]) -> float:
    """Runs ``one(0) .. one(clients - 1)`` concurrently; returns the wall time in seconds."""
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(clients):
            tg.start_soon(one, i)
    return time.perf_counter() - start


async def in_process(clients: int, tokens: int, step_ms: float) -> dict[str, Any]:
    ttfts: list[float] = []
    counts: list[int] = []

    async def one(engine: df.Engine, i: int) -> None:
        start, n = time.perf_counter(), 0
        async for _ in engine.stream(f"prompt {i}", max_new_tokens=tokens):
            if n == 0:
                ttfts.append(time.perf_counter() - start)
            n += 1
        counts.append(n)

    async with df.Engine(build(step_ms, clients)) as engine:
        wall = await run_clients(clients, partial(one, engine))
    assert counts == [tokens] * clients, counts
    return summarise("in-process", wall, ttfts, sum(counts))


async def over_http(url: str, clients: int, tokens: int) -> dict[str, Any]:
    import httpx

    ttfts: list[float] = []
    counts: list[int] = []

    async def one(http: httpx.AsyncClient, i: int) -> None:
        body = {"model": "synthetic", "prompt": f"prompt {i}", "max_tokens": tokens, "stream": True}
        start, n = time.perf_counter(), 0
        async with http.stream("POST", url + "/v1/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if line.startswith("data: {") and '"text":""' not in line:
                    if n == 0:
                        ttfts.append(time.perf_counter() - start)
                    n += 1
        counts.append(n)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        # warm-up: one request opens the path (imports, first connection)
        await http.post(url + "/v1/completions", json={"model": "synthetic", "prompt": "w"})
        wall = await run_clients(clients, partial(one, http))
    assert counts == [tokens] * clients, counts
    return summarise("http", wall, ttfts, sum(counts))


def main() -> None:
    sys.path.insert(0, str(HERE.parent))
    from _common import table, write_result

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=2.0)
    args = parser.parse_args()

    local = anyio.run(in_process, args.clients, args.tokens, args.step_ms)
    cmd = [sys.executable, "-m", "dataflow.cli", "serve", str(HERE), "--port", "0"]
    cmd += ["--log-level", "warning", "-o", f"step_ms={args.step_ms}"]
    cmd += ["-o", f"replicas={args.clients}"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[-1]
        remote = anyio.run(over_http, url, args.clients, args.tokens)
    finally:
        server.terminate()
        server.wait(timeout=30)
    ratio = local["tokens_per_s"] / remote["tokens_per_s"]
    rows = [
        [
            r["mode"],
            f"{r['tokens_per_s']:.0f}",
            f"{r['ttft_p50_ms']:.1f}",
            f"{r['ttft_p99_ms']:.1f}",
            f"{r['wall_s']:.2f}",
        ]
        for r in (local, remote)
    ]
    print(
        f"{args.clients} streaming clients x {args.tokens} tokens, "
        f"{args.step_ms} ms decode step (synthetic)"
    )
    print(table(["mode", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "wall s"], rows))
    print(f"HTTP overhead ratio (in-process / HTTP tokens/s): {ratio:.2f}x")
    write_result(
        "serve",
        {"config": vars(args), "in_process": local, "http": remote, "overhead_ratio": ratio},
    )
    print(json.dumps({"overhead_ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
