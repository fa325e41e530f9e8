"""A Hugging Face causal LM served with continuous batching: the shipped checkpoint or yours.

``dataflow run graphs/hf_lm.py --prompt "def main(" --max-tokens 100``
``dataflow serve graphs/hf_lm.py -o path=/path/to/checkpoint``   (completions and chat)

The default checkpoint (``graphs/weights/hf_lm/``) is a small Llama-architecture model
(5.9M parameters, fp16, byte-level BPE of 4096 tokens, context 1024) trained by
``examples/train_hf_lm.py`` on the Python standard library, with a chat template
(``<|user|>``/``<|assistant|>`` turns) it saw during training: asked for a function by
name, it writes Python. See ``docs/models.md`` for its training run and ``docs/hf.md`` for
serving your own checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dataflow as df
from graphs._lm_graph import WEIGHTS

__all__ = ["CHECKPOINT", "EXAMPLE_INPUTS", "build"]

CHECKPOINT = WEIGHTS / "hf_lm"
EXAMPLE_INPUTS = ["def main("]


def build(path: str | Path | None = None, **options: Any) -> df.Graph:
    """One ``generate`` node over a local checkpoint directory (default the shipped one).

    Args:
        path: a Hugging Face checkpoint directory (``config.json``, weights, tokenizer).
        **options: :func:`dataflow.hf.causal_lm` options: ``max_batch`` (default 32),
            ``max_new_tokens`` (default 128), ``temperature`` (default 0.8), ``top_k``,
            ``top_p``, ``placement``, ``dtype``, ``threads``, ``replicas``,
            ``chat_template``, ``name`` (default ``hf_lm``).

    Raises:
        GraphError: the checkpoint is missing files (the message names them), or the
            ``hf`` extra is not installed.
    """
    try:
        from dataflow import hf
    except ImportError as exc:
        raise df.GraphError(
            f"graphs/hf_lm.py needs the hf extra: pip install 'dataflow-engine[hf]' ({exc})"
        ) from None
    options.setdefault("name", "hf_lm")
    options.setdefault("temperature", 0.8)
    node = hf.causal_lm(CHECKPOINT if path is None else path, **options)
    return df.Graph(str(options["name"]), node)
