"""graphs/hf_lm.py: the shipped checkpoint, any checkpoint by path, and its trainer's defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import dataflow as df
from dataflow._cli._load import load_graph
from graphs import hf_lm

from ._checkpoints import build

pytestmark = pytest.mark.anyio


def test_the_shipped_checkpoint_is_complete_and_small() -> None:
    names = {p.name for p in hf_lm.CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert sum(p.stat().st_size for p in hf_lm.CHECKPOINT.iterdir()) <= 15 * 2**20


async def test_the_shipped_model_completes_and_chats() -> None:
    graph = hf_lm.build(max_batch=4)
    async with df.Engine(graph) as engine:
        text = "".join(await engine.run("def main(", max_new_tokens=24, temperature=0))
        again = "".join(await engine.run("def main(", max_new_tokens=24, temperature=0))
        chat = [
            c
            async for c in engine.stream(
                [{"role": "user", "content": "write a function named join"}],
                max_new_tokens=48,
                temperature=0,
                details=True,
            )
        ]
    assert text == again and text.strip()
    assert chat[-1].finish_reason in ("stop", "length")
    assert chat[-1].prompt_tokens > 5
    # Token for token what transformers itself generates from the shipped weights.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_lm.CHECKPOINT, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        hf_lm.CHECKPOINT, dtype=torch.float32, local_files_only=True
    ).eval()
    messages = [{"role": "user", "content": "write a function named join"}]
    for ids, n, got in [
        (tok("def main(")["input_ids"], 24, text),
        (
            tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False),
            48,
            "".join(c.text for c in chat),
        ),
    ]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n
            )
        assert got == tok.decode(out[0, len(ids) :], skip_special_tokens=True)


async def test_serve_option_path_loads_any_checkpoint(tmp_path: Path) -> None:
    path = build("gpt2", tmp_path)
    graph = load_graph("graphs/hf_lm.py", path=str(path), max_batch=2)
    async with df.Engine(graph) as engine:
        out = await engine.run("def", max_new_tokens=4, temperature=0)
    assert isinstance(out, list) and out
    with pytest.raises(df.GraphError, match="missing file"):
        hf_lm.build(path=str(tmp_path))


def test_the_trainer_does_not_overwrite_the_shipped_files_by_default() -> None:
    from examples.train_hf_lm import parse_args

    out = Path(parse_args([]).out).resolve()
    assert out != hf_lm.CHECKPOINT.resolve()
    assert Path(parse_args(["--out", str(hf_lm.CHECKPOINT)]).out) == hf_lm.CHECKPOINT
