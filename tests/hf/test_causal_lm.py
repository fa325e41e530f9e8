"""hf.causal_lm: token-for-token parity with transformers' own generate, through the engine."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import anyio
import torch

import dataflow as df
from dataflow import hf

from ._checkpoints import build

pytestmark = pytest.mark.anyio

PROMPTS = [
    "def main(",
    "class Reader:\n    def",
    "import os",
    "for i in range(10):\n   ",
    "The quick brown",
    "Ça va? Grüße",
    "x",
    "print(os.path.join('a', 'b'))",
    "    return self.buffer[:size]\n",
    "naïve café",
    "total += i * i\nfor",
    "def read(self, size=-1):\n        return",
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(str(request.param), tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, local_files_only=True
    ).eval()

    def generate(ids: list[int], n: int) -> tuple[list[int], str]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n
            )
        new = out[0, len(ids) :].tolist()
        eos = set(model.generation_config.eos_token_id)
        if new and new[-1] in eos:
            new = new[:-1]  # the runtime ends on EOS without emitting it
        return new, tok.decode(out[0, len(ids) :], skip_special_tokens=True)

    generate.tokenizer = tok  # type: ignore[attr-defined]
    return generate


async def collect(engine: df.Engine, prompt: Any, **params: Any) -> tuple[list[int], str]:
    chunks = [c async for c in engine.stream(prompt, details=True, **params)]
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


async def test_greedy_equals_generate_alone(checkpoint: Path, reference: Any) -> None:
    tok = reference.tokenizer
    async with df.Engine(df.Graph("lm", hf.causal_lm(checkpoint, max_batch=4))) as engine:
        for prompt in PROMPTS:
            ids, text = await collect(engine, prompt, max_new_tokens=16, temperature=0)
            assert (ids, text) == reference(tok(prompt)["input_ids"], 16), prompt
        # the default output: str chunks that join to the same text
        chunks = [c async for c in engine.stream(PROMPTS[0], max_new_tokens=16, temperature=0)]
        assert all(isinstance(c, str) for c in chunks)
        assert "".join(chunks) == reference(tok(PROMPTS[0])["input_ids"], 16)[1]


async def test_a_dozen_concurrent_prompts_join_and_leave_mid_flight(
    checkpoint: Path, reference: Any
) -> None:
    tok = reference.tokenizer
    lengths = [6 + 3 * (i % 5) for i in range(len(PROMPTS))]
    node = hf.causal_lm(checkpoint, max_batch=5, name="lm")
    results: dict[int, tuple[list[int], str]] = {}
    async with df.Engine(df.Graph("lm", node)) as engine:

        async def one(i: int) -> None:
            results[i] = await collect(engine, PROMPTS[i], max_new_tokens=lengths[i], temperature=0)

        async with anyio.create_task_group() as tg:
            for i in range(len(PROMPTS)):
                tg.start_soon(one, i)
        stats = engine.stats()
    for i, prompt in enumerate(PROMPTS):
        assert results[i] == reference(tok(prompt)["input_ids"], lengths[i]), prompt
    sizes = stats["nodes"]["lm"]["batch_sizes"]
    assert max(sizes) == 5  # max_batch was full, so sequences waited and joined later


async def test_seeded_sampling_is_the_same_alone_and_batched(checkpoint: Path) -> None:
    params = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 50, "top_p": 0.9}
    async with df.Engine(df.Graph("lm", hf.causal_lm(checkpoint, max_batch=4))) as engine:
        alone = [await collect(engine, p, seed=i, **params) for i, p in enumerate(PROMPTS[:6])]
        together: dict[int, tuple[list[int], str]] = {}

        async def one(i: int) -> None:
            together[i] = await collect(engine, PROMPTS[i], seed=i, **params)

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(one, i)
    assert [together[i] for i in range(6)] == alone
    assert len({tuple(ids) for ids, _ in alone}) > 1


async def test_chat_messages_equal_generate_on_the_rendered_ids(
    checkpoint: Path, reference: Any
) -> None:
    tok = reference.tokenizer
    messages = [{"role": "user", "content": "def main("}]
    rendered = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert rendered == tok("<|user|>def main(<|end|><|assistant|>")["input_ids"]
    async with df.Engine(df.Graph("lm", hf.causal_lm(checkpoint, max_batch=2))) as engine:
        got = await collect(engine, messages, max_new_tokens=10, temperature=0)
    assert got == reference(list(rendered), 10)


async def test_a_jinja_chat_template_option_replaces_the_tokenizers(checkpoint: Path) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    node = hf.causal_lm(checkpoint, max_batch=2, chat_template=template)
    config = node.options["generation"]
    assert config.render_chat([{"role": "user", "content": "def main("}]) == list(
        config.encode("def main(")
    )


async def test_32_early_exits_with_max_batch_2_never_deadlock(checkpoint: Path) -> None:
    node = hf.causal_lm(checkpoint, max_batch=2, max_new_tokens=80, name="lm")
    async with df.Engine(df.Graph("lm", node), stream_buffer=2) as engine:
        with anyio.fail_after(60):
            for i in range(32):
                prompt = PROMPTS[i % len(PROMPTS)]
                async with contextlib.aclosing(engine.stream(prompt, seed=i)) as stream:
                    await anext(stream)
            text = await engine.run("def", max_new_tokens=5, temperature=0)
        stats = engine.stats()
    assert isinstance(text, list | str)
    assert stats["requests"]["cancelled"] == 32


async def test_context_overflow_is_an_invalid_request_naming_both_numbers(
    checkpoint: Path,
) -> None:
    async with df.Engine(df.Graph("lm", hf.causal_lm(checkpoint, max_batch=2))) as engine:
        with pytest.raises(df.InvalidRequest, match=r"max_new_tokens is 90.*max_positions=96"):
            await engine.run("def main(argv): return 1", max_new_tokens=90)
        # a node-default max_new_tokens shrinks to fit the context instead
        chunks = [c async for c in engine.stream([5] * 90, details=True, temperature=0)]
    assert chunks[-1].finish_reason in ("length", "stop")
    assert chunks[-1].completion_tokens <= 6


async def test_token_ids_beyond_the_vocabulary_are_invalid_requests(checkpoint: Path) -> None:
    """An id the embedding has no row for is the caller's error (on a GPU it would be a
    device-side assert that poisons the process), alone or joining with good prompts."""
    node = hf.causal_lm(checkpoint, max_batch=4, temperature=0)
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    async with df.Engine(df.Graph("lm", node)) as engine:
        with pytest.raises(df.InvalidRequest, match=rf"token id {vocab} .*0\.\.{vocab - 1}"):
            await engine.run([5, vocab], max_new_tokens=2)
        async with anyio.create_task_group() as tg:
            outcomes: dict[int, Any] = {}

            async def one(i: int, prompt: list[int]) -> None:
                try:
                    outcomes[i] = await engine.run(prompt, max_new_tokens=2, details=True)
                except df.InvalidRequest as exc:
                    outcomes[i] = exc

            for i, prompt in enumerate([[5, 6], [vocab + 7], [7, 8, 9]]):
                tg.start_soon(one, i, prompt)
    assert isinstance(outcomes[1], df.InvalidRequest)
    assert outcomes[0][-1].completion_tokens == outcomes[2][-1].completion_tokens == 2


def test_a_loaded_model_and_tokenizer_work_too(checkpoint: Path, reference: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
    node = hf.causal_lm(model, tokenizer=reference.tokenizer, max_batch=2, name="lm2")
    body = node.body()
    out = list(body("def main(", max_new_tokens=8, temperature=0, details=True))
    ids = [t for c in out for t in c.token_ids]
    assert ids == reference(reference.tokenizer("def main(")["input_ids"], 8)[0]
    with pytest.raises(df.GraphError, match="tokenizer="):
        hf.causal_lm(model)


def test_missing_files_are_named(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(df.GraphError, match="not a local checkpoint directory"):
        hf.causal_lm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(df.GraphError, match=r"missing file .*config\.json"):
        hf.causal_lm(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(df.GraphError, match="no weights"):
        hf.causal_lm(tmp_path / "empty")
    with pytest.raises(df.GraphError, match="dtype"):
        hf.causal_lm(checkpoint, dtype="float8")


def test_sliding_window_models_are_refused() -> None:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from dataflow.hf._causal import check_attention

    check_attention("x", LlamaConfig())
    check_attention("x", Qwen2Config(use_sliding_window=False))
    with pytest.raises(df.GraphError, match="sliding"):
        check_attention("x", MistralConfig(sliding_window=4096))
    with pytest.raises(df.GraphError, match="sliding"):
        check_attention("x", Qwen2Config(use_sliding_window=True, max_window_layers=1))


async def test_a_stop_string_across_tokens_cuts_the_reference_text(
    checkpoint: Path, reference: Any
) -> None:
    tok = reference.tokenizer
    ids, text = reference(tok(PROMPTS[0])["input_ids"], 24)
    pieces = [tok.decode([t]) for t in ids]
    # a stop string that starts inside one token and ends inside a later one
    k = next(i for i in range(1, len(pieces) - 1) if len(pieces[i]) > 1 and pieces[i + 1])
    start = sum(len(p) for p in pieces[:k]) + 1
    stop = text[start : start + len(pieces[k])]
    assert stop and stop not in text[:start]
    async with df.Engine(df.Graph("lm", hf.causal_lm(checkpoint, max_batch=2))) as engine:
        got = "".join(await engine.run(PROMPTS[0], max_new_tokens=24, temperature=0, stop=stop))
    assert got == text[: text.index(stop)]
