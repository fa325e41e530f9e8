"""``dataflow run GRAPH``: run a graph on inputs and print what it produces.

stdout carries only the graph's outputs, so ``dataflow run graphs/tiny_lm.py --prompt
"def " --seed 1 > out.py`` captures just the generated text (on a terminal the prompt is
echoed first, so the text reads on). A one-line summary goes to stderr (``--quiet`` drops
it); ``--stats`` adds the full ``engine.stats()`` JSON on stderr.

For token-streaming graphs, ``--prompt`` streams the text and ``--concurrency N`` runs N
streams at once under a live table on stderr (progress, tokens/s, time to first token),
then prints each stream's text on stdout. Token counts are the generate node's tokens.
The exit status is 1 when any request or stream failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ._load import UsageError

__all__ = ["add_parser", "main"]


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "graph", help="graph file (graphs/x.py), module (graphs.x), or FILE.py:attribute"
    )
    parser.add_argument("--input", "-i", action="append", default=[], help="an input (repeatable)")
    parser.add_argument(
        "--option", "-o", action="append", default=[], help="build option KEY=VALUE"
    )
    parser.add_argument(
        "--param", "-p", action="append", default=[], help="per-request parameter KEY=VALUE"
    )
    parser.add_argument("--timeout", type=float, default=None, help="per-request seconds")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument(
        "--quiet", "-q", "--no-stats", action="store_true", help="no summary line on stderr"
    )
    parser.add_argument(
        "--stats", action="store_true", help="print the full stats JSON on stderr at the end"
    )
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


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _details_supported(graph: Any) -> bool:
    """Whether the graph's exit is a generate node that can report its tokens
    (``details=True`` outputs ``df.Chunk`` with ``completion_tokens``)."""
    try:
        import dataflow as df
        from dataflow.graph import generation_config  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return False
    if not hasattr(df, "Chunk"):
        return False
    try:
        return generation_config(graph) is not None  # type: ignore[no-any-return,unused-ignore]
    except Exception:
        return False


@dataclass
class _Progress:
    """One stream's figures: its text, its tokens and its timings."""

    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0
    text: list[str] = field(default_factory=list)
    error: str | None = None

    def add(self, out: Any) -> str:
        """Count ``out`` and return its text."""
        if self.first is None:
            self.first = time.perf_counter()
        completion = getattr(out, "completion_tokens", None)
        if isinstance(completion, int) and hasattr(out, "finish_reason"):  # a df.Chunk
            self.tokens = max(self.tokens, completion)
            shown: str = out.text
        else:  # one output of the generate node: one token
            self.tokens += 1
            shown = _show(out)
        self.text.append(shown)
        return shown

    def ttft_ms(self) -> float | None:
        return None if self.first is None else (self.first - self.start) * 1000

    def rate(self, now: float) -> float:
        if self.first is None or self.tokens < 2:
            return 0.0
        return (self.tokens - 1) / max((self.end or now) - self.first, 1e-9)

    def summary(self) -> str:
        ttft = self.ttft_ms()
        return (
            f"[{self.tokens} tokens, {self.rate(self.end or time.perf_counter()):.0f} tokens/s, "
            f"first token after {'-' if ttft is None else f'{ttft:.0f} ms'}]"
        )


def _kw(method: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Per-request parameters as ``params=`` where the engine takes it (a node may have a
    parameter named like an engine argument), else as keywords."""
    import inspect

    declared = inspect.signature(method).parameters.get("params")
    if declared is not None and declared.kind is inspect.Parameter.KEYWORD_ONLY:
        return {"params": params}
    return params


def _describe(exc: BaseException) -> str:
    from ._load import describe

    return describe(exc)


def main(args: argparse.Namespace) -> int:
    import anyio

    from ._load import load, parse_options

    options = parse_options(args.option)
    params = parse_options(args.param, "--param")
    for key, value in (
        ("max_new_tokens", args.max_tokens),
        ("temperature", args.temperature),
        ("seed", args.seed),
    ):
        if value is not None:
            params[key] = value
    if args.concurrency < 1:
        raise UsageError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    loaded = load(args.graph, **options)
    graph = loaded.graph
    inputs: list[Any] = (
        [args.prompt] if args.prompt is not None else list(args.input) or loaded.example_inputs
    )
    if not inputs:
        raise UsageError("no inputs: pass --input or --prompt")
    streaming = graph.plan().streaming
    if args.concurrency > 1 and not streaming:
        raise UsageError("--concurrency needs a streaming graph")
    if streaming and "details" not in params and _details_supported(graph):
        params["details"] = True

    async def go() -> int:
        from .. import Engine

        async with Engine(graph) as engine:
            started = time.perf_counter()
            if args.concurrency > 1:
                failed = await _concurrent(engine, inputs[0], args, params)
            elif streaming:
                failed = await _streams(engine, inputs, args, params)
            else:
                failed = await _results(engine, inputs, args, params)
            wall = time.perf_counter() - started
            stats = engine.stats()
        # A single stream and --concurrency print their own summary (tokens, not requests).
        if not args.quiet and (not streaming or (args.concurrency == 1 and len(inputs) > 1)):
            req = stats["requests"]
            _err(
                f"[{req['submitted']} request{'s' if req['submitted'] != 1 else ''}: "
                f"{req['succeeded']} ok, {req['failed']} failed, "
                f"{req['cancelled']} cancelled, in {wall:.2f} s]"
            )
        if args.stats:
            _err(json.dumps(stats, indent=1, default=str))
        return 1 if failed else 0

    status: int = anyio.run(go, backend=args.backend)
    return status


async def _results(engine: Any, inputs: list[Any], args: Any, params: dict[str, Any]) -> int:
    """One result per input, in input order, one line each; failures on stderr."""
    failed = 0
    results = engine.map(
        inputs, timeout=args.timeout, return_exceptions=True, **_kw(engine.map, params)
    )
    index = 0
    async for result in results:
        if isinstance(result, BaseException):
            failed += 1
            _err(f"dataflow run: input {index} ({inputs[index]!r}): {_describe(result)}")
        else:
            print(_show(result), flush=True)
        index += 1
    return failed


async def _streams(engine: Any, inputs: list[Any], args: Any, params: dict[str, Any]) -> int:
    """Each input's stream in turn; text chunks run on, other outputs one per line."""
    failed = 0
    echo = args.prompt is not None and isinstance(inputs[0], str) and sys.stdout.isatty()
    for index, x in enumerate(inputs):
        p = _Progress(time.perf_counter())
        if echo:
            print(x, end="", flush=True)  # the text continues the prompt
        try:
            async for out in engine.stream(x, timeout=args.timeout, **_kw(engine.stream, params)):
                text = p.add(out)
                is_text = isinstance(out, str) or hasattr(out, "finish_reason")
                print(text, end="" if is_text else "\n", flush=True)
        except BrokenPipeError:
            raise  # the reader of stdout left (`| head`): stop, quietly
        except Exception as exc:
            failed += 1
            if echo or p.first is not None:
                print(flush=True)  # end the partial text's line
            where = "" if len(inputs) == 1 else f"input {index} ({x!r}): "
            _err(f"dataflow run: {where}{_describe(exc)}")
            continue
        p.end = time.perf_counter()
        print(flush=True)
        if not args.quiet and len(inputs) == 1:
            _err(p.summary())
    return failed


async def _run_stream(engine: Any, x: Any, timeout: Any, params: Any, p: _Progress) -> None:
    try:
        async for out in engine.stream(x, timeout=timeout, **_kw(engine.stream, params)):
            p.add(out)
    except Exception as exc:
        p.error = _describe(exc)
    p.end = time.perf_counter()


async def _concurrent(engine: Any, x: Any, args: Any, params: dict[str, Any]) -> int:
    import anyio
    from rich.console import Console
    from rich.live import Live

    n = args.concurrency
    limit = params.get("max_new_tokens")
    seed = params.get("seed")
    started = time.perf_counter()
    streams = [_Progress(started) for _ in range(n)]
    console = Console(stderr=True)
    with Live(
        get_renderable=lambda: _table(streams, limit),
        console=console,
        refresh_per_second=8,
        transient=not console.is_terminal,
    ):
        async with anyio.create_task_group() as tg:
            for i, p in enumerate(streams):
                own = dict(params) if seed is None else {**params, "seed": seed + i}
                tg.start_soon(_run_stream, engine, x, args.timeout, own, p)
    wall = time.perf_counter() - started
    for p in streams:
        if p.error is None:
            print("".join(p.text), flush=True)
    total = sum(p.tokens for p in streams)
    ttfts = sorted(t for p in streams if (t := p.ttft_ms()) is not None)
    median = f"{ttfts[len(ttfts) // 2]:.0f} ms" if ttfts else "-"
    failed = [i for i, p in enumerate(streams) if p.error is not None]
    if not args.quiet:
        _err(
            f"[{n} streams ({n - len(failed)} ok, {len(failed)} failed), {total} tokens in "
            f"{wall:.2f} s: {total / max(wall, 1e-9):.0f} tokens/s aggregate, "
            f"time to first token p50 {median}]"
        )
    for i in failed:
        _err(f"dataflow run: stream {i}: {streams[i].error}")
    return len(failed)


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
