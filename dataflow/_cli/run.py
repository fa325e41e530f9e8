"""``dataflow run GRAPH``: run a graph on inputs and print what it produces."""

from __future__ import annotations

import argparse
import json
import sys
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
    module = load_module(args.graph)
    graph = load_graph(args.graph, **options)
    inputs: list[Any] = list(args.input) or list(getattr(module, "EXAMPLE_INPUTS", []))
    if not inputs:
        print("no inputs: pass --input", file=sys.stderr)
        return 2

    async def go() -> None:
        async with Engine(graph) as engine:
            if graph.plan().streaming:
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


async def _zip(inputs: list[Any], results: Any) -> Any:
    index = 0
    async for result in results:
        yield inputs[index], result
        index += 1
