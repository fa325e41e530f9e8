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


def build(*, weights: str | Path = WEIGHTS / "tiny_lm.safetensors", **options: Any) -> df.Graph:
    """The tiny LM graph: ``prompt`` (text or chat messages -> bytes) >> ``tiny_lm``
    (generate, text out). Chat messages use :func:`graphs._lm_graph.chat_prompt`.

    ``options``: see :func:`graphs._lm_graph.lm_graph`. Raises ``GraphError`` if the
    weights file is missing.
    """
    path = Path(weights)
    train = "python examples/train_tiny_lm.py"
    factory = partial(_cache, str(path))
    return lm_graph("tiny_lm", factory, path, max_prompt=CONTEXT, train_command=train, **options)
