"""A step model (``df.StepModel``) over any Hugging Face causal LM, with a per-slot KV cache.

Each slot's cache is kept *compact* — one ``(keys, values)`` pair per layer, each
``[1, heads, length, head_dim]`` — until the slot runs in a batched ``step``. A step packs
the slots' caches into one ``DynamicCache`` of ``[batch, heads, longest, head_dim]``
tensors, left-aligned, with a 2-d attention mask that is 0 on each row's padding and
per-row ``position_ids`` (each row's own length), then runs one forward for all rows.

While the same slots step together, tick after tick (the steady state of continuous
batching), the packed cache the model returned is reused as it is: the model appends one
column per step and the mask grows with it. When slots join or leave, the next step
repacks: the rows that stay move over in one indexed copy per layer (padding columns and
all), joining rows are copied in from their compact caches, rows that sit this step out
(parked) are compacted, and freed rows are dropped. Padding is bounded: when the packed
columns exceed twice the longest row, every row is compacted first.

Prefill runs one forward per prompt (``prefill``) or one right-padded forward for all the
prompts that joined in a tick (``prefill_many``); right padding keeps every real token's
attention the same as unbatched, and only each row's real columns are kept.

Model arguments are passed by keyword (``cache=`` per transformers 5; GPT-2's ``forward``
takes the cache as its second positional parameter). Logits are returned on the CPU as
float32 ``[n, V]`` for the runtime's sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import InvalidRequest

__all__ = ["HFStepModel"]

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Packed:
    """The cache of the slots that stepped last, packed: rows in ``slots`` order."""

    slots: list[int]
    cache: Any  # a transformers DynamicCache
    mask: torch.Tensor  # [rows, columns], 1 where a row has a real token
    lengths: list[int]  # real tokens per row
    dead: set[int] = field(default_factory=set)  # slots freed since (rows dropped at repack)


class HFStepModel:
    """Per-slot decoding state for a ``PreTrainedModel`` (decoder-only, full attention).

    Args:
        model: the loaded causal LM, in eval mode, on its device and dtype.
        max_batch: the number of slots.
        max_positions: the model's context in tokens (None: unknown, not checked).
    """

    def __init__(self, model: Any, max_batch: int, max_positions: int | None = None) -> None:
        from transformers import DynamicCache

        self.model = model
        self.max_batch = max_batch
        if max_positions is not None:
            self.max_positions = max_positions
        self._dynamic_cache = DynamicCache
        self.device = next(model.parameters()).device
        embeddings = model.get_input_embeddings()
        # Token ids the embedding has rows for: a larger id is an IndexError on the CPU
        # and a device-side assert (which poisons the process's CUDA context) on a GPU.
        self.vocab: int | None = getattr(embeddings, "num_embeddings", None)
        self._compact: dict[int, KV] = {}
        self._packed: _Packed | None = None

    # -- the step-model protocol ---------------------------------------------------------

    def prefill(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        """Starts ``slot`` from ``prompt``; returns the logits ``[V]`` of the next token.

        Raises:
            InvalidRequest: a token id the model has no embedding for.
        """
        self._check(slot)
        self._check_ids(prompt)
        self.free(slot)
        with torch.inference_mode():
            ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
            out = self.model(
                input_ids=ids, cache=self._dynamic_cache(), use_cache=True, logits_to_keep=1
            )
            self._compact[slot] = _layers(out.cache)
            logits: torch.Tensor = out.logits[0, -1].float().cpu()
            return logits

    def prefill_many(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Starts every slot from its prompt in one right-padded forward; logits ``[n, V]``."""
        for slot in slots:
            self._check(slot)
        for prompt in prompts:
            self._check_ids(prompt)
        for slot in slots:
            self.free(slot)
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        with torch.inference_mode():
            ids = torch.zeros(len(prompts), longest, dtype=torch.long)
            mask = torch.zeros(len(prompts), longest, dtype=torch.long)
            for row, prompt in enumerate(prompts):
                ids[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
                mask[row, : len(prompt)] = 1
            positions = torch.arange(longest)[None, :].expand(len(prompts), -1)
            last = torch.tensor(lengths, device=self.device) - 1
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                cache=self._dynamic_cache(),
                use_cache=True,
                logits_to_keep=last[:, None],  # only each row's last real token
            )
            layers = _layers(out.cache)
            for row, (slot, n) in enumerate(zip(slots, lengths, strict=True)):
                self._compact[slot] = [
                    (k[row : row + 1, :, :n].clone(), v[row : row + 1, :, :n].clone())
                    for k, v in layers
                ]
            rows = torch.arange(len(prompts), device=self.device)
            kept = out.logits
            # a model that ignores a per-row logits_to_keep returns every position
            picked = kept[:, 0] if kept.shape[1] == 1 and longest > 1 else kept[rows, last]
            logits: torch.Tensor = picked.float().cpu()
            return logits

    def step(self, slots: Sequence[int], last_tokens: Sequence[int]) -> torch.Tensor:
        """Appends ``last_tokens[i]`` to ``slots[i]`` for all rows in one forward."""
        slots = list(slots)
        if not slots:
            return torch.empty(0, 0)
        with torch.inference_mode():
            packed = self._packed
            if packed is None or packed.slots != slots or packed.dead:
                packed = self._pack(slots)
            ones = torch.ones(len(slots), 1, dtype=packed.mask.dtype, device=self.device)
            mask = torch.cat([packed.mask, ones], dim=1)
            positions = torch.tensor(packed.lengths, device=self.device)[:, None]
            ids = torch.tensor(list(last_tokens), dtype=torch.long, device=self.device)[:, None]
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=packed.cache,
                use_cache=True,
            )
            self._packed = _Packed(slots, out.cache, mask, [n + 1 for n in packed.lengths])
            logits: torch.Tensor = out.logits[:, -1].float().cpu()
            return logits

    def free(self, slot: int) -> None:
        """Releases ``slot``'s cache (a no-op for a free slot)."""
        self._compact.pop(slot, None)
        if self._packed is not None and slot in self._packed.slots:
            self._packed.dead.add(slot)  # its row is dropped when the batch is next packed
            if len(self._packed.dead) == len(self._packed.slots):
                self._packed = None  # nothing alive in it: release it now

    def close(self) -> None:
        """Drops every cache."""
        self._compact.clear()
        self._packed = None

    # -- packing -------------------------------------------------------------------------

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} out of range 0..{self.max_batch - 1}")

    def _check_ids(self, prompt: Sequence[int]) -> None:
        vocab = self.vocab
        if vocab is not None and prompt and (min(prompt) < 0 or max(prompt) >= vocab):
            bad = next(t for t in prompt if not 0 <= t < vocab)
            raise InvalidRequest(
                f"the prompt's token id {bad} is out of the model's vocabulary (ids 0..{vocab - 1})"
            )

    def _extract(self, packed: _Packed, row: int) -> KV:
        """One packed row as a compact cache (its padding columns dropped)."""
        keep = packed.mask[row].bool()
        return [
            (k[row : row + 1, :, keep], v[row : row + 1, :, keep]) for k, v in _layers(packed.cache)
        ]

    def _pack(self, slots: list[int]) -> _Packed:
        """One packed cache for ``slots``, in that order.

        Rows already in the previous packed cache move over in one indexed copy per layer
        (their padding columns kept); the others come from their compact caches, left-
        aligned and zero-padded. Rows of the previous batch that do not step now are
        compacted and kept; freed ones are dropped. When padding would exceed the real
        tokens, every row is compacted first.
        """
        packed, self._packed = self._packed, None
        wanted = set(slots)
        carried: dict[int, int] = {}  # slot -> row in the previous packed cache
        if packed is not None:
            for row, slot in enumerate(packed.slots):
                if slot in packed.dead:
                    continue
                if slot in wanted:
                    carried[slot] = row
                else:
                    self._compact[slot] = self._extract(packed, row)
        missing = [s for s in slots if s not in carried and s not in self._compact]
        if missing:
            raise ValueError(f"step on slot(s) {missing} that were not prefilled")
        old_lengths = packed.lengths if packed is not None else []
        lengths = [
            old_lengths[carried[s]] if s in carried else self._compact[s][0][0].shape[2]
            for s in slots
        ]
        old_columns = packed.mask.shape[1] if packed is not None and carried else 0
        fresh = [self._compact[s][0][0].shape[2] for s in slots if s not in carried]
        columns = max([old_columns, *fresh])
        if packed is not None and carried and columns > 2 * max(lengths) + 16:
            for slot, row in carried.items():  # too much padding: compact everything
                self._compact[slot] = self._extract(packed, row)
            carried, columns = {}, max(lengths)
        dst = torch.tensor([i for i, s in enumerate(slots) if s in carried], device=self.device)
        src = torch.tensor([carried[s] for s in slots if s in carried], device=self.device)
        old_layers = _layers(packed.cache) if packed is not None and carried else []
        n_layers = len(old_layers) or len(self._compact[slots[0]])
        data = []
        for layer in range(n_layers):
            if old_layers:
                k0, v0 = old_layers[layer]
            else:
                k0, v0 = self._compact[slots[0]][layer]
            keys = k0.new_zeros((len(slots), k0.shape[1], columns, k0.shape[3]))
            values = v0.new_zeros((len(slots), v0.shape[1], columns, v0.shape[3]))
            if old_layers:
                keys[dst, :, :old_columns] = k0[src]
                values[dst, :, :old_columns] = v0[src]
            for i, slot in enumerate(slots):
                if slot not in carried:
                    k, v = self._compact[slot][layer]
                    keys[i, :, : k.shape[2]] = k[0]
                    values[i, :, : v.shape[2]] = v[0]
            data.append((keys, values))
        mask = torch.zeros(len(slots), columns, dtype=torch.long, device=self.device)
        if carried:
            assert packed is not None
            mask[dst, :old_columns] = packed.mask[src]
        for i, slot in enumerate(slots):
            if slot not in carried:
                mask[i, : lengths[i]] = 1
                del self._compact[slot]  # now held by the packed cache
        return _Packed(slots, self._dynamic_cache(data), mask, lengths)


def _layers(cache: Any) -> KV:
    """A DynamicCache's per-layer ``(keys, values)``."""
    return [(layer.keys, layer.values) for layer in cache.layers]
