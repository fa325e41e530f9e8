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
            lines = read_inputs(inputs, skip)
            results = engine.map(lines, ordered=True, window=window)
            async for line_no, (text, result) in enumerate(_pair(lines, results), skip + 1):
                record = {"line": line_no, "input": text, "output": jsonable(result)}
                out.write(json.dumps(record) + "\n")
                out.flush()  # a complete line on disk is a line a rerun will skip
                count += 1
                progress.advance(task)
            os.fsync(out.fileno())
    return count


class _pair:
    """(input, result) pairs: ``engine.map`` keeps input order, so inputs are recorded as
    they are pulled and matched to results as they come back."""

    def __init__(self, lines: Iterator[str], results: df.MapStream) -> None:
        self._pulled: list[str] = []
        self._results = results
        # Wrap the line iterator the map pulls from, so the text of each result is known.
        lines_iter = lines

        def recording() -> Iterator[str]:
            for line in lines_iter:
                self._pulled.append(line)
                yield line

        results._sync = recording()  # type: ignore[attr-defined]

    def __aiter__(self) -> _pair:
        return self

    async def __anext__(self) -> tuple[str, Any]:
        result = await anext(self._results)
        return self._pulled.pop(0), result
