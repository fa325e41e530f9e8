"""A step model (``df.StepModel``) over any Hugging Face causal LM, with a slot-indexed KV cache.

The cache is preallocated: per layer one keys and one values tensor of
``[max_batch, heads, capacity, head_dim]``, a row per slot, and a ``[max_batch, capacity]``
mask of the columns each row holds. Every step writes its new column in place, at the
same column ``C`` for every row, and the model attends over a view of the columns
``[lo, C]`` (``lo``: the first column any stepping row holds) — nothing is copied per
step, where a ``DynamicCache`` concatenates (copies) the whole cache at every layer.

* ``prefill`` / ``prefill_many`` run the prompts in a fresh ``DynamicCache`` (one
  right-padded forward for all the prompts that join in a tick: right padding keeps every
  real token's attention the same as unbatched) and copy each row's real columns into its
  slot's row, right-aligned at ``C`` so that a new row's columns end where the others'
  do. A prompt longer than ``C`` moves ``C`` on (the other rows get masked columns).
* ``step(slots, tokens)`` runs the rows ``0 .. max(slots)`` in one forward when at least
  half of them step (the others, free or sitting the step out, get a dummy token whose
  column stays masked), or gathers the stepping rows' window when few do. Per-row
  ``position_ids`` are each row's own length; the 2-d mask is each row's held columns.
* When ``C`` reaches the capacity, every row's columns shift left together (one copy),
  and the capacity doubles only if the live rows still need it.

Model arguments are passed by keyword (``cache=`` per transformers 5; GPT-2's ``forward``
takes the cache as its second positional parameter). Logits are returned on the CPU as
float32 ``[n, V]`` for the runtime's sampler.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from .._errors import InvalidRequest

__all__ = ["HFStepModel"]

KV = list[tuple[torch.Tensor, torch.Tensor]]
_MIN_CAPACITY = 64


@functools.cache
def _layer_class() -> type[Any]:
    """A transformers cache layer that writes into, and reads a window of, the slot cache."""
    from transformers.cache_utils import CacheLayerMixin

    class SlotLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
        is_sliding = False

        def __init__(self, owner: HFStepModel, index: int) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.owner, self.index = owner, index
            self.is_initialized = True

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            pass

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return self.owner._write(self.index, key_states, value_states)

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.owner._width, 0

        def get_seq_length(self) -> int:
            return self.owner._width - 1

        def get_max_length(self) -> int:
            return -1

    return SlotLayer


class HFStepModel:
    """Per-slot decoding state for a ``PreTrainedModel`` (decoder-only, full attention).

    Args:
        model: the loaded causal LM, in eval mode, on its device and dtype.
        max_batch: the number of slots.
        max_positions: the model's context in tokens (None: unknown, not checked).
    """

    def __init__(self, model: Any, max_batch: int, max_positions: int | None = None) -> None:
        from transformers import Cache, DynamicCache

        self.model = model
        self.max_batch = max_batch
        if max_positions is not None:
            self.max_positions = max_positions
        self._dynamic_cache = DynamicCache
        self._cache_class = Cache
        self.device = next(model.parameters()).device
        embeddings = model.get_input_embeddings()
        # Token ids the embedding has rows for: a larger id is an IndexError on the CPU
        # and a device-side assert (which poisons the process's CUDA context) on a GPU.
        self.vocab: int | None = getattr(embeddings, "num_embeddings", None)
        self._keys: list[torch.Tensor] = []  # per layer [max_batch, heads, capacity, dim]
        self._values: list[torch.Tensor] = []
        self._layers: list[Any] = []  # the model's view of them, one per layer
        self._held = torch.zeros(max_batch, 0, dtype=torch.bool, device=self.device)
        self._start = [0] * max_batch  # first column a slot holds
        self._length = [0] * max_batch  # tokens a slot holds (0: free)
        self._column = 0  # C: where the next step writes, for every row
        # this forward's rows (None: 0.._rows-1 in place), its window start and width
        self._index: torch.Tensor | None = None
        self._rows = 0
        self._lo = 0
        self._width = 0

    # -- the step-model protocol ---------------------------------------------------------

    def prefill(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        """Starts ``slot`` from ``prompt``; returns the logits ``[V]`` of the next token.

        Raises:
            InvalidRequest: a token id the model has no embedding for.
        """
        return self.prefill_many([slot], [prompt])[0]

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
                logits_to_keep=last[:, None] if len(prompts) > 1 else 1,
            )
            layers = [(layer.keys, layer.values) for layer in out.cache.layers]
            self._make_room(longest)
            self._column = max(self._column, longest)
            for row, (slot, n) in enumerate(zip(slots, lengths, strict=True)):
                self._place(slot, layers, row, n)
            kept = out.logits
            if kept.shape[1] == 1:
                picked = kept[:, 0]
            else:  # a model that ignores a per-row logits_to_keep returns every position
                picked = kept[torch.arange(len(prompts), device=self.device), last]
            logits: torch.Tensor = picked.float().cpu()
            return logits

    def step(self, slots: Sequence[int], last_tokens: Sequence[int]) -> torch.Tensor:
        """Appends ``last_tokens[i]`` to ``slots[i]`` for all rows in one forward."""
        slots = list(slots)
        if not slots:
            return torch.empty(0, 0)
        missing = [s for s in slots if not 0 <= s < self.max_batch or not self._length[s]]
        if missing:
            raise ValueError(f"step on slot(s) {missing} that were not prefilled")
        with torch.inference_mode():
            self._make_room(0)
            column = self._column
            rows = max(slots) + 1
            dense = 2 * len(slots) >= rows
            if dense:  # rows 0..rows-1 in place; the ones not stepping get a dummy token
                live = [s for s in range(rows) if self._length[s]]
                tokens = [0] * rows
                positions = [self._length[s] for s in range(rows)]
                for slot, token in zip(slots, last_tokens, strict=True):
                    tokens[slot] = token
                self._index = None
            else:  # few rows step: gather their window
                live, tokens = slots, list(last_tokens)
                positions = [self._length[s] for s in slots]
                self._index = torch.tensor(slots, device=self.device)
            lo = min(self._start[s] for s in live)
            self._rows, self._lo, self._width = rows, lo, column + 1 - lo
            held = self._held[:rows] if dense else self._held[self._index]
            mask = held[:, lo : column + 1].clone()
            mask[:, -1] = True  # every row sees its own new token (no row is all masked)
            where = torch.tensor(slots, device=self.device)
            try:
                out = self.model(
                    input_ids=torch.tensor(tokens, device=self.device)[:, None],
                    attention_mask=mask,
                    position_ids=torch.tensor(positions, device=self.device)[:, None],
                    cache=self._cache_class(layers=self._layers),
                    use_cache=True,
                )
            finally:
                self._index = None
            self._held[where, column] = True
            for slot in slots:
                self._length[slot] += 1
            self._column = column + 1
            logits = out.logits[:, -1]
            picked = logits[where] if dense else logits
            result: torch.Tensor = picked.float().cpu()
            return result

    def free(self, slot: int) -> None:
        """Releases ``slot``'s cache (a no-op for a free slot)."""
        if 0 <= slot < self.max_batch and self._length[slot]:
            self._length[slot] = 0
            with torch.inference_mode():  # the mask is an inference tensor
                self._held[slot] = False
            if not any(self._length):
                self._column = 0  # nothing held: start the columns over

    def close(self) -> None:
        """Drops every cache."""
        self._keys, self._values, self._layers = [], [], []
        self._held = self._held[:, :0]
        self._length = [0] * self.max_batch
        self._column = 0

    def cached_slots(self) -> list[int]:
        """The slots holding a cache now."""
        return [s for s, n in enumerate(self._length) if n]

    # -- the cache -----------------------------------------------------------------------

    def _write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer of a step: the new column written, the window to attend over."""
        k_all, v_all = self._keys[layer], self._values[layer]
        column, window = self._column, slice(self._lo, self._column + 1)
        index = self._index
        if index is None:
            k_all[: self._rows, :, column] = keys[:, :, 0]
            v_all[: self._rows, :, column] = values[:, :, 0]
            return k_all[: self._rows, :, window], v_all[: self._rows, :, window]
        k_all[index, :, column] = keys[:, :, 0]
        v_all[index, :, column] = values[:, :, 0]
        return (
            k_all[:, :, window].index_select(0, index),
            v_all[:, :, window].index_select(0, index),
        )

    def _place(self, slot: int, layers: KV, row: int, n: int) -> None:
        """Row ``row`` of a prefill's cache (its first ``n`` columns) into ``slot``, ending at C."""
        if not self._keys:  # first use: one zeroed buffer per layer, like the prefill's
            capacity = self._held.shape[1]
            for k, v in layers:
                self._keys.append(k.new_zeros((self.max_batch, k.shape[1], capacity, k.shape[3])))
                self._values.append(v.new_zeros((self.max_batch, v.shape[1], capacity, v.shape[3])))
            self._layers = [_layer_class()(self, i) for i in range(len(layers))]
        begin, end = self._column - n, self._column
        for (k, v), k_all, v_all in zip(layers, self._keys, self._values, strict=True):
            k_all[slot, :, begin:end] = k[row, :, :n]
            v_all[slot, :, begin:end] = v[row, :, :n]
        self._held[slot, begin:end] = True
        self._start[slot], self._length[slot] = begin, n

    def _make_room(self, n: int) -> None:
        """Room for a step after C moves to at least ``n``: shift every row's columns left
        when the capacity is reached, and double the capacity if that is not enough."""
        capacity = self._held.shape[1]
        if max(self._column, n) + 1 <= capacity:
            return
        live = self.cached_slots()
        lo = min((self._start[s] for s in live), default=self._column)
        if lo > 0:
            keep = slice(lo, self._column)
            for tensors in (self._keys, self._values):
                for t in tensors:
                    t[:, :, : self._column - lo] = t[:, :, keep].clone()
            self._held[:, : self._column - lo] = self._held[:, keep].clone()
            self._held[:, self._column - lo :] = False
            for s in live:
                self._start[s] -= lo
            self._column -= lo
        need = max(self._column, n) + 1
        if need <= capacity:
            return
        while capacity < need:
            capacity = max(_MIN_CAPACITY, 2 * capacity)
        self._keys = [_widen(t, capacity) for t in self._keys]
        self._values = [_widen(t, capacity) for t in self._values]
        self._held = _widen(self._held, capacity)

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


def _widen(t: torch.Tensor, columns: int) -> torch.Tensor:
    """``t`` with its column dimension (2 for a cache, 1 for the mask) grown to ``columns``."""
    dim = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[dim] = columns
    wider = t.new_zeros(shape)
    wider.narrow(dim, 0, t.shape[dim]).copy_(t)
    return wider
