"""The seed document's byte-level LSTM language model, with slot state for continuous batching.

Embedding(256, emb) -> dropout -> LSTM(n_layers, dropout) -> dropout -> Linear(256), as in
the seed's ``LanguageModel``, but predicting the next byte at every position rather than only
after the last one, which gives ``context`` training signals per window instead of one.

Serving mirrors :class:`graphs._tiny_lm_model.SlotCache`: :class:`LSTMSlotCache` holds
``(h, c)`` for ``max_batch`` slots, so sequences join and leave between steps and one
``step`` advances all active slots in one batched LSTM call. A recurrent state has no
window, so nothing slides: a slot can run past the training context indefinitely (quality
may drift beyond the ``context`` bytes the model was trained on, but the arithmetic is
exactly that of one long forward pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from graphs._slots import SlotAllocator
from graphs._weights import load_model, save_weights

__all__ = [
    "KIND",
    "LSTMConfig",
    "LSTMLanguageModel",
    "LSTMSlotCache",
    "load_lstm_lm",
    "save_lstm_lm",
]

KIND = "lstm_lm"


@dataclass(frozen=True)
class LSTMConfig:
    """The shape of an :class:`LSTMLanguageModel`.

    Attributes:
        vocab_size: 256, one token per byte.
        embedding_dim: width of the byte embedding.
        hidden_dim: LSTM hidden and cell width.
        n_layers: stacked LSTM layers (at least 2 when ``dropout`` > 0, as torch requires).
        dropout: dropout on the embedding, between LSTM layers and before the head. The
            seed used 0.5; the default is 0 because a few-minute run sees well under one
            epoch of the corpus, where dropout only slows fitting.
        context: the training window; serving is not limited by it.
    """

    vocab_size: int = 256
    embedding_dim: int = 64
    hidden_dim: int = 384
    n_layers: int = 2
    dropout: float = 0.0
    context: int = 128

    def __post_init__(self) -> None:
        if self.dropout > 0 and self.n_layers < 2:
            # torch only warns, and applies no inter-layer dropout; say so up front instead.
            raise ValueError("dropout between LSTM layers needs n_layers >= 2")


class LSTMLanguageModel(nn.Module):
    """Embedding -> LSTM -> Linear, over bytes; batch-first throughout."""

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.rnn = nn.LSTM(
            config.embedding_dim,
            config.hidden_dim,
            config.n_layers,
            dropout=config.dropout,
            batch_first=True,
        )
        self.fc = nn.Linear(config.hidden_dim, config.vocab_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward_with_state(
        self, ids: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Runs the LSTM over ``ids`` ``[B, T]`` from ``state`` (zeros when None).

        Returns:
            Logits ``[B, T, 256]`` and the final ``(h, c)``, each ``[n_layers, B, hidden]``.
        """
        embedded = self.dropout(self.embedding(ids))
        output, (h, c) = self.rnn(embedded, state)
        logits: torch.Tensor = self.fc(self.dropout(output))
        return logits, (h, c)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Returns next-byte logits ``[B, T, 256]`` for ``ids`` ``[B, T]``, from a zero state."""
        return self.forward_with_state(ids)[0]

    def new_cache(self, max_batch: int) -> LSTMSlotCache:
        """Allocates an :class:`LSTMSlotCache` for this model on its device and dtype."""
        return LSTMSlotCache(self, max_batch)


class LSTMSlotCache(SlotAllocator):
    """Per-slot recurrent state: ``(h, c)`` for ``max_batch`` slots.

    Same interface as :class:`graphs._tiny_lm_model.SlotCache`: ``acquire``, ``prefill``,
    ``step``, ``free``. Not thread-safe: drive one cache from one thread.

    Attributes:
        h: hidden states ``[n_layers, max_batch, hidden]``.
        c: cell states, same shape.
    """

    def __init__(self, model: LSTMLanguageModel, max_batch: int) -> None:
        super().__init__(max_batch)
        config = model.config
        param = model.fc.weight
        shape = (config.n_layers, max_batch, config.hidden_dim)
        self.model = model
        self.h = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.c = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self._lengths = [0] * max_batch

    def length(self, slot: int) -> int:
        """The number of bytes ``slot`` has consumed since its prefill (0 when free)."""
        return self._lengths[self._check(slot)]

    def free(self, slot: int) -> None:
        """Releases ``slot``."""
        self._release(slot)
        self._lengths[slot] = 0

    def prefill(self, slot: int, ids: Sequence[int]) -> torch.Tensor:
        """Resets ``slot`` and runs the prompt ``ids`` through it from a zero state.

        Args:
            slot: the slot to fill (marked used if it was free).
            ids: the prompt bytes, at least one. All are kept: the state has no window.

        Returns:
            Float logits ``[256]`` for the byte following ``ids``.

        Raises:
            ValueError: on an empty prompt, a byte outside 0..255, or a bad slot.
        """
        prompt = self._prompt(slot, ids)
        with torch.no_grad():
            logits, (h, c) = self.model.forward_with_state(
                torch.tensor([prompt], device=self.h.device)
            )
            self.h[:, slot] = h[:, 0]
            self.c[:, slot] = c[:, 0]
        self._used[slot] = True
        self._lengths[slot] = len(prompt)
        return logits[0, -1]

    def prefill_many(self, slots: Sequence[int], id_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """:meth:`prefill` for several slots at once, in one packed LSTM call.

        Equal (within float tolerance) to ``prefill(slots[i], id_lists[i])`` for every i.
        The prompts are packed (``pack_padded_sequence``), so each slot's state is taken
        after its own last byte, never after padding.

        Args:
            slots: distinct slots to fill (marked used if they were free).
            id_lists: one prompt per slot, each at least one byte.

        Returns:
            Float logits ``[len(slots), 256]``, row i for ``slots[i]``.

        Raises:
            ValueError: on mismatched lengths, repeated slots, an empty prompt, a byte
                outside 0..255, or a bad slot. Nothing is filled then.
        """
        prompts = self._prompts(slots, id_lists)
        device = self.h.device
        if not prompts:
            return torch.empty(0, self.model.config.vocab_size, device=device)
        lengths = [len(p) for p in prompts]
        span = max(lengths)
        padded = torch.tensor([p + [0] * (span - len(p)) for p in prompts], device=device)
        model = self.model
        with torch.no_grad():
            embedded = model.dropout(model.embedding(padded))
            packed = pack_padded_sequence(
                embedded, torch.tensor(lengths), batch_first=True, enforce_sorted=False
            )
            _, (h, c) = model.rnn(packed)
            # The last layer's final hidden state is its output at each prompt's last byte.
            logits: torch.Tensor = model.fc(model.dropout(h[-1]))
            index = torch.tensor(list(slots), device=device)
            self.h[:, index] = h
            self.c[:, index] = c
        for slot, n in zip(slots, lengths, strict=True):
            self._used[slot] = True
            self._lengths[slot] = n
        return logits

    def step(self, slots: Sequence[int], last_ids: Sequence[int]) -> torch.Tensor:
        """Feeds ``last_ids[i]`` to ``slots[i]`` for every i, in one batched LSTM call.

        Args:
            slots: distinct, prefilled slots, in any order.
            last_ids: one byte per slot.

        Returns:
            Float logits ``[len(slots), 256]``, row i for ``slots[i]``.

        Raises:
            ValueError: on mismatched lengths, repeated or unfilled slots, or bad bytes.
        """
        new_ids = self._step_ids(slots, last_ids)
        if not slots:
            return torch.empty(0, self.model.config.vocab_size, device=self.h.device)
        device = self.h.device
        index = torch.tensor(list(slots), device=device)
        with torch.no_grad():
            state = (self.h[:, index].contiguous(), self.c[:, index].contiguous())
            ids = torch.tensor(new_ids, device=device)[:, None]
            logits, (h, c) = self.model.forward_with_state(ids, state)
            self.h[:, index] = h
            self.c[:, index] = c
        for slot in slots:
            self._lengths[slot] += 1
        return logits[:, 0]


def save_lstm_lm(
    model: LSTMLanguageModel, path: str | Path, extra: dict[str, str] | None = None
) -> int:
    """Saves ``model`` with :func:`graphs._weights.save_weights`; returns the file size."""
    return save_weights(model, path, kind=KIND, config=asdict(model.config), extra=extra)


def load_lstm_lm(path: str | Path, device: str | torch.device = "cpu") -> LSTMLanguageModel:
    """Rebuilds an :class:`LSTMLanguageModel` from a weights file alone, in float32 eval mode.

    Args:
        path: a file written by :func:`save_lstm_lm`.
        device: where to place the model.

    Returns:
        The model, ready for ``new_cache``.

    Raises:
        ValueError: when the file is not an LSTM weights file.
    """
    return load_model(path, KIND, lambda config: LSTMLanguageModel(LSTMConfig(**config)), device)
