"""Shared helpers for the benchmarks: a plain-text table, the results file, and Poisson
clients streaming through an engine."""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# Prompts the generation benchmarks cycle through (Python-shaped, like the LMs' corpus).
PROMPTS = [
    "def main(",
    "import os\n",
    "class Parser:\n    def ",
    "    return ",
    "for i in range(",
    "if __name__ == ",
    "# Copyright",
    "    def __init__(self",
]


def table(header: list[str], rows: list[list[str]]) -> str:
    """Format ``rows`` under ``header`` as an aligned text table."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` with machine facts to benchmarks/results/NAME.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path


def _cpu_times() -> tuple[int, int]:
    """(all, idle) jiffies of the machine's CPUs since boot (Linux)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]  # idle + iowait


def settle(busy: float = 0.25, window_s: float = 0.5, limit_s: float = 30.0) -> float:
    """Wait until the machine's CPUs were less than ``busy`` busy over ``window_s``
    (at most ``limit_s``); returns the last share measured.

    Setting a benchmark up can leave work running in other processes -- Ray starts
    worker processes for new actors and again after killed ones -- which would fall on
    whatever is timed first. A Ray Compiled Graph's actors poll and keep the CPUs busy
    while it exists: then this waits the whole ``limit_s``, time enough for those
    processes to be up. Where /proc/stat is missing it returns at once (0.0)."""
    try:
        _cpu_times()
    except OSError:
        return 0.0
    end = time.monotonic() + limit_s
    share = 1.0
    while time.monotonic() < end:
        total0, idle0 = _cpu_times()
        time.sleep(window_s)
        total1, idle1 = _cpu_times()
        share = 1.0 - (idle1 - idle0) / max(1, total1 - total0)
        if share < busy:
            break
    return share


def pct(xs: list[float], q: float) -> float:
    """The ``q``-quantile of ``xs`` by nearest rank (NaN when empty)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def poisson_clients(
    graph: Any,
    node: str,
    prompts: Sequence[str],
    *,
    clients: int,
    rounds: int,
    gap_s: float,
    params: Callable[[int, int], dict[str, Any]],
    count: Callable[[Any], int],
) -> dict[str, Any]:
    """``clients`` clients, each streaming ``rounds`` prompts through an engine of
    ``graph`` after exponential think times (Poisson arrivals): tokens/s, time to first
    token and inter-token gaps (only outputs that ``count`` gives tokens are timed), and
    the mean rows per step of generate node ``node``. ``params(client, round)`` are the
    request's parameters."""
    import anyio

    import dataflow as df

    rng = random.Random(0)
    ttft: list[float] = []
    gaps: list[float] = []
    produced = 0

    async def client(c: int) -> None:
        nonlocal produced
        for r in range(rounds):
            await anyio.sleep(rng.expovariate(1 / gap_s))  # Poisson arrivals per client
            sent = time.perf_counter()
            last = None
            async for chunk in engine.stream(prompts[(c + r) % len(prompts)], **params(c, r)):
                n = count(chunk)
                if n:
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - sent)
                    else:
                        gaps.append(now - last)
                    last = now
                    produced += n

    async with df.Engine(graph) as engine:
        await engine.run("warm up", max_new_tokens=4)  # weights loaded, first call done
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for c in range(clients):
                tg.start_soon(client, c)
        wall = time.perf_counter() - start
        sizes = engine.stats()["nodes"][node]["batch_sizes"]
    steps = sum(sizes.values())
    return {
        "tokens_per_s": produced / wall,
        "wall_s": wall,
        "tokens": produced,
        "ttft_p50_ms": pct(ttft, 0.5) * 1000,
        "ttft_p99_ms": pct(ttft, 0.99) * 1000,
        "itl_p50_ms": pct(gaps, 0.5) * 1000,
        "itl_p99_ms": pct(gaps, 0.99) * 1000,
        "mean_rows_per_step": sum(k * v for k, v in sizes.items()) / max(steps, 1),
    }
