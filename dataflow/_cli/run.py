"""``dataflow run GRAPH``: run a graph on inputs and print what it produces.

For token-streaming graphs, ``--prompt`` streams the text to the terminal and
``--concurrency N`` runs N streams at once under a live table (progress, tokens/s, time
to first token per stream).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["add_parser", "main"]


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", help="graph file (graphs/x.py) or module (graphs.x)")
    parser.add_argument("--input", "-i", action="append", default=[], help="an input (repeatable)")
    parser.add_argument(
        "--option", "-o", action="append", default=[], help="build option KEY=VALUE"
    )
    parser.add_argument(
        "--param", "-p", action="append", default=[], help="per-request parameter KEY=VALUE"
    )
    parser.add_argument("--timeout", type=float, default=None, help="per-request seconds")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--no-stats", action="store_true", help="do not print stats")
    gen = parser.add_argument_group("token streaming (generate graphs)")
    gen.add_argument("--prompt", help="the input to stream from (same as one --input)")
    gen.add_argument("--max-tokens", type=int, default=None, help="max_new_tokens per request")
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    gen.add_argument(
        "--seed", type=int, default=None, help="sampling seed (stream i uses seed + i)"
    )
    gen.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="run N streams of the prompt at once, with a live table",
    )


def _show(value: Any) -> str:
    try:
        import torch

        if isinstance(value, torch.Tensor):
            shown = value.tolist() if value.numel() <= 8 else f"tensor{list(value.shape)}"
            return str(shown)
    except ImportError:  # pragma: no cover
        pass
    return value if isinstance(value, str) else repr(value)


def main(args: argparse.Namespace) -> int:
    import anyio

    from .. import Engine
    from ._load import load_graph, load_module, parse_options

    options = parse_options(args.option)
    params = parse_options(args.param)
    for key, value in (
        ("max_new_tokens", args.max_tokens),
        ("temperature", args.temperature),
        ("seed", args.seed),
    ):
        if value is not None:
            params[key] = value
    if args.concurrency < 1:
        print("--concurrency must be >= 1", file=sys.stderr)
        return 2
    module = load_module(args.graph)
    graph = load_graph(args.graph, **options)
    inputs: list[Any] = (
        [args.prompt]
        if args.prompt is not None
        else list(args.input) or list(getattr(module, "EXAMPLE_INPUTS", []))
    )
    if not inputs:
        print("no inputs: pass --input or --prompt", file=sys.stderr)
        return 2
    streaming = graph.plan().streaming
    if args.concurrency > 1 and not streaming:
        print("--concurrency needs a streaming graph", file=sys.stderr)
        return 2

    async def go() -> None:
        async with Engine(graph) as engine:
            if args.concurrency > 1:
                await _concurrent(engine, inputs[0], args.concurrency, args.timeout, params)
            elif args.prompt is not None and streaming:
                await _one_stream(engine, inputs[0], args.timeout, params)
            elif streaming:
                for x in inputs:
                    async for out in engine.stream(x, timeout=args.timeout, **params):
                        print(_show(out), end="" if isinstance(out, str) else "\n", flush=True)
                    print()
            else:
                results = engine.map(inputs, timeout=args.timeout, **params)
                async for x, result in _zip(inputs, results):
                    print(f"{x!r} -> {_show(result)}")
            if not args.no_stats:
                stats = engine.stats()
                print(json.dumps({k: stats[k] for k in ("requests", "nodes")}, indent=1))

    anyio.run(go, backend=args.backend)
    return 0


def _tokens(out: Any) -> int:
    # Byte-level models emit text chunks of whole characters: count their bytes.
    return len(out.encode("utf-8", errors="surrogatepass")) if isinstance(out, str) else 1


@dataclass
class _Progress:
    """One stream's figures for the live table."""

    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    text: list[str] = field(default_factory=list)
    error: str | None = None

    def ttft_ms(self) -> float | None:
        return None if self.first is None else (self.first - self.start) * 1000

    def rate(self, now: float) -> float:
        if self.first is None or self.tokens < 2:
            return 0.0
        return (self.tokens - 1) / max((self.end or now) - self.first, 1e-9)


async def _run_stream(engine: Any, x: Any, timeout: Any, params: Any, p: _Progress) -> None:
    try:
        async for out in engine.stream(x, timeout=timeout, **params):
            if p.first is None:
                p.first = time.perf_counter()
            p.tokens += _tokens(out)
            p.text.append(_show(out))
    except Exception as exc:
        p.error = f"{type(exc).__name__}: {exc}"
    p.end = time.perf_counter()


async def _one_stream(engine: Any, x: Any, timeout: Any, params: dict[str, Any]) -> None:
    p = _Progress(time.perf_counter())
    if isinstance(x, str):
        print(x, end="", flush=True)  # the text continues the prompt
    async for out in engine.stream(x, timeout=timeout, **params):
        if p.first is None:
            p.first = time.perf_counter()
        p.tokens += _tokens(out)
        print(_show(out), end="" if isinstance(out, str) else "\n", flush=True)
    p.end = time.perf_counter()
    print()
    ttft = p.ttft_ms()
    print(
        f"[{p.tokens} tokens, {p.rate(p.end):.0f} tokens/s, first token after "
        f"{'-' if ttft is None else f'{ttft:.0f} ms'}]",
        file=sys.stderr,
    )


async def _concurrent(engine: Any, x: Any, n: int, timeout: Any, params: dict[str, Any]) -> None:
    import anyio
    from rich.console import Console
    from rich.live import Live

    limit = params.get("max_new_tokens")
    seed = params.get("seed")
    started = time.perf_counter()
    streams = [_Progress(started) for _ in range(n)]
    console = Console()
    with Live(
        get_renderable=lambda: _table(streams, limit),
        console=console,
        refresh_per_second=8,
    ):
        async with anyio.create_task_group() as tg:
            for i, p in enumerate(streams):
                own = dict(params) if seed is None else {**params, "seed": seed + i}
                tg.start_soon(_run_stream, engine, x, timeout, own, p)
    wall = time.perf_counter() - started
    total = sum(p.tokens for p in streams)
    ttfts = sorted(t for p in streams if (t := p.ttft_ms()) is not None)
    median = ttfts[len(ttfts) // 2] if ttfts else float("nan")
    console.print(
        f"{n} streams, {total} tokens in {wall:.2f} s: {total / max(wall, 1e-9):.0f} tokens/s "
        f"aggregate, time to first token p50 {median:.0f} ms"
    )
    for i, p in enumerate(streams):
        if p.error is not None:
            console.print(f"stream {i}: {p.error}", style="red")


def _table(streams: list[_Progress], limit: int | None) -> Any:
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    now = time.perf_counter()
    table = Table(title="streams", expand=False)
    for column in ("#", "progress", "tokens", "tokens/s", "first token", "text"):
        table.add_column(column, justify="right" if column != "text" else "left")
    for i, p in enumerate(streams):
        done = p.end is not None
        total = limit if limit is not None else max(p.tokens, 1)
        bar = ProgressBar(total=total, completed=total if done else p.tokens, width=20)
        ttft = p.ttft_ms()
        tail = "".join(p.text)[-40:].replace("\n", "⏎")
        table.add_row(
            str(i),
            bar,
            str(p.tokens),
            f"{p.rate(now):.0f}",
            "-" if ttft is None else f"{ttft:.0f} ms",
            p.error if p.error is not None else tail,
        )
    return table


async def _zip(inputs: list[Any], results: Any) -> Any:
    index = 0
    async for result in results:
        yield inputs[index], result
        index += 1
