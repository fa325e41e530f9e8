"""Trains the small Llama-architecture checkpoint served by ``graphs/hf_lm.py``.

Usage::

    python examples/train_hf_lm.py --minutes 8 --out /tmp/hf_lm
    python examples/train_hf_lm.py --minutes 8 --out graphs/weights/hf_lm   # the shipped one

A byte-level BPE tokenizer (``tokenizers``) is trained on the Python standard library, then a
``LlamaForCausalLM`` on the same corpus, files separated by ``<|endoftext|>``; a share of the
windows are chat turns (``write a function named X`` -> the function's source) so the chat
template means something. The output directory holds a Hugging Face checkpoint (config,
fp16 ``model.safetensors``, tokenizer, chat template, generation config) and ``training.json``
(the loss curve and held-out bits/byte). The default ``--out`` is a scratch directory: the
shipped files are replaced only when asked.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dataflow.hf._tokens import token_bytes_table
from graphs._corpus import is_validation_file, load_corpus, stdlib_files

EOS = "<|endoftext|>"
END = "<|end|>"
SPECIALS = [EOS, "<|system|>", "<|user|>", "<|assistant|>", END]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="training-step budget")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--out", default="build/hf_lm", help="checkpoint directory")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128, help="training window, tokens")
    parser.add_argument("--max-positions", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--chat-share", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-files", type=int, default=None, help="for quick trials")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument(
        "--evaluate",
        metavar="DIR",
        default=None,
        help="only measure the checkpoint in DIR on the whole held-out split (no training)",
    )
    return parser.parse_args(argv)


def corpus_files(
    max_files: int | None, names: list[str] | None = None
) -> tuple[list[str], list[str], str]:
    """Reads the stdlib split by file: (train texts, held-out texts, description); the
    held-out files' relative paths are appended to ``names`` when given."""
    corpus = load_corpus(max_files=max_files)
    root = Path(corpus.root)
    files = stdlib_files(root)[:max_files] if max_files else stdlib_files(root)
    train: list[str] = []
    val: list[str] = []
    for rel in files:
        text = (root / rel).read_text("utf-8", errors="replace")
        (val if is_validation_file(rel) else train).append(text)
        if names is not None and is_validation_file(rel):
            names.append(rel.as_posix())
    return train, val, corpus.describe()


def evaluate_checkpoint(path: str, context: int, threads: int) -> dict[str, Any]:
    """Held-out bits/byte of a saved checkpoint over the *whole* held-out split, as the byte
    models are measured: non-overlapping windows, each token predicted from 0..context-1
    tokens of its window; also code files only and ``pydoc_data/topics.py`` only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, local_files_only=True
    )
    model.eval()
    names: list[str] = []
    _, val_texts, _ = corpus_files(None, names)
    nbytes = torch.tensor([len(b) for b in token_bytes_table(tok)], dtype=torch.long)
    span = context + 1
    parts = {
        "all": val_texts,
        "code": [t for t, n in zip(val_texts, names, strict=True) if n != "pydoc_data/topics.py"],
        "topics": [t for t, n in zip(val_texts, names, strict=True) if n == "pydoc_data/topics.py"],
    }
    out: dict[str, Any] = {"held_out_files": len(names)}
    for label, texts in parts.items():
        stream = encode_stream(tok, texts)
        count = stream.numel() // span
        result = evaluate(model, stream[: count * span].view(count, span), nbytes)
        out[label] = {k: round(v, 4) for k, v in result.items()} | {"windows": count}
        print(label, json.dumps(out[label]), flush=True)
    return out


def chat_examples(texts: list[str], rng: random.Random) -> list[str]:
    """Chat turns asking for a function by name, answered with its source from the corpus."""
    out = []
    for text in texts:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                source = ast.get_source_segment(text, node)
                if source and len(source) < 1500:
                    ask = rng.choice(["write a function named", "def", "implement"])
                    out.append(
                        f"<|user|>\n{ask} {node.name}{END}\n<|assistant|>\n{source}{END}\n{EOS}"
                    )
    rng.shuffle(out)
    return out


def train_tokenizer(texts: list[str], vocab: int) -> Any:
    """A GPT-2 style byte-level BPE with the chat markers as special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=None
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def encode_stream(tok: Any, texts: list[str]) -> torch.Tensor:
    """Encodes texts into one id stream, each followed by ``<|endoftext|>``."""
    eos = tok.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, batch: int, span: int, gen: torch.Generator) -> torch.Tensor:
    """Random ``[batch, span]`` windows of a token stream."""
    starts = torch.randint(0, stream.numel() - span, (batch,), generator=gen)
    return stream[starts[:, None] + torch.arange(span)[None, :]]


def evaluate(model: Any, data: torch.Tensor, nbytes: torch.Tensor) -> dict[str, float]:
    """Held-out nats/token and bits/byte over fixed non-overlapping windows ``data``."""
    model.eval()
    nats, tokens, byte_count = 0.0, 0, 0
    with torch.no_grad():
        for chunk in torch.split(data, 32):
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            targets = chunk[:, 1:]
            nats += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
            )
            tokens += targets.numel()
            byte_count += int(nbytes[targets].sum())
    model.train()
    return {
        "val_nats_per_token": nats / tokens,
        "val_bits_per_byte": nats / max(byte_count, 1) / math.log(2),
        "val_bytes_per_token": byte_count / tokens,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains and saves the checkpoint; returns the summary written to ``training.json``."""
    args = parse_args(argv)
    if args.evaluate is not None:
        return evaluate_checkpoint(args.evaluate, args.context, args.threads)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    train_texts, val_texts, described = corpus_files(args.max_files)
    tok = train_tokenizer(train_texts, args.vocab)
    chat = chat_examples(train_texts, rng)
    stream = encode_stream(tok, train_texts)
    chat_stream = encode_stream(tok, chat) if chat else stream
    val_stream = encode_stream(tok, val_texts)
    nbytes = torch.tensor([len(b) for b in token_bytes_table(tok)], dtype=torch.long)
    span = args.context + 1
    count = min(256, val_stream.numel() // span)
    val = val_stream[: count * span].view(count, span)
    print(
        f"tokenizer {len(tok)} ids; train {stream.numel()} tokens, chat {len(chat)} turns",
        flush=True,
    )

    eos = int(tok.convert_tokens_to_ids(EOS))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 32 * 32 + 32,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.max_positions,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model: Any = LlamaForCausalLM(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    budget = None if args.minutes is None else args.minutes * 60.0
    curve: list[dict[str, float]] = []
    step, train_s = 0, 0.0
    n_chat = round(args.batch * args.chat_share)
    while True:
        progress = max(
            train_s / budget if budget else 0.0, step / args.steps if args.steps else 0.0
        )
        if progress >= 1.0:
            break
        t0 = time.perf_counter()
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = args.lr * (0.1 + 0.9 * cosine) * min(1.0, (step + 1) / 50)
        batch = windows(stream, args.batch - n_chat, span, gen)
        if n_chat:
            batch = torch.cat([batch, windows(chat_stream, n_chat, span, gen)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        train_s += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == 1:
            point = {
                "step": step,
                "train_s": round(train_s, 1),
                "train_nats_per_token": float(loss.detach()),
            }
            point.update(evaluate(model, val[:64], nbytes))
            curve.append(point)
            print(json.dumps(point), flush=True)

    model = model.half().float()  # report the numbers of the fp16 weights that ship
    final = evaluate(model, val, nbytes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=config.bos_token_id,
        eos_token_id=[tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(END)],
        pad_token_id=config.pad_token_id,
    )
    model.half().save_pretrained(out)
    tok.save_pretrained(out)
    summary: dict[str, Any] = {
        "config": {
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "max_position_embeddings",
            )
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "batch": args.batch,
        "context": args.context,
        "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "val_tokens": int(val.shape[0] * args.context),
        **{k: round(v, 4) for k, v in final.items()},
        "corpus": described,
        "command": shlex.join(
            ["python", "examples/train_hf_lm.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "torch": torch.__version__,
        "curve": curve,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}), flush=True)
    return summary


if __name__ == "__main__":
    main()
