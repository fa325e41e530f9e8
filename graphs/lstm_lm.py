"""The seed document's LSTM language model, byte-level, served with continuous batching.

``dataflow run graphs/lstm_lm.py --prompt "import " --max-tokens 200``

Embedding -> LSTM -> Linear (``graphs/_lstm_model.py``), trained by
``examples/train_lstm_lm.py``; each running sequence keeps its own ``(h, c)`` state in a
slot. The state has no window, so prompts are only capped (their last 4096 bytes kept).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import dataflow as df
from graphs._lm_graph import WEIGHTS, lm_graph

__all__ = ["EXAMPLE_INPUTS", "build"]

EXAMPLE_INPUTS = ["import "]
MAX_PROMPT = 4096


def _cache(path: str, max_batch: int) -> df.StepModel:
    from graphs._lstm_model import load_lstm_lm

    return load_lstm_lm(path).new_cache(max_batch)


def build(
    *,
    weights: str | Path = WEIGHTS / "lstm_lm.safetensors",
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
    """The LSTM graph: ``prompt`` (text -> bytes) >> ``lstm_lm`` (generate, text out).

    Per-request parameters: ``max_new_tokens``, ``temperature``, ``top_k``, ``seed``,
    ``stop``. Raises ``GraphError`` if the weights file is missing.
    """
    path = Path(weights)
    return lm_graph(
        "lstm_lm",
        partial(_cache, str(path)),
        path,
        max_prompt=MAX_PROMPT,
        train_command="python examples/train_lstm_lm.py",
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
