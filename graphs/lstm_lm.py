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


def build(*, weights: str | Path = WEIGHTS / "lstm_lm.safetensors", **options: Any) -> df.Graph:
    """The LSTM graph: ``prompt`` (text or chat messages -> bytes) >> ``lstm_lm``
    (generate, text out). Chat messages use :func:`graphs._lm_graph.chat_prompt`.

    ``options``: see :func:`graphs._lm_graph.lm_graph`. Raises ``GraphError`` if the
    weights file is missing.
    """
    path = Path(weights)
    train = "python examples/train_lstm_lm.py"
    factory = partial(_cache, str(path))
    return lm_graph("lstm_lm", factory, path, max_prompt=MAX_PROMPT, train_command=train, **options)
