"""The serving protocol the byte-level models share, and sampling helpers.

A continuous-batching node keeps up to ``max_batch`` sequences running. Each lives in a
*slot* of the model's preallocated state; sequences join (``prefill``) and leave (``free``)
between steps, and one ``step`` call advances every active slot by one token in a single
batched forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

__all__ = ["SlotAllocator", "SlotDecoder", "check_bytes", "generate", "sample_next"]


class SlotDecoder(Protocol):
    """A model's per-slot decoding state (KV cache or recurrent state).

    Not thread-safe: one thread drives one instance. Slot numbers are ``0 .. max_batch - 1``.
    """

    @property
    def max_batch(self) -> int:
        """The number of slots."""
        ...

    def acquire(self) -> int:
        """Returns the lowest free slot and marks it used (``RuntimeError`` when none)."""
        ...

    def prefill(self, slot: int, ids: Sequence[int]) -> torch.Tensor:
        """Resets ``slot`` to the prompt ``ids`` and returns the next-byte logits ``[256]``."""
        ...

    def step(self, slots: Sequence[int], last_ids: Sequence[int]) -> torch.Tensor:
        """Appends ``last_ids[i]`` to ``slots[i]`` for all i; returns logits ``[len, 256]``."""
        ...

    def free(self, slot: int) -> None:
        """Releases ``slot``; it may be acquired and prefilled again."""
        ...


class SlotAllocator:
    """Slot bookkeeping shared by the models' caches: which slots are in use."""

    def __init__(self, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._max_batch = max_batch
        self._used = [False] * max_batch

    @property
    def max_batch(self) -> int:
        """The number of slots."""
        return self._max_batch

    def acquire(self) -> int:
        """Marks the lowest free slot used and returns it.

        Raises:
            RuntimeError: when all ``max_batch`` slots are in use.
        """
        for slot, used in enumerate(self._used):
            if not used:
                self._used[slot] = True
                return slot
        raise RuntimeError(f"all {self._max_batch} slots are in use; free one first")

    def _release(self, slot: int) -> None:
        self._used[self._check(slot)] = False

    def _check(self, slot: int) -> int:
        if not 0 <= slot < self._max_batch:
            raise ValueError(f"slot {slot} out of range 0..{self._max_batch - 1}")
        return slot

    def length(self, slot: int) -> int:
        """The number of bytes ``slot`` holds (0 when free or not yet prefilled)."""
        raise NotImplementedError

    def _prompt(self, slot: int, ids: Sequence[int], window: int | None = None) -> list[int]:
        """Checks a ``prefill``: returns the prompt as ints, only its last ``window`` kept.

        Raises:
            ValueError: on a bad slot, an empty prompt, or a kept id outside 0..255.
        """
        self._check(slot)
        prompt = [int(i) for i in ids]
        if window is not None:
            prompt = prompt[-window:]
        if not prompt:
            raise ValueError("prefill needs at least one id")
        check_bytes(prompt)
        return prompt

    def _prompts(
        self, slots: Sequence[int], id_lists: Sequence[Sequence[int]], window: int | None = None
    ) -> list[list[int]]:
        """Checks a ``prefill_many``: :meth:`_prompt` for each slot, slots distinct.

        Raises:
            ValueError: on mismatched lengths, repeated slots, or any bad prompt.
        """
        _distinct_pairs(slots, id_lists, "prompts")
        return [self._prompt(s, ids, window) for s, ids in zip(slots, id_lists, strict=True)]

    def _step_ids(self, slots: Sequence[int], last_ids: Sequence[int]) -> list[int]:
        """Checks a ``step``: returns ``last_ids`` as ints.

        Raises:
            ValueError: on mismatched lengths, repeated or unfilled slots, or bad bytes.
        """
        _distinct_pairs(slots, last_ids, "ids")
        new_ids = [int(i) for i in last_ids]
        check_bytes(new_ids)
        for slot in slots:
            if not self.length(slot):
                raise ValueError(f"slot {slot} is empty: prefill it before stepping")
        return new_ids


def check_bytes(ids: Sequence[int]) -> None:
    """Raises ``ValueError`` unless every id is a byte value (0..255)."""
    if any(not 0 <= i < 256 for i in ids):
        raise ValueError("ids must be bytes in 0..255")


def sample_next(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Samples one byte per row.

    Args:
        logits: ``[256]`` or ``[n, 256]``.
        temperature: 0 picks the most likely byte; higher flattens the distribution.
        generator: the source of randomness (one per request keeps requests reproducible
            whatever else shares the batch).

    Returns:
        A LongTensor of shape ``[]`` or ``[n]``.
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    picked = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return picked.reshape(probs.shape[:-1])


def generate(
    decoder: SlotDecoder,
    prompt: bytes,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    seed: int = 0,
) -> Iterator[int]:
    """Streams bytes continuing ``prompt``, one slot, no batching (for demos and checks).

    Args:
        decoder: the model's slot state.
        prompt: the text to continue (at least one byte).
        max_new_tokens: how many bytes to produce.
        temperature: see :func:`sample_next`.
        seed: seeds the sampling generator.

    Yields:
        The generated bytes as ints.
    """
    generator = torch.Generator().manual_seed(seed)
    slot = decoder.acquire()
    try:
        logits = decoder.prefill(slot, list(prompt))
        for _ in range(max_new_tokens):
            byte = int(sample_next(logits, temperature, generator))
            yield byte
            logits = decoder.step([slot], [byte])[0]
    finally:
        decoder.free(slot)


def _distinct_pairs(slots: Sequence[int], values: Sequence[object], what: str) -> None:
    """One value per slot, and no slot twice."""
    if len(slots) != len(values):
        raise ValueError(f"{len(slots)} slots but {len(values)} {what}")
    if len(set(slots)) != len(slots):
        raise ValueError(f"slots repeat in {list(slots)}")
