"""Bring your own Hugging Face model (extra ``dataflow-engine[hf]``).

* :func:`causal_lm` — a ``generate`` node (continuous batching, streaming, chat templates)
  over any ``AutoModelForCausalLM`` checkpoint directory or loaded model;
* :func:`text_encoder` — a ``tokenize >> windows >> encoder >> pool`` chain (dynamic
  batching) over any ``AutoModel`` encoder, returning pooled sentence vectors.

Only local files are read; nothing is downloaded. See ``docs/hf.md``.
"""

from __future__ import annotations

from ._causal import causal_lm
from ._encoder import text_encoder
from ._step import HFStepModel
from ._tokens import token_bytes_table

__all__ = ["HFStepModel", "causal_lm", "text_encoder", "token_bytes_table"]
