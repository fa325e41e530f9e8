"""Token id -> bytes tables for incremental detokenization.

The generation runtime decodes UTF-8 incrementally from per-token bytes, so a tokenizer is
reduced here to one ``bytes`` value per id. That is exact for the two families that matter:

* byte-level BPE (GPT-2, Llama 3, Qwen): each token's string is the GPT-2 byte alphabet, so
  mapping its characters back through :func:`byte_alphabet` gives the bytes, leading space
  included (``"Ġdef"`` -> ``b" def"``);
* SentencePiece (Llama 2, Mistral): ``"▁"`` is a space and ``<0xNN>`` byte-fallback tokens are
  single bytes. The decoder's "strip the leading space of the first token" rule is applied to
  the first generated token only when the prompt is empty, which the runtime never does
  (a prompt always precedes the output), so the spaces that transformers keeps are kept.

Special tokens (EOS, BOS, chat markers) map to ``b""``: they are skipped, as
``skip_special_tokens=True`` does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["byte_alphabet", "token_bytes_table"]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def byte_alphabet() -> dict[str, int]:
    """Returns GPT-2's printable-character -> byte mapping (the inverse of bytes_to_unicode)."""
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _decoder_types(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return set()
    state = repr(decoder)
    return {name for name in ("ByteLevel", "Metaspace", "ByteFallback", "Replace") if name in state}


def token_bytes_table(tokenizer: Any, vocab_size: int | None = None) -> list[bytes]:
    """Builds the id -> bytes table of a (fast) Hugging Face tokenizer.

    Args:
        tokenizer: a ``PreTrainedTokenizerFast`` (or anything with ``convert_ids_to_tokens``,
            ``all_special_ids`` and ``decode``).
        vocab_size: table length (the model's embedding rows may exceed the tokenizer's
            vocabulary); ids beyond the tokenizer map to ``b""``.

    Returns:
        One ``bytes`` per id; special and unknown ids map to ``b""``.
    """
    size = max(len(tokenizer), vocab_size or 0)
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", ()))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
    kinds = _decoder_types(tokenizer)
    alphabet = byte_alphabet() if "ByteLevel" in kinds else None
    ids = list(range(len(tokenizer)))
    pieces: Sequence[str | None] = tokenizer.convert_ids_to_tokens(ids)
    table: list[bytes] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            table.append(b"")
            continue
        if i in added:  # a non-special added token is written verbatim
            table.append(piece.encode("utf-8"))
        elif alphabet is not None and all(ch in alphabet for ch in piece):
            table.append(bytes(alphabet[ch] for ch in piece))
        elif (match := _BYTE_FALLBACK.match(piece)) and "ByteFallback" in kinds:
            table.append(bytes([int(match.group(1), 16)]))
        elif "Metaspace" in kinds or "Replace" in kinds:
            table.append(piece.replace("\u2581", " ").encode("utf-8"))
        else:
            table.append(tokenizer.decode([i]).encode("utf-8"))
    table.extend(b"" for _ in range(size - len(table)))
    return table
