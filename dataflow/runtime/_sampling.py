"""Sampling and per-sequence output state for ``generate`` nodes.

:class:`Decoding` is one sequence's state: its sampling settings and seeded generator,
penalty counts, UTF-8 decoder, stop matching, token counts. :func:`sample` picks one token
per row of a batch of logits, vectorised across the rows; it runs in the replica's thread.

The order on each row's logits: penalties (presence/frequency, OpenAI-style: minus
``presence * (count > 0) + frequency * count`` per token id, counting the tokens this
sequence generated so far), then greedy argmax for temperature 0, else divide by the
temperature, keep the ``top_k`` largest, keep the smallest set of most likely tokens whose
probability reaches ``top_p`` (nucleus), and draw with the Gumbel-max trick. Logprobs are
``log_softmax`` of the model's logits before all of that (the model's distribution, as
OpenAI reports it).
"""

from __future__ import annotations

import codecs
import secrets
from collections.abc import Sequence
from typing import Any

import torch

from ..graph._generation import Chunk, GenerationConfig, SamplingParams, TokenLogprob

__all__ = ["Decoding", "sample"]

_BYTES = [bytes((i,)) for i in range(256)]

# (chosen logprob, top ids, top logprobs) of the last sampled token, set in the thread.
_Logprob = tuple[float, list[int], list[float]]


class Decoding:
    """One sequence's sampling and output state.

    Shared by the batched runtime and the unbatched reference (``generate_one``), so both
    turn the same logits into the same outputs.
    """

    __slots__ = (
        "count",
        "counts",
        "decoder",
        "eos",
        "frequency",
        "generator",
        "held",
        "ids",
        "index",
        "last_logprob",
        "logprobs",
        "lps",
        "max_new_tokens",
        "penalized",
        "presence",
        "prompt_tokens",
        "stops",
        "temperature",
        "token_bytes",
        "top_k",
        "top_p",
    )

    def __init__(
        self,
        config: GenerationConfig,
        params: SamplingParams,
        index: int = 0,
        prompt_tokens: int = 0,
    ) -> None:
        self.temperature = params.temperature
        self.top_k = params.top_k
        self.top_p = params.top_p
        self.presence = params.presence_penalty
        self.frequency = params.frequency_penalty
        self.penalized = bool(self.presence or self.frequency)
        self.counts: torch.Tensor | None = None  # tokens generated so far, per id
        self.logprobs = params.logprobs
        self.last_logprob: _Logprob | None = None
        self.max_new_tokens = params.max_new_tokens
        self.eos = frozenset(config.eos)
        self.stops = params.stop
        self.index = index
        self.prompt_tokens = prompt_tokens
        self.count = 0
        self.ids: list[int] = []  # tokens not yet reported in a Chunk
        self.lps: list[TokenLogprob] = []
        self.held = ""  # decoded text withheld because it may begin a stop sequence
        # A seeded request gets its own generator: its draws depend only on its seed and
        # steps, so its text does not depend on which other requests share the batch.
        # Unseeded rows share one generator and are drawn together in one call.
        self.generator: torch.Generator | None = None
        if params.temperature > 0 and params.seed is not None:
            self.generator = torch.Generator().manual_seed((params.seed + index) % 2**63)
        decode = config.decode
        self.decoder: codecs.IncrementalDecoder | None = None
        self.token_bytes: Any = None
        if decode is not None:
            self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self.token_bytes = _byte_of if decode == "bytes" else decode

    def advance(self, token: int) -> tuple[Any, str | None]:
        """Take the next sampled token: ``(output or None, finish_reason or None)``.

        The output is the token itself, or with a decoder the text completed by it (never
        a partial UTF-8 character, never text that might start a stop sequence). The
        finish reason is ``"stop"`` (end token, stop string) or ``"length"``.
        """
        self.count += 1
        last = "length" if self.count >= self.max_new_tokens else None
        decoder = self.decoder
        if token in self.eos:
            return (self._flush() if decoder is not None else None), "stop"
        if decoder is None:
            return token, last
        text = self.held + decoder.decode(self.token_bytes(token))
        stops = self.stops
        if stops:
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                self.held = ""
                return text[:cut] or None, "stop"
        if last:
            self.held = ""
            return (text + decoder.decode(b"", final=True)) or None, last
        keep = _partial_stop(text, stops) if stops else 0
        if keep:
            self.held = text[-keep:]
            text = text[:-keep]
        else:
            self.held = ""
        return text or None, None

    def advance_chunk(self, token: int) -> tuple[Chunk | None, str | None]:
        """:meth:`advance` for ``details=True``: a :class:`Chunk` covering the tokens
        since the last one, when there is new text or the sequence ended."""
        out, finish = self.advance(token)
        if token not in self.eos:
            self.ids.append(token)
            if self.logprobs is not None:
                self.lps.append(self._token_logprob(token))
        if out is None and finish is None:
            return None, None
        chunk = Chunk(
            text=out if isinstance(out, str) else "",
            index=self.index,
            token_ids=tuple(self.ids),
            logprobs=None if self.logprobs is None else tuple(self.lps),
            finish_reason=finish,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.count,
        )
        self.ids = []
        self.lps = []
        return chunk, finish

    def _token_logprob(self, token: int) -> TokenLogprob:
        info = self.last_logprob
        if info is None:  # cannot happen: sample() sets it for rows asking for logprobs
            return TokenLogprob(self.text_of(token), token, float("nan"))
        chosen, top_ids, top_lps = info
        top = tuple((self.text_of(i), i, lp) for i, lp in zip(top_ids, top_lps, strict=True))
        return TokenLogprob(self.text_of(token), token, chosen, top)

    def text_of(self, token: int) -> str:
        """One token's own text (bytes decoded with replacement; "" without a decoder)."""
        if self.token_bytes is None:
            return ""
        try:
            data = self.token_bytes(token)
        except Exception:
            return ""
        return bytes(data).decode("utf-8", errors="replace")

    def _flush(self) -> str | None:
        assert self.decoder is not None
        text = self.held + self.decoder.decode(b"", final=True)
        self.held = ""
        return text or None


def _byte_of(token: int) -> bytes:
    if not 0 <= token < 256:
        raise ValueError(f"decode='bytes' got token {token}, not a byte value")
    return _BYTES[token]


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that a stop sequence starts with."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


# The randomness of rows without a seed: one generator, one draw for all of them per tick.
_UNSEEDED = torch.Generator().manual_seed(secrets.randbits(63))


def sample(logits: torch.Tensor, rows: Sequence[Decoding]) -> list[int]:
    """One token per row of ``logits`` ``[N, V]``, each by its row's settings.

    Temperature 0 is greedy. Otherwise the Gumbel-max trick: ``argmax(logits / T + G)``
    with ``G = -log(E)``, ``E ~ Exp(1)``, restricted to the ``top_k`` largest logits and
    the ``top_p`` nucleus. A seeded row draws ``E`` from its own generator, and every
    operation is per row (or exact), so its token does not depend on the other rows:
    batched sampling equals unbatched sampling. The rows without a seed draw ``E``
    together in one vectorised call from a shared generator. Rows asking for logprobs get
    ``last_logprob`` set; penalised rows count the token picked. Logits on another
    device are sampled on the CPU (where the seeded generators live).
    """
    logits = raw = logits.detach().float().cpu()  # no-ops for CPU logits
    hot: list[int] = []
    extra = False  # any row with logprobs or penalties (the rare, slower path)
    for i, row in enumerate(rows):
        if row.temperature > 0:
            hot.append(i)
        if row.penalized or row.logprobs is not None:
            extra = True
    if extra:
        penal = [i for i, row in enumerate(rows) if row.counts is not None]
        if penal:
            logits = _penalise(logits, rows, penal)
    picked = logits.argmax(dim=-1)
    if hot:
        _sample_hot(logits, rows, hot, picked)
    tokens: list[int] = picked.tolist()
    if extra:
        wants_lp = [i for i, row in enumerate(rows) if row.logprobs is not None]
        if wants_lp:
            _logprobs(raw, rows, wants_lp, tokens)
        for i, row in enumerate(rows):
            if row.penalized:
                if row.counts is None:
                    row.counts = torch.zeros(logits.shape[-1])
                row.counts[tokens[i]] += 1
    return tokens


def _penalise(logits: torch.Tensor, rows: Sequence[Decoding], penal: list[int]) -> torch.Tensor:
    """``logits - presence * (count > 0) - frequency * count`` on the penalised rows."""
    index = torch.tensor(penal)
    counts = torch.stack([rows[i].counts for i in penal])  # type: ignore[misc]
    pres = torch.tensor([rows[i].presence for i in penal])[:, None]
    freq = torch.tensor([rows[i].frequency for i in penal])[:, None]
    out = logits.clone()
    out[index] = logits.index_select(0, index) - pres * (counts > 0) - freq * counts
    return out


def _sample_hot(
    logits: torch.Tensor, rows: Sequence[Decoding], hot: list[int], picked: torch.Tensor
) -> None:
    n, vocab = len(hot), logits.shape[-1]
    every = n == len(rows)
    index = None if every else torch.tensor(hot)
    x = logits if index is None else logits.index_select(0, index)
    temps = torch.tensor([rows[i].temperature for i in hot], dtype=torch.float32)
    x = x / temps[:, None]
    ks = [rows[i].top_k for i in hot]
    limited = [0 < k < vocab for k in ks]
    if any(limited):
        kmax = max(k for k, lim in zip(ks, limited, strict=True) if lim)
        top = torch.topk(x, kmax, dim=-1).values
        kth = top.gather(
            1, torch.tensor([[k - 1 if lim else 0] for k, lim in zip(ks, limited, strict=True)])
        )
        kth = kth.masked_fill(~torch.tensor(limited)[:, None], -torch.inf)
        x = x.masked_fill(x < kth, -torch.inf)
    nucleus = [j for j, i in enumerate(hot) if rows[i].top_p < 1.0]
    if nucleus:
        x = _top_p(x, nucleus, [rows[hot[j]].top_p for j in nucleus], every=len(nucleus) == n)
    # E = -log(U), U ~ Uniform[0, 1): ``uniform_`` is several times faster than
    # ``exponential_`` on the CPU. U = 0 gives E = inf, a token never picked.
    noise = torch.empty(n, vocab)
    unseeded: list[int] = []
    for j, i in enumerate(hot):
        generator = rows[i].generator
        if generator is None:
            unseeded.append(j)
            continue
        noise[j].uniform_(generator=generator)  # per row: the same draw batched or not
    if len(unseeded) == n:
        noise.uniform_(generator=_UNSEEDED)
    elif unseeded:
        noise[torch.tensor(unseeded)] = torch.rand(len(unseeded), vocab, generator=_UNSEEDED)
    noise.log_().neg_().log_()  # log E
    choice = (x - noise).argmax(dim=-1)
    if index is None:
        picked.copy_(choice)
    else:
        picked[index] = choice


def _top_p(x: torch.Tensor, which: list[int], ps: list[float], *, every: bool) -> torch.Tensor:
    """Rows ``which`` of ``x`` keep only their nucleus: the most likely tokens, best
    first, up to and including the one whose cumulative probability reaches ``p``."""
    sub = x if every else x[torch.tensor(which)]
    ordered, order = sub.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the better tokens
    drop = before >= torch.tensor(ps)[:, None]
    drop[:, 0] = False  # the best token always stays
    ordered = ordered.masked_fill(drop, -torch.inf)
    kept = torch.empty_like(sub).scatter_(1, order, ordered)
    if every:
        return kept
    out = x.clone()
    out[torch.tensor(which)] = kept
    return out


def _logprobs(
    raw: torch.Tensor, rows: Sequence[Decoding], which: list[int], tokens: list[int]
) -> None:
    index = torch.tensor(which)
    lp = torch.log_softmax(raw.index_select(0, index), dim=-1)
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in which]))[:, 0].tolist()
    kmax = max(rows[i].logprobs or 0 for i in which)
    if kmax:
        kmax = min(kmax, lp.shape[-1])
        top_lp, top_ids = lp.topk(kmax, dim=-1)
        top_lps: list[list[float]] = top_lp.tolist()
        top_idl: list[list[int]] = top_ids.tolist()
    for j, i in enumerate(which):
        k = rows[i].logprobs or 0
        if k:
            rows[i].last_logprob = (chosen[j], top_idl[j][:k], top_lps[j][:k])
        else:
            rows[i].last_logprob = (chosen[j], [], [])
