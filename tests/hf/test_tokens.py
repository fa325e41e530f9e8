"""Token id -> bytes tables: exact for byte-level BPE and SentencePiece-style tokenizers."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from dataflow.hf import token_bytes_table

from ._checkpoints import TEXT, train_tokenizer

SAMPLE = "def main(argv):\n    café = 'naïve ✓ 日本語'  # Grüße\n\treturn  x\n"


def sentencepiece_like() -> Any:
    """A Llama-2 style tokenizer: Metaspace ("▁" = space), byte fallback <0xNN>, a decoder
    that strips the first leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in sorted(set("▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ()':#=\n\t_")):
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", "d"), ("▁d", "e"), ("▁de", "f"), ("▁", "r"), ("e", "t"), ("r", "e")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_byte_level_tokens_keep_their_leading_spaces_and_bytes() -> None:
    tok = train_tokenizer()
    table = token_bytes_table(tok)
    assert len(table) == len(tok)
    for text in [*TEXT, SAMPLE]:
        ids = tok(text)["input_ids"]
        assert b"".join(table[i] for i in ids).decode("utf-8") == text
    spaced = [i for i in range(len(tok)) if tok.convert_ids_to_tokens(i).startswith("Ġ")]
    assert spaced and all(table[i].startswith(b" ") for i in spaced)
    for special in tok.all_special_ids:
        assert table[special] == b""


def test_vocab_size_pads_the_table() -> None:
    tok = train_tokenizer()
    assert token_bytes_table(tok, len(tok) + 7)[-7:] == [b""] * 7


@pytest.mark.parametrize("make", [train_tokenizer, sentencepiece_like])
def test_generated_text_continues_the_prompt_exactly(make: Any) -> None:
    """What the runtime emits after a prompt (its tokens' bytes, decoded incrementally)
    is what decoding the whole sequence adds to the prompt's text: no lost leading
    space, no split character."""
    tok = make()
    table = token_bytes_table(tok)
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    if make is sentencepiece_like:
        assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # fallback
        assert any(tok.convert_ids_to_tokens(i).startswith("▁") for i in ids[1:])
    full = tok.decode(ids)
    checked = 0
    for k in range(1, len(ids)):
        head = tok.decode(ids[:k])
        if "\ufffd" in head:
            continue  # the prompt itself ends inside a character
        generated = b"".join(table[i] for i in ids[k:]).decode("utf-8")
        assert head + generated == full, k
        checked += 1
    assert checked > len(ids) // 2


def test_sentencepiece_specials_are_skipped() -> None:
    tok = sentencepiece_like()
    table = token_bytes_table(tok)
    assert table[tok.convert_tokens_to_ids("</s>")] == b""
    assert table[tok.convert_tokens_to_ids("<0x41>")] == b"A"
    assert table[tok.convert_tokens_to_ids("▁def")] == b" def"
