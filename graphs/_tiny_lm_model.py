"""A byte-level GPT-style decoder with RoPE, and a slot KV cache for continuous batching.

Training uses :meth:`TinyLM.forward` on whole windows. Serving uses :class:`SlotCache`: a
fixed block of key/value memory with one row per *slot*, so sequences can join and leave a
running batch between steps without reallocating or copying anyone else's cache::

    model = load_tiny_lm("graphs/weights/tiny_lm.safetensors")
    cache = model.new_cache(max_batch=32)
    slot = cache.acquire()
    logits = cache.prefill(slot, list(b"def main("))       # [256]
    logits = cache.prefill_many([a, b], [prompt_a, prompt_b])  # [2, 256], one forward
    logits = cache.step([slot, other], [next_a, next_b])   # [2, 256], one batched forward
    cache.free(slot)

Positions are RoPE-rotated by each slot's own length, so slots of different lengths share a
step; attention is masked per slot to its own filled prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from graphs._slots import SlotAllocator
from graphs._weights import load_model, save_weights

__all__ = ["KIND", "SlotCache", "TinyLM", "TinyLMConfig", "load_tiny_lm", "save_tiny_lm"]

KIND = "tiny_lm"


@dataclass(frozen=True)
class TinyLMConfig:
    """The shape of a :class:`TinyLM`.

    Attributes:
        vocab_size: 256, one token per byte.
        d_model: width of the residual stream.
        n_layers: number of transformer blocks.
        n_heads: attention heads per block; ``d_model // n_heads`` must be even for RoPE.
        context: the longest sequence attended over (training window and cache length).
        mlp_ratio: hidden width of the MLP as a multiple of ``d_model``.
        rope_base: RoPE frequency base.
        norm_eps: LayerNorm epsilon.
    """

    vocab_size: int = 256
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 4
    context: int = 128
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError("d_model / n_heads must be an even integer (RoPE rotates pairs)")
        if self.context < 2:
            raise ValueError("context must be at least 2 (the cache slides by context // 2)")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads


def _rope_tables(config: TinyLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    half = config.head_dim // 2
    inv_freq = config.rope_base ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(config.context, dtype=torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Casting the tables to x's dtype keeps q/k in bf16 under autocast, so attention runs in
    # one precision instead of silently promoting to float32.
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.ln1 = nn.LayerNorm(d, eps=config.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d, eps=config.norm_eps)
        self.fc = nn.Linear(d, config.mlp_ratio * d, bias=False)
        self.out = nn.Linear(config.mlp_ratio * d, d, bias=False)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Computes RoPE-rotated queries and keys, and values, each ``[B, H, T, head_dim]``."""
        batch, length, _ = x.shape
        qkv: torch.Tensor = self.qkv(self.ln1(x))
        q, k, v = qkv.view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Adds the attention output ``[B, H, T, head_dim]`` and the MLP to the residual."""
        batch, _, length, _ = attended.shape
        merged = attended.transpose(1, 2).reshape(batch, length, -1)
        x = x + self.proj(merged)
        hidden = F.gelu(self.fc(self.ln2(x)))
        result: torch.Tensor = x + self.out(hidden)
        return result

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs causal self-attention over the whole input.

        Returns:
            The new residual stream, and this block's keys and values (for prefill).
        """
        q, k, v = self.project(x, cos, sin)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.finish(x, attended), k, v


class TinyLM(nn.Module):
    """The byte-level decoder. The output head shares the embedding matrix (tied weights)."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        cos, sin = _rope_tables(config)
        # Not persistent: derived from the config, so they stay out of the weights file.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2's scheme: small normal init, with the projections that write into the
        # residual stream scaled down by depth so the stream's variance stays ~constant.
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            std = residual_std if name.endswith(("proj.weight", "out.weight")) else 0.02
            nn.init.normal_(param, mean=0.0, std=std)

    def layers(self) -> list[Block]:
        """The blocks, typed (``nn.ModuleList`` iterates as plain ``nn.Module``)."""
        return [cast(Block, block) for block in self.blocks]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Maps the residual stream ``[..., d_model]`` to byte logits ``[..., 256]``."""
        return F.linear(self.norm(hidden), self.embed.weight)

    def forward_with_kv(
        self, ids: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Runs the full causal forward and also returns every block's keys and values.

        Args:
            ids: LongTensor ``[B, T]`` with ``T <= context``; positions are ``0 .. T-1``.

        Returns:
            Logits ``[B, T, 256]`` and per block ``(keys, values)``, each ``[B, H, T, hd]``.
        """
        length = ids.shape[1]
        if length > self.config.context:
            raise ValueError(f"sequence of {length} exceeds context {self.config.context}")
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        x: torch.Tensor = self.embed(ids)
        kv = []
        for block in self.layers():
            x, k, v = block(x, cos, sin)
            kv.append((k, v))
        return self.logits(x), kv

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Returns next-byte logits ``[B, T, 256]`` for ids ``[B, T]`` (``T <= context``)."""
        return self.forward_with_kv(ids)[0]

    def new_cache(self, max_batch: int) -> SlotCache:
        """Allocates a :class:`SlotCache` for this model on its device and dtype."""
        return SlotCache(self, max_batch)


class SlotCache(SlotAllocator):
    """Preallocated per-slot KV cache: ``max_batch`` slots x ``context`` positions per layer.

    Each slot holds one sequence. ``prefill`` (re)starts a slot from a prompt
    (``prefill_many`` several slots in one forward; full slots that must slide in a
    ``step`` are re-prefilled together the same way); ``step``
    appends one byte to each given slot in a single batched forward and returns the logits
    for the byte after it; ``free`` releases the slot. Not thread-safe: drive one cache from
    one thread.

    Sliding window: a slot holds at most ``context`` positions. When a slot is full and is
    stepped again, it is first re-prefilled from its own last ``context // 2`` bytes (the
    cache remembers each slot's bytes for this), then the new byte is appended at position
    ``context // 2``. The logits are then exactly those of :meth:`TinyLM.forward` over those
    ``context // 2 + 1`` bytes. Halving (rather than dropping one position per step) makes a
    re-prefill happen once per ``context // 2`` steps instead of every step, because RoPE
    positions bake into the cached keys and a one-position shift would invalidate them all.

    Attributes:
        keys: ``[n_layers, max_batch, n_heads, context, head_dim]``.
        values: same shape as ``keys``.
    """

    def __init__(self, model: TinyLM, max_batch: int) -> None:
        super().__init__(max_batch)
        config = model.config
        param = model.embed.weight
        shape = (config.n_layers, max_batch, config.n_heads, config.context, config.head_dim)
        self.model = model
        self.keys = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.values = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self._ids: list[list[int]] = [[] for _ in range(max_batch)]

    @property
    def context(self) -> int:
        """Positions per slot."""
        return self.model.config.context

    def length(self, slot: int) -> int:
        """The number of positions ``slot`` currently holds (0 when free)."""
        return len(self._ids[self._check(slot)])

    def free(self, slot: int) -> None:
        """Releases ``slot``. Its stale keys stay in memory but are never attended to."""
        self._release(slot)
        self._ids[slot] = []

    def prefill(self, slot: int, ids: Sequence[int]) -> torch.Tensor:
        """Resets ``slot`` to the sequence ``ids`` and returns the next-byte logits.

        Args:
            slot: the slot to fill (marked used if it was free).
            ids: the prompt bytes, at least one; only the last ``context`` are kept.

        Returns:
            Float logits ``[256]`` for the byte following ``ids``.

        Raises:
            ValueError: on an empty prompt, a byte outside 0..255, or a bad slot.
        """
        kept = self._prompt(slot, ids, self.context)
        self._used[slot] = True
        return self._prefill(slot, kept)

    def prefill_many(self, slots: Sequence[int], id_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """:meth:`prefill` for several slots at once, in one padded forward pass.

        Equal (within float tolerance) to calling ``prefill(slots[i], id_lists[i])`` for
        every i, but one batched forward instead of one per slot, so a batch of joining
        sequences costs about one step rather than one step each.

        Args:
            slots: distinct slots to fill (marked used if they were free).
            id_lists: one prompt per slot, each at least one byte; only the last
                ``context`` of each are kept.

        Returns:
            Float logits ``[len(slots), 256]``, row i for ``slots[i]``.

        Raises:
            ValueError: on mismatched lengths, repeated slots, an empty prompt, a byte
                outside 0..255, or a bad slot. Nothing is filled then.
        """
        kept = self._prompts(slots, id_lists, self.context)
        for slot in slots:
            self._used[slot] = True
        return self._prefill_many(list(slots), kept)

    def _prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        return self._prefill_many([slot], [ids])[0]

    def _prefill_many(self, slots: list[int], id_lists: list[list[int]]) -> torch.Tensor:
        device = self.keys.device
        if len(slots) <= 1:
            if not slots:
                return torch.empty(0, self.model.config.vocab_size, device=device)
            slot, ids = slots[0], id_lists[0]
            with torch.no_grad():
                logits, kv = self.model.forward_with_kv(torch.tensor([ids], device=device))
                for layer, (k, v) in enumerate(kv):
                    self.keys[layer, slot, :, : len(ids)] = k[0]
                    self.values[layer, slot, :, : len(ids)] = v[0]
            self._ids[slot] = ids
            return logits[0, -1:]
        # The prompts are packed into one row of N tokens for everything but attention
        # (the projections and MLP, most of the work, see no padding); attention runs on
        # a right-padded [B, H, span, hd] copy with the causal mask, under which a real
        # position never attends to a later (padded) one, so each prompt's positions are
        # exactly those of its own forward pass.
        lengths = [len(ids) for ids in id_lists]
        span = max(lengths)
        row_list = [row for row, n in enumerate(lengths) for _ in range(n)]
        pos_list = [pos for n in lengths for pos in range(n)]
        flat = [i for ids in id_lists for i in ids]
        batch = len(slots)
        model = self.model
        config = model.config
        with torch.no_grad():
            rows = torch.tensor(row_list, device=device)
            pos = torch.tensor(pos_list, device=device)
            slot_of = torch.tensor(slots, device=device)[rows]
            cos, sin = model.rope_cos[pos], model.rope_sin[pos]
            x: torch.Tensor = model.embed(torch.tensor([flat], device=device))  # [1, N, d]
            pad_shape = (batch, config.n_heads, span, config.head_dim)
            for layer, block in enumerate(model.layers()):
                q, k, v = block.project(x, cos, sin)  # each [1, H, N, hd]
                q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # each [N, H, hd]
                self.keys[layer][slot_of, :, pos] = k
                self.values[layer][slot_of, :, pos] = v
                padded = []
                for t in (q, k, v):
                    p = t.new_zeros(pad_shape)
                    p[rows, :, pos] = t
                    padded.append(p)
                attended = F.scaled_dot_product_attention(
                    padded[0], padded[1], padded[2], is_causal=True
                )
                x = block.finish(x, attended[rows, :, pos].transpose(0, 1)[None])
            ends = torch.tensor(lengths, device=device).cumsum(0) - 1
            out = model.logits(x[0, ends])
        for slot, ids in zip(slots, id_lists, strict=True):
            self._ids[slot] = ids
        return out

    def step(self, slots: Sequence[int], last_ids: Sequence[int]) -> torch.Tensor:
        """Appends ``last_ids[i]`` to ``slots[i]`` for every i, in one batched forward.

        Each slot's new byte is placed at RoPE position = that slot's length and attends to
        that slot's own positions only. A full slot first slides (see the class docstring).

        Args:
            slots: distinct, prefilled slots, in any order.
            last_ids: one byte per slot (typically the one just sampled from its logits).

        Returns:
            Float logits ``[len(slots), 256]``, row i for ``slots[i]``.

        Raises:
            ValueError: on mismatched lengths, repeated or unfilled slots, or bad bytes.
        """
        new_ids = self._step_ids(slots, last_ids)
        full = [slot for slot in slots if self.length(slot) == self.context]
        if full:
            half = self.context // 2
            self._prefill_many(full, [self._ids[slot][-half:] for slot in full])
        if not slots:
            return torch.empty(0, self.model.config.vocab_size, device=self.keys.device)

        device = self.keys.device
        positions_list = [self.length(slot) for slot in slots]
        span = max(positions_list) + 1
        index = torch.tensor(list(slots), device=device)
        positions = torch.tensor(positions_list, device=device)
        # Row i attends to its own filled prefix plus the position being written now.
        mask = (torch.arange(span, device=device)[None, :] <= positions[:, None])[:, None, None]
        cos = self.model.rope_cos[positions][:, None, None, :]
        sin = self.model.rope_sin[positions][:, None, None, :]
        with torch.no_grad():
            x: torch.Tensor = self.model.embed(torch.tensor(new_ids, device=device)[:, None])
            for layer, block in enumerate(self.model.layers()):
                q, k, v = block.project(x, cos, sin)
                layer_keys, layer_values = self.keys[layer], self.values[layer]
                layer_keys[index, :, positions] = k[:, :, 0]
                layer_values[index, :, positions] = v[:, :, 0]
                attended = F.scaled_dot_product_attention(
                    q, layer_keys[index, :, :span], layer_values[index, :, :span], attn_mask=mask
                )
                x = block.finish(x, attended)
            logits = self.model.logits(x[:, 0])
        for slot, new_id in zip(slots, new_ids, strict=True):
            self._ids[slot].append(new_id)
        return logits


def save_tiny_lm(model: TinyLM, path: str | Path, extra: dict[str, str] | None = None) -> int:
    """Saves ``model`` with :func:`graphs._weights.save_weights`; returns the file size."""
    return save_weights(model, path, kind=KIND, config=asdict(model.config), extra=extra)


def load_tiny_lm(path: str | Path, device: str | torch.device = "cpu") -> TinyLM:
    """Rebuilds a :class:`TinyLM` from a weights file alone, in float32 eval mode.

    Args:
        path: a file written by :func:`save_tiny_lm`.
        device: where to place the model.

    Returns:
        The model, ready for ``new_cache``.

    Raises:
        ValueError: when the file is not a tiny-LM weights file.
    """
    return load_model(path, KIND, lambda config: TinyLM(TinyLMConfig(**config)), device)
