"""A pure trio program: several prompts stream tokens concurrently from one engine.

    python examples/trio_app.py "def main(" "import torch" "class Node:"

Each prompt's tokens are printed as ``[index] text`` lines when its stream ends, and the
engine's request figures last. The graph is ``graphs.tiny_lm`` unless ``--graph`` names
another graph module (a streaming graph: prompt string in, text chunks out).
"""

from __future__ import annotations

import argparse
import importlib
import json

import trio

import dataflow as df


async def complete(
    engine: df.Engine, index: int, prompt: str, max_new_tokens: int, results: dict[int, str]
) -> None:
    text = prompt
    async for chunk in engine.stream(prompt, max_new_tokens=max_new_tokens, seed=index):
        text += chunk
    results[index] = text


async def main(graph_module: str, prompts: list[str], max_new_tokens: int) -> dict[int, str]:
    graph = importlib.import_module(graph_module).build()
    results: dict[int, str] = {}
    async with df.Engine(graph) as engine:
        # A trio nursery owns the streams; the engine runs on trio through anyio.
        async with trio.open_nursery() as nursery:
            for i, prompt in enumerate(prompts):
                nursery.start_soon(complete, engine, i, prompt, max_new_tokens, results)
        for i in sorted(results):
            print(f"[{i}] {results[i]!r}")
        print(json.dumps(engine.stats()["requests"]))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts", nargs="*", default=["def main(", "import torch", "class "])
    parser.add_argument("--graph", default="graphs.tiny_lm", help="graph module")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    trio.run(main, args.graph, args.prompts, args.max_new_tokens)
