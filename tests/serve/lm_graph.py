"""A deterministic text-generation graph for the serve tests: a ``generate`` node over a
toy step model that spells the alphabet.

After a letter the likeliest next byte is the following letter (``a`` -> ``b``), after
``z`` it is ``\\n``, the end-of-sequence token; after ``#`` it is ``é`` again and again
(two byte tokens each); anything else leads to ``a``. Greedy
(``temperature: 0``) output is therefore predictable: ``"w"`` continues ``"xyz"`` and
stops. With sampling, other bytes are likely too, so outputs differ from seed to seed
but not between runs of one seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import dataflow as df

__all__ = ["CHAT_TEMPLATE", "build"]

EOS = ord("\n")
ACCENT = {ord("#"): 0xC3, 0xC3: 0xA9, 0xA9: 0xC3}  # after "#": "éééé..."
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
)


class Alphabet:
    """The step model (``df.StepModel``): no state beyond each slot's last token."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch

    @staticmethod
    def _logits(last: int) -> torch.Tensor:
        row = torch.zeros(256)
        if last in ACCENT:  # "é" is two bytes, two tokens: c3 a9
            row[ACCENT[last]] = 9.0
        elif ord("a") <= last < ord("z"):
            row[last + 1] = 6.0
        elif last == ord("z"):
            row[EOS] = 6.0
        else:
            row[ord("a")] = 6.0
        row[ord(" ")] = 2.0
        return row

    def prefill(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        return self._logits(prompt[-1])

    def step(self, slots: Sequence[int], last_tokens: Sequence[int]) -> torch.Tensor:
        return torch.stack([self._logits(t) for t in last_tokens])

    def free(self, slot: int) -> None:
        pass


def build(chat: bool = True, max_new_tokens: int = 8) -> df.Graph:
    """The graph ``alpha``: a str prompt (UTF-8 bytes) or chat messages -> text chunks."""
    generate = df.generate(
        Alphabet,
        name="alpha",
        max_batch=8,
        max_new_tokens=max_new_tokens,
        max_new_tokens_limit=64,
        temperature=1.0,
        eos=EOS,
        decode="bytes",
        chat_template=CHAT_TEMPLATE if chat else None,
    )
    return df.Graph("alpha", generate)
