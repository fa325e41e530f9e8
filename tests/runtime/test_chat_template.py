"""Chat templates and in-node tokenization of ``generate`` nodes (``chat_template``,
``encode``, ``GenerationConfig.render_chat``, ``dataflow.graph.generation_config``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

import dataflow as df
from dataflow.graph import GenerationConfig, generation_config

pytestmark = pytest.mark.anyio

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "hé"}, {"type": "text", "text": "llo"}]},
]
RENDERED = "system: be brief\nuser: héllo\nassistant: "
JINJA = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


class Recorder:
    """Greedy over a fixed byte (``'!'``); records every prompt it is prefilled with."""

    prompts: list[list[int]] = []

    def __init__(self, max_batch: int) -> None:
        pass

    def prefill(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        Recorder.prompts.append(list(prompt))
        return self._logits(1)[0]

    def step(self, slots: Sequence[int], last: Sequence[int]) -> torch.Tensor:
        return self._logits(len(slots))

    def free(self, slot: int) -> None:
        pass

    @staticmethod
    def _logits(n: int) -> torch.Tensor:
        out = torch.zeros(n, 256)
        out[:, ord("!")] = 5.0
        return out


def chat(messages: list[dict[str, str]]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def node(**options: Any) -> df.Node:
    options.setdefault("decode", "bytes")
    return df.generate(Recorder, name="gen", temperature=0.0, max_new_tokens=3, **options)


@pytest.mark.parametrize("template", [chat, JINJA], ids=["callable", "jinja"])
async def test_messages_are_rendered_with_the_chat_template(template: Any) -> None:
    Recorder.prompts = []
    gen = node(chat_template=template)
    config: GenerationConfig = gen.options["generation"]
    assert config.has_chat_template
    assert config.render_chat(MESSAGES) == RENDERED
    async with df.Engine(df.Graph("g", gen)) as engine:
        out = await engine.run(MESSAGES)
        chunks = await engine.run(MESSAGES, details=True)
    assert "".join(out) == "!!!"
    assert Recorder.prompts == [list(RENDERED.encode())] * 2
    assert chunks[-1].prompt_tokens == len(RENDERED.encode())
    assert list(gen.body()(MESSAGES)) == out  # the unbatched reference renders the same


async def test_encode_tokenizes_str_prompts_and_rendered_chats_inside_the_node() -> None:
    Recorder.prompts = []
    calls: list[str] = []

    def encode(text: str) -> list[int]:
        calls.append(text)
        return [ord(c) % 256 for c in text.upper()]

    gen = node(encode=encode, chat_template=chat)
    async with df.Engine(df.Graph("g", gen)) as engine:
        await engine.run("abc")
        await engine.run(MESSAGES)
        await engine.run([1, 2])  # token ids are taken as they are
        await engine.run(b"xy")
    assert calls == ["abc", RENDERED]
    assert Recorder.prompts == [
        [65, 66, 67],
        [ord(c) % 256 for c in RENDERED.upper()],
        [1, 2],
        [120, 121],
    ]


async def test_a_template_may_return_token_ids() -> None:
    Recorder.prompts = []
    gen = node(chat_template=lambda messages: [7] * len(messages))
    async with df.Engine(df.Graph("g", gen)) as engine:
        await engine.run(MESSAGES)
    assert Recorder.prompts == [[7, 7]]


async def test_chat_errors_are_invalid_requests_naming_the_node() -> None:
    def broken(messages: list[dict[str, str]]) -> str:
        raise KeyError("name")

    async with df.Engine(df.Graph("g", node())) as engine:
        with pytest.raises(df.InvalidRequest, match="node 'gen' has no chat template"):
            await engine.run(MESSAGES)
        assert "".join(await engine.run("fine")) == "!!!"
    with pytest.raises(df.InvalidRequest, match="node 'gen' has no chat template"):
        node().options["generation"].render_chat(MESSAGES)
    gen = node(chat_template=chat)
    bad_encode = node(chat_template=chat, encode=lambda text: 1 / 0)
    async with (
        df.Engine(df.Graph("g", gen)) as engine,
        df.Engine(df.Graph("b", node(chat_template=broken))) as broken_engine,
        df.Engine(df.Graph("e", bad_encode)) as encode_engine,
    ):
        for messages, match in [
            ([{"content": "x"}], "message 0 needs a string 'role'"),
            ([{"role": "user", "content": 3}], "message 0 'content'"),
            ([{"role": "user", "content": "x"}, "hi"], "message 1 is str"),
            ([{"role": "user", "content": [{"type": "image_url"}]}], "text parts"),
        ]:
            with pytest.raises(df.InvalidRequest, match=match):
                await engine.run(messages)
        with pytest.raises(df.InvalidRequest, match="chat template failed"):
            await broken_engine.run(MESSAGES)
        with pytest.raises(df.InvalidRequest, match="could not encode"):
            await encode_engine.run("x")
        stats = engine.stats()
    assert stats["requests"]["failed"] == 4


def test_template_and_encode_options_are_checked_when_building() -> None:
    with pytest.raises(df.GraphError, match="not a valid Jinja template"):
        node(chat_template="{% for m in messages %}")
    with pytest.raises(df.GraphError, match="chat_template"):
        node(chat_template=3)
    with pytest.raises(df.GraphError, match="encode"):
        node(encode="utf-8")


def test_generation_config_finds_the_generate_node_nearest_the_exit() -> None:
    gen = node(chat_template=chat)
    graph = df.Graph("g", df.encode(lambda x: x, name="tok") >> gen)
    found = generation_config(graph)
    assert found is not None and found[0] == "gen"
    assert found[1] is gen.options["generation"] and found[1].node == "gen"
    after = df.Graph("h", node() >> df.map(lambda x: x, name="post"))
    assert generation_config(after) is not None
    assert generation_config(df.Graph("plain", df.map(lambda x: x, name="m"))) is None


async def test_a_lone_surrogate_is_an_invalid_request_not_a_node_error() -> None:
    """Text that cannot be UTF-8 is the caller's error, whether it is the prompt, a chat
    message, or goes through ``encode``."""
    plain, chatting = node(), node(chat_template=chat, encode=lambda t: list(t.encode()))
    async with (
        df.Engine(df.Graph("g", plain)) as engine,
        df.Engine(df.Graph("c", chatting)) as chat_engine,
    ):
        with pytest.raises(df.InvalidRequest, match=r"node 'gen'.*surrogate.*character 1"):
            await engine.run("a\ud800")
        with pytest.raises(df.InvalidRequest, match="surrogate"):
            await chat_engine.run([{"role": "user", "content": "\udfff"}])
        with pytest.raises(df.InvalidRequest, match="surrogate"):
            await chat_engine.run("\ud800")
        assert "".join(await engine.run("fine")) == "!!!"
    with pytest.raises(df.InvalidRequest, match="surrogate"):
        list(plain.body()("\ud800"))
