"""``hf.text_encoder``: sentence embeddings from a Hugging Face encoder, dynamically batched.

The chain is ``tokenize (encode) >> windows (shard) >> encoder (infer, dynamic batching) >>
pool (merge)``. ``tokenize`` turns a text (or a non-empty list of texts) into token ids;
``windows`` cuts each text into windows of at most ``window`` tokens, special tokens
included, overlapping by ``overlap``, so a long text is embedded whole rather than
truncated; ``encoder`` runs the model on padded batches of windows from every request in
flight and reduces each window (the sum of its token states for mean pooling, its first
state for CLS pooling); ``pool`` combines a text's windows (mean over all its tokens, or
the first window's CLS state), optionally L2-normalises, and puts the texts back in order.
For a text that fits one window, mean pooling is exactly sentence-transformers' output.

    engine.run("a sentence")            -> tensor [dim]
    engine.run(["one", "two", "three"]) -> tensor [n, dim]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._errors import GraphError, InvalidRequest
from ..graph import Batch, Chain, encode, infer, merge, shard
from ._load import check_checkpoint, load_model, load_tokenizer

__all__ = ["POOLINGS", "text_encoder"]

POOLINGS = ("mean", "cls")

Window = tuple[int | None, torch.Tensor]  # (text index, or None for a single text; ids)
Pooled = tuple[int | None, torch.Tensor, int]  # (text index, reduced states, tokens)
Collated = tuple[torch.Tensor, torch.Tensor, list[int | None]]


def _collate(windows: list[Window]) -> Collated:
    longest = max(ids.shape[0] for _, ids in windows)
    ids = torch.zeros(len(windows), longest, dtype=torch.long)
    mask = torch.zeros(len(windows), longest, dtype=torch.long)
    for row, (_, w) in enumerate(windows):
        ids[row, : w.shape[0]] = w
        mask[row, : w.shape[0]] = 1
    return ids, mask, [index for index, _ in windows]


def _split(output: Collated, n: int) -> list[Pooled]:
    reduced, counts, indices = output
    return [(indices[i], reduced[i], int(counts[i])) for i in range(n)]


class _Encoder:
    """The encoder, loaded once per replica in the replica's own thread."""

    path: Path
    pooling: str
    where: str

    def setup(self) -> None:
        from transformers import AutoModel

        self.model = load_model(
            self.where, self.path, torch.float32, torch.device("cpu"), AutoModel
        )

    def __call__(self, batch: Collated) -> Collated:
        ids, mask, indices = batch
        with torch.inference_mode():
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            if self.pooling == "cls":
                return states[:, 0], mask.sum(dim=1), indices
            weights = mask.unsqueeze(-1).to(states.dtype)
            return (states * weights).sum(dim=1), mask.sum(dim=1), indices


def _key(index: int | None) -> int:
    return -1 if index is None else index


def _specials(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (``[CLS]``/``[SEP]``, BOS/EOS)."""
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    n = len(probe)
    for start in range(len(full) - n + 1):
        if full[start : start + n] == probe:
            return list(full[:start]), list(full[start + n :])
    return [], []


def text_encoder(
    path: str | Path,
    pooling: str = "mean",
    normalize: bool = True,
    *,
    window: int | None = None,
    overlap: int = 32,
    max_batch: int = 32,
    max_wait: float = 0.005,
    replicas: int = 1,
    name: str = "encoder",
    label: str | None = None,
) -> Chain:
    """An embedding chain over a local encoder checkpoint (BERT, MiniLM, RoBERTa, ...).

    Args:
        path: the checkpoint directory (``config.json``, weights, tokenizer files).
        pooling: ``"mean"`` (over all of a text's tokens, special tokens included, as
            sentence-transformers does) or ``"cls"`` (the first token's state).
        normalize: L2-normalise each vector.
        window: most tokens per window, special tokens included; default the tokenizer's
            ``model_max_length`` capped at the model's positions (and at 512).
        overlap: tokens shared by consecutive windows of a long text.
        max_batch: most windows per encoder call.
        max_wait: seconds a partial batch waits for more windows.
        replicas: encoder threads (each loads its own copy of the model).
        name: the encoder node's name (the others are ``tokenize``, ``windows``, ``pool``).
        label: what error messages about bad input call the model (default: the
            directory's name).

    Raises:
        GraphError: missing files, an unknown pooling, window or overlap out of range.
    """
    where = f"text_encoder {str(path)!r}"
    if pooling not in POOLINGS:
        raise GraphError(f"{where}: pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    root = check_checkpoint(where, path, tokenizer=True)
    tokenizer = load_tokenizer(where, root)
    if window is None:
        from transformers import AutoConfig

        positions = getattr(
            AutoConfig.from_pretrained(str(root), local_files_only=True),
            "max_position_embeddings",
            512,
        )
        window = min(int(getattr(tokenizer, "model_max_length", 512) or 512), int(positions), 512)
    prefix, suffix = _specials(tokenizer)
    body = window - len(prefix) - len(suffix)
    if body < 4:
        raise GraphError(f"{where}: window must leave at least 4 tokens for text, got {window}")
    if not 0 <= overlap < body:
        raise GraphError(f"{where}: overlap must be 0..{body - 1}, got {overlap}")
    step = body - overlap
    what = label or Path(path).name

    @encode
    def tokenize(texts: str | list[str]) -> list[tuple[int | None, list[int]]]:
        if isinstance(texts, str):
            items: list[tuple[int | None, str]] = [(None, texts)]
        elif isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
            items = list(enumerate(texts))
        else:
            raise InvalidRequest(f"{what}: input must be a string or a non-empty list of them")
        for index, text in items:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                which = "the text" if index is None else f"text {index}"
                raise InvalidRequest(
                    f"{what}: {which} is not valid Unicode (a lone surrogate at character "
                    f"{exc.start})"
                ) from None
        encoded = tokenizer([t for _, t in items], add_special_tokens=False)["input_ids"]
        return [(index, ids) for (index, _), ids in zip(items, encoded, strict=True)]

    @shard
    def windows(tokenized: list[tuple[int | None, list[int]]]) -> list[Window]:
        parts: list[Window] = []
        for index, ids in tokenized:
            starts = [0]
            while starts[-1] + body < len(ids):
                starts.append(starts[-1] + step)
            if pooling == "cls":
                starts = starts[:1]  # the first window's [CLS] state is the text's
            for start in starts:
                chunk = [*prefix, *ids[start : start + body], *suffix]
                parts.append((index, torch.tensor(chunk, dtype=torch.long)))
        return parts

    body_class = type(
        "Encoder",
        (_Encoder,),
        {"path": root, "pooling": pooling, "where": where, "__module__": __name__},
    )
    encoder = infer(
        body_class,
        name=name,
        placement="thread",
        replicas=replicas,
        batch=Batch(max_size=max_batch, max_wait=max_wait, collate=_collate, split=_split),
    )

    @merge
    def pool(parts: list[Pooled]) -> torch.Tensor:
        sums: dict[int | None, torch.Tensor] = {}
        counts: dict[int | None, int] = {}
        for index, reduced, count in parts:
            if pooling == "cls":
                sums[index], counts[index] = reduced, 1
                continue
            sums[index] = sums[index] + reduced if index in sums else reduced
            counts[index] = counts.get(index, 0) + count
        vectors = [sums[i] / counts[i] for i in sorted(sums, key=_key)]
        if normalize:
            vectors = [torch.nn.functional.normalize(v, dim=0) for v in vectors]
        return vectors[0] if None in sums else torch.stack(vectors)

    chain: Chain = tokenize >> windows >> encoder >> pool
    return chain
