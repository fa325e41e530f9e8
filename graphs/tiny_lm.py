"""A byte-level GPT-style LM (RoPE, slot KV cache) served with continuous batching.

``dataflow run graphs/tiny_lm.py --prompt "def main(" --max-tokens 200``

The shipped weights (``graphs/weights/tiny_lm.safetensors``) were trained by
``examples/train_tiny_lm.py`` on the Python standard library's sources; the file's
metadata records the command and the held-out bits per byte. Prompts longer than the
model's context (128 bytes) keep their last 128 bytes.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import dataflow as df
from graphs._lm_graph import WEIGHTS, lm_graph

__all__ = ["EXAMPLE_INPUTS", "build"]

EXAMPLE_INPUTS = ["def main("]
CONTEXT = 128


def _cache(path: str, max_batch: int) -> df.StepModel:
    from graphs._tiny_lm_model import load_tiny_lm

    return load_tiny_lm(path).new_cache(max_batch)


def build(
    *,
    weights: str | Path = WEIGHTS / "tiny_lm.safetensors",
    max_batch: int = 32,
    max_new_tokens: int = 128,
    max_new_tokens_limit: int = 4096,
    temperature: float = 0.8,
    top_k: int = 0,
    replicas: int = 1,
    placement: str = "auto",
    threads: int | None = None,
    **options: Any,
) -> df.Graph:
    """The tiny LM graph: ``prompt`` (text -> bytes) >> ``tiny_lm`` (generate, text out).

    Per-request parameters: ``max_new_tokens``, ``temperature``, ``top_k``, ``seed``,
    ``stop``. Raises ``GraphError`` if the weights file is missing.
    """
    path = Path(weights)
    return lm_graph(
        "tiny_lm",
        partial(_cache, str(path)),
        path,
        max_prompt=CONTEXT,
        train_command="python examples/train_tiny_lm.py",
        max_batch=max_batch,
        max_new_tokens=max_new_tokens,
        max_new_tokens_limit=max_new_tokens_limit,
        temperature=temperature,
        top_k=top_k,
        replicas=replicas,
        placement=placement,
        threads=threads,
        **options,
    )
