"""``dataflow bench GRAPH``: load-test a graph; report throughput, latency and what limits it.

``--concurrency C`` clients each send requests back to back (``run``, or ``stream`` for a
streaming graph, where the time to the first output is measured too) until ``--requests
N`` have been sent. Busy fractions and the bottleneck cover the measured window only
(not start-up or warm-up): they come from the difference of two ``engine.stats()``.

A node is named the bottleneck only when it limited the run: its input was full, or it
was busy at least half the window. When every node is mostly idle the report names no
bottleneck and says what limited the run instead (``limited_by``): the clients (too few
requests in flight to keep the graph busy) or the input (fewer requests than clients).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

__all__ = ["BUSY_ENOUGH", "add_parser", "limited_by", "main", "run_bench"]

BUSY_ENOUGH = 0.5  # a node below this busy share, with no full input, limited nothing


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "graph", help="graph file (graphs/x.py), module (graphs.x), or FILE.py:attribute"
    )
    parser.add_argument("--requests", "-n", type=int, default=100, help="requests to send")
    parser.add_argument("--concurrency", "-c", type=int, default=8, help="clients at once")
    parser.add_argument(
        "--input", "-i", action="append", default=[], help="an input (repeatable; cycled)"
    )
    parser.add_argument(
        "--option", "-o", action="append", default=[], help="build option KEY=VALUE"
    )
    parser.add_argument(
        "--param", "-p", action="append", default=[], help="per-request parameter KEY=VALUE"
    )
    parser.add_argument("--timeout", type=float, default=None, help="per-request seconds")
    parser.add_argument("--warmup", type=int, default=0, help="requests before measuring")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--trace", metavar="FILE", help="write a Perfetto trace of the run")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")


def _pcts(samples: list[float]) -> dict[str, float]:
    from ..runtime._stats import percentile

    return {f"p{q}": percentile(samples, q / 100) for q in (50, 90, 99)}


async def run_bench(
    graph: Any,
    inputs: list[Any],
    *,
    requests: int,
    concurrency: int,
    params: dict[str, Any] | None = None,
    timeout: float | None = None,
    warmup: int = 0,
    trace: str | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Run the load and return the report (what ``--json`` prints).

    ``progress`` is called with no arguments after each request (the progress bar).
    """
    import anyio

    from .. import Engine
    from ..runtime._stats import bottleneck, node_busy

    params = params or {}
    streaming = graph.plan().streaming
    latencies: list[float] = []
    ttfts: list[float] = []
    counts = {"ok": 0, "failed": 0, "outputs": 0}
    errors: dict[str, int] = {}
    perf = time.perf_counter

    async def one(x: Any, record: bool) -> None:
        start = perf()
        first: float | None = None
        produced = 0
        try:
            if streaming:
                async for _ in engine.stream(x, timeout=timeout, **params):
                    if first is None:
                        first = perf() - start
                    produced += 1
            else:
                await engine.run(x, timeout=timeout, **params)
                produced = 1
        except Exception as exc:
            if record:
                counts["failed"] += 1
                key = _error_key(exc)
                errors[key] = errors.get(key, 0) + 1
            return
        if record:
            latencies.append(perf() - start)
            if first is not None:
                ttfts.append(first)
            counts["ok"] += 1
            counts["outputs"] += produced

    async with Engine(graph, trace=trace) as engine:
        for i in range(warmup):
            await one(inputs[i % len(inputs)], record=False)
        before = engine.stats()
        tickets = iter(range(requests))

        async def client() -> None:
            for i in tickets:  # shared: each request is sent by exactly one client
                await one(inputs[i % len(inputs)], record=True)
                if progress is not None:
                    progress()

        started = perf()
        async with anyio.create_task_group() as tg:
            for _ in range(max(1, concurrency)):
                tg.start_soon(client)
        elapsed = perf() - started
        after = engine.stats()

    busy = node_busy(after, before)
    nodes = {
        name: {
            "placement": n["placement"],
            "replicas": n["replicas"],
            "busy": busy[name],
            "service_p50_s": n["service_p50_s"],
            "items_in": n["items_in"] - before["nodes"][name]["items_in"],
            "batch_sizes": _diff_counts(n["batch_sizes"], before["nodes"][name]["batch_sizes"]),
        }
        for name, n in after["nodes"].items()
    }
    report: dict[str, Any] = {
        "graph": graph.name,
        "streaming": streaming,
        "requests": requests,
        "concurrency": concurrency,
        "succeeded": counts["ok"],
        "failed": counts["failed"],
        "errors": errors,
        "elapsed_s": elapsed,
        "throughput_rps": counts["ok"] / elapsed if elapsed > 0 else 0.0,
        "outputs_per_s": counts["outputs"] / elapsed if elapsed > 0 else 0.0,
        "latency_s": _pcts(latencies),
        "ttft_s": _pcts(ttfts) if streaming else None,
        "nodes": nodes,
    }
    neck = bottleneck(after, before)
    report["bottleneck"], report["limited_by"] = limited_by(
        neck, requests=requests, concurrency=concurrency
    )
    if trace:
        report["trace"] = trace
    return report


def limited_by(
    neck: dict[str, Any] | None, *, requests: int, concurrency: int
) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """``(bottleneck or None, {"what", "reason"})``: what limited the measured run.

    ``neck`` is the runtime's busiest-node verdict; it is kept only if that node really
    limited the run (input full, or busy at least :data:`BUSY_ENOUGH` of the window).
    """
    if neck is not None and (neck["saturated"] or neck["busy"] >= BUSY_ENOUGH):
        return neck, {"what": "node", "reason": neck["reason"]}
    idle = (
        "every node is mostly idle"
        if neck is None
        else f"every node is mostly idle (busiest {neck['node']!r} at {neck['busy']:.0%})"
    )
    if requests < concurrency:
        return None, {
            "what": "input",
            "reason": f"{idle}: the input ran out: {requests} requests for {concurrency} "
            "clients (send more with --requests)",
        }
    return None, {
        "what": "clients",
        "reason": f"{idle}: the client concurrency limited the run ({concurrency} "
        f"client{'s' if concurrency != 1 else ''}, one request in flight each; raise "
        "--concurrency to load the graph)",
    }


def _diff_counts(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    """Histogram counts added since ``before`` (warm-up batches left out)."""
    diff = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in diff.items() if v}


def _error_key(exc: Exception) -> str:
    """Failures grouped by kind and place, not by request (NodeError names the request)."""
    from .._errors import NodeError

    cause = exc.__cause__
    if isinstance(exc, NodeError) and cause is not None:
        return f"NodeError in {exc.node!r}: {type(cause).__name__}: {cause}"[:200]
    return f"{type(exc).__name__}: {exc}"[:200]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def print_report(report: dict[str, Any]) -> None:
    """The report as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"dataflow bench: {report['graph']}", show_header=False)
    summary.add_column("figure", style="bold")
    summary.add_column("value", justify="right")
    summary.add_row("requests", f"{report['succeeded']} ok, {report['failed']} failed")
    summary.add_row("concurrency", str(report["concurrency"]))
    summary.add_row("elapsed", f"{report['elapsed_s']:.3f} s")
    summary.add_row("throughput", f"{report['throughput_rps']:.1f} req/s")
    if report["streaming"]:
        summary.add_row("outputs", f"{report['outputs_per_s']:.1f} outputs/s")
    lat = report["latency_s"]
    summary.add_row(
        "latency p50/p90/p99", f"{_ms(lat['p50'])} / {_ms(lat['p90'])} / {_ms(lat['p99'])} ms"
    )
    if report["ttft_s"] is not None:
        t = report["ttft_s"]
        summary.add_row(
            "first output p50/p90/p99", f"{_ms(t['p50'])} / {_ms(t['p90'])} / {_ms(t['p99'])} ms"
        )
    console.print(summary)

    per_node = Table(title="nodes (measured window)")
    for col in ("node", "placement", "busy", "service p50", "items", "batch sizes"):
        per_node.add_column(col, justify="left" if col in ("node", "placement") else "right")
    neck = report["bottleneck"] or {}
    for name, n in report["nodes"].items():
        sizes = ", ".join(f"{k}:{v}" for k, v in n["batch_sizes"].items()) or "-"
        style = "bold red" if name == neck.get("node") else None
        per_node.add_row(
            name,
            f"{n['placement']} x{n['replicas']}",
            f"{n['busy']:.0%}",
            f"{_ms(n['service_p50_s'])} ms",
            str(n["items_in"]),
            sizes,
            style=style,
        )
    console.print(per_node)
    if neck:
        console.print(f"bottleneck: [bold]{neck['node']}[/bold] — {neck['reason']}")
    else:
        console.print(f"no bottleneck: {report['limited_by']['reason']}")
    for error, count in report["errors"].items():
        console.print(f"[red]{count} x {error}[/red]")
    if report.get("trace"):
        console.print(f"trace: {report['trace']} (open in https://ui.perfetto.dev)")


def main(args: argparse.Namespace) -> int:
    import functools

    import anyio
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from ._load import UsageError, load, parse_options

    if args.requests < 1 or args.concurrency < 1:
        raise UsageError("--requests and --concurrency must be >= 1")
    params = parse_options(args.param, "--param")
    loaded = load(args.graph, **parse_options(args.option))
    graph = loaded.graph
    inputs: list[Any] = list(args.input) or loaded.example_inputs
    if not inputs:
        raise UsageError("no inputs: pass --input")
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with bar:
        task = bar.add_task(f"bench {graph.name}", total=args.requests)
        report = anyio.run(
            functools.partial(
                run_bench,
                graph,
                inputs,
                requests=args.requests,
                concurrency=args.concurrency,
                params=params,
                timeout=args.timeout,
                warmup=args.warmup,
                trace=args.trace,
                progress=lambda: bar.advance(task),
            ),
            backend=args.backend,
        )
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 0 if report["failed"] == 0 else 1
