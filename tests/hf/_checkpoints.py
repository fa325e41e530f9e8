"""Tiny Hugging Face checkpoints built offline: random weights, a tokenizer trained on the spot."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEXT = [
    "def main(argv):\n    return parse(argv) + 1\n",
    "class Reader:\n    def read(self, size=-1):\n        return self.buffer[:size]\n",
    "import os\nprint(os.path.join('a', 'b'))  # naïve café, ünïcödé ✓ 日本語\n",
    "for i in range(10):\n    total += i * i\n",
    "The quick brown fox jumps over the lazy dog. Ça va? Grüße!",
]


@functools.lru_cache(maxsize=4)
def train_tokenizer(vocab: int = 400) -> Any:
    """A byte-level BPE with chat special tokens, trained on ``TEXT``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[0],
        pad_token=SPECIALS[0],
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(kind: str, root: Path, *, seed: int = 0, init: float = 0.2) -> Path:
    """Saves a random-weight ``kind`` ("llama" or "gpt2") checkpoint with its tokenizer."""
    from transformers import (
        GenerationConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tok = train_tokenizer()
    eos = tok.convert_tokens_to_ids(SPECIALS[0])
    end = tok.convert_tokens_to_ids("<|end|>")
    torch.manual_seed(seed)
    model: Any
    if kind == "llama":
        config: Any = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=96,
            initializer_range=init,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=96,
            initializer_range=init,
            bos_token_id=eos,
            eos_token_id=eos,
        )
        model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos, end], pad_token_id=eos, bos_token_id=eos
    )
    path = root / kind
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_encoder(root: Path, *, seed: int = 0) -> Path:
    """Saves a random-weight BERT encoder with a WordPiece tokenizer trained on ``TEXT``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        TEXT * 20, trainer=trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    path = root / "bert"
    BertModel(config).eval().save_pretrained(path)
    fast.save_pretrained(path)
    return path
