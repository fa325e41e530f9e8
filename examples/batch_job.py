"""A batch job: run a graph over every line of a text file, writing JSONL, resumably.

    python examples/batch_job.py inputs.txt embeddings.jsonl            # graphs.minilm
    python examples/batch_job.py prompts.txt out.jsonl --graph graphs.tiny_lm

Each output line is ``{"line": N, "input": "...", "output": ...}`` in input order. Run it
again after an interruption and it continues after the last complete line. Memory stays
bounded whatever the file size: lines are read lazily and ``engine.map`` takes the next
one only when a request of its window finishes. A progress bar (rich) shows the rate.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from collections import deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import anyio
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import dataflow as df


def jsonable(value: Any) -> Any:
    """Tensors and arrays as (nested) lists; what a graph returns, as JSON."""
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


def done_lines(output: Path) -> int:
    """Complete lines already written; a torn last line (crash mid-write) is cut off."""
    if not output.exists():
        return 0
    data = output.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with output.open("r+b") as f:
            f.truncate(keep)
    return data.count(b"\n", 0, keep)


def read_inputs(path: Path, skip: int) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in islice(f, skip, None):
            yield line.rstrip("\n")


async def run(
    graph_module: str, inputs: Path, output: Path, *, window: int = 64, quiet: bool = False
) -> int:
    """Process the lines of ``inputs`` not yet in ``output``; returns how many it did."""
    skip = done_lines(output)
    with inputs.open(encoding="utf-8") as f:
        total = sum(1 for _ in f)
    graph = importlib.import_module(graph_module).build()
    # ordered=True yields results in input order, so the oldest line pulled is the one
    # each result belongs to; at most ``window`` lines wait here.
    pulled: deque[str] = deque()

    def lines() -> Iterator[str]:
        for line in read_inputs(inputs, skip):
            pulled.append(line)
            yield line

    count = 0
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=quiet,
    )
    async with df.Engine(graph) as engine:
        with progress, output.open("a", encoding="utf-8") as out:
            task = progress.add_task(graph.name, total=total, completed=skip)
            async for result in engine.map(lines(), ordered=True, window=window):
                count += 1
                record = {
                    "line": skip + count,
                    "input": pulled.popleft(),
                    "output": jsonable(result),
                }
                out.write(json.dumps(record) + "\n")
                out.flush()  # a complete line on disk is a line a rerun will skip
                progress.advance(task)
            os.fsync(out.fileno())
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", type=Path, help="text file, one input per line")
    parser.add_argument("output", type=Path, help="JSONL file (appended to, resumable)")
    parser.add_argument("--graph", default="graphs.minilm", help="graph module")
    parser.add_argument("--window", type=int, default=64, help="most requests in flight")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    done = anyio.run(
        lambda: run(args.graph, args.inputs, args.output, window=args.window, quiet=args.quiet)
    )
    print(f"{done} new lines written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
