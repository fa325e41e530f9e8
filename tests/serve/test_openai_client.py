"""The official ``openai`` client against a real uvicorn: chat and completions, streamed
and not, ``n``, logprobs, stop, seed reproducibility and exact usage, on a graph whose
``generate`` node reports token counts (tests/serve/lm_graph.py)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import httpx
import pytest

from dataflow.serve import create_app

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn runs on asyncio


def client(server: Any, key: str = "unused") -> Any:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


USER = [{"role": "user", "content": "hi"}]


async def test_chat_not_streamed(serve: Any, alpha: ModuleType) -> None:
    async with serve(create_app(alpha.build())) as server, client(server) as oai:
        # "user: hi\nassistant: " ends in a space: greedy spells from "a"
        done = await oai.chat.completions.create(
            model="alpha", messages=USER, temperature=0, max_tokens=5
        )
        choice = done.choices[0]
        assert done.object == "chat.completion" and done.model == "alpha"
        assert choice.message.role == "assistant" and choice.message.content == "abcde"
        assert choice.finish_reason == "length"
        prompt = len(b"user: hi\nassistant: ")
        assert done.usage is not None
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (prompt, 5)
        assert done.usage.total_tokens == prompt + 5
        # the graph's own default limit (8) ended it: still "length"
        done = await oai.chat.completions.create(model="alpha", messages=USER, temperature=0)
        assert done.choices[0].message.content == "abcdefgh"
        assert done.choices[0].finish_reason == "length"
        # max_completion_tokens, the newer name
        done = await oai.chat.completions.create(
            model="alpha", messages=USER, temperature=0, max_completion_tokens=2
        )
        assert done.choices[0].message.content == "ab"


async def test_chat_streamed_with_usage(serve: Any, alpha: ModuleType) -> None:
    async with serve(create_app(alpha.build())) as server, client(server) as oai:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "w"}]
        stream = await oai.chat.completions.create(
            model="alpha",
            messages=[*messages, {"role": "assistant", "content": "w"}],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "abcdefgh"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None
        assert last.usage.completion_tokens == 8
        assert all(c.usage is None for c in chunks[:-1])


async def test_completions_stop_and_eos(serve: Any, alpha: ModuleType) -> None:
    async with serve(create_app(alpha.build())) as server, client(server) as oai:
        done = await oai.completions.create(model="alpha", prompt="w", temperature=0)
        # "x", "y", "z", then the end-of-sequence token: 4 tokens, "stop"
        assert done.choices[0].text == "xyz" and done.choices[0].finish_reason == "stop"
        assert done.usage is not None and done.usage.completion_tokens == 4
        assert done.usage.prompt_tokens == 1
        done = await oai.completions.create(model="alpha", prompt="a", temperature=0, stop="d")
        assert done.choices[0].text == "bc" and done.choices[0].finish_reason == "stop"
        stream = await oai.completions.create(
            model="alpha", prompt="a", temperature=0, stop=["e"], stream=True
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks) == "bcd"
        assert chunks[-1].choices[0].finish_reason == "stop"


async def test_n_choices_and_seed_reproducibility(serve: Any, alpha: ModuleType) -> None:
    async with serve(create_app(alpha.build())) as server, client(server) as oai:
        args: dict[str, Any] = {"model": "alpha", "messages": USER, "max_tokens": 8}
        one = await oai.chat.completions.create(n=2, seed=7, **args)
        again = await oai.chat.completions.create(n=2, seed=7, **args)
        texts = [c.message.content for c in one.choices]
        assert [c.index for c in one.choices] == [0, 1]
        assert texts == [c.message.content for c in again.choices]  # same seed, same text
        assert one.usage is not None
        assert one.usage.completion_tokens == sum(len(t or "") for t in texts)  # 1 byte each
        seeds = {
            tuple(c.message.content for c in (await oai.chat.completions.create(
                n=2, seed=s, **args)).choices)
            for s in range(5)
        }  # fmt: skip
        assert len(seeds) > 1  # other seeds, other samples
        stream = await oai.chat.completions.create(n=2, seed=7, stream=True, **args)
        streamed = ["", ""]
        async for chunk in stream:
            for c in chunk.choices:
                streamed[c.index] += c.delta.content or ""
        assert streamed == texts  # streamed or not, the same tokens
        # completions: choices of prompt i are i * n .. i * n + n - 1
        done = await oai.completions.create(
            model="alpha", prompt=["a", "m"], n=2, temperature=0, max_tokens=2
        )
        assert [c.text for c in done.choices] == ["bc", "bc", "no", "no"]
        assert done.usage is not None and done.usage.prompt_tokens == 2
        assert done.usage.completion_tokens == 8


async def test_logprobs(serve: Any, alpha: ModuleType) -> None:
    async with serve(create_app(alpha.build())) as server, client(server) as oai:
        done = await oai.chat.completions.create(
            model="alpha", messages=USER, temperature=0, max_tokens=3, logprobs=True,
            top_logprobs=2,
        )  # fmt: skip
        content = done.choices[0].logprobs.content
        assert [t.token for t in content] == ["a", "b", "c"]
        assert all(t.logprob < 0 for t in content)
        assert [a.token for a in content[0].top_logprobs] == ["a", " "]
        assert content[0].bytes == [ord("a")]
        stream = await oai.chat.completions.create(
            model="alpha", messages=USER, temperature=0, max_tokens=3, logprobs=True,
            stream=True,
        )  # fmt: skip
        tokens = [
            t.token
            async for c in stream
            for ch in c.choices
            if ch.logprobs is not None and ch.logprobs.content
            for t in ch.logprobs.content
        ]
        assert tokens == ["a", "b", "c"]
        done = await oai.completions.create(
            model="alpha", prompt="a", temperature=0, max_tokens=2, logprobs=1
        )
        lp = done.choices[0].logprobs
        assert lp.tokens == ["b", "c"] and lp.text_offset == [0, 1]
        assert list(lp.top_logprobs[0]) == ["b"] and len(lp.token_logprobs) == 2


async def test_langchain_default_body(serve: Any, alpha: ModuleType, echo: ModuleType) -> None:
    """What LangChain's ChatOpenAI sends by default, as raw HTTP."""
    body = {
        "model": "alpha",
        "messages": USER,
        "stream": False,
        "n": 1,
        "temperature": 0.7,
        "top_p": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "logit_bias": {},
        "user": "someone",
    }
    app = create_app([alpha.build(), echo.build()])
    async with serve(app) as server, httpx.AsyncClient() as http:
        resp = await http.post(server.url + "/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"]
        # a graph without top_p or penalties accepts their neutral values too
        plain = {k: v for k, v in body.items() if k not in ("messages", "n")}
        plain |= {"model": "echo", "prompt": "hello", "max_tokens": 3, "n": 1}
        resp = await http.post(server.url + "/v1/completions", json=plain)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == "hel"


async def test_models_list_and_retrieve(serve: Any, alpha: ModuleType) -> None:
    async with serve(create_app(alpha.build())) as server, client(server) as oai:
        assert [m.id for m in (await oai.models.list()).data] == ["alpha"]
        card = await oai.models.retrieve("alpha")
        assert card.id == "alpha" and card.object == "model"
        with pytest.raises(openai.NotFoundError):
            await oai.models.retrieve("nope")


async def test_usage_counts_tokens_not_chunks(serve: Any, alpha: ModuleType) -> None:
    """'éééé' is 8 byte tokens in 4 text chunks: usage says 8 (it said 4)."""
    async with serve(create_app(alpha.build())) as server, client(server) as oai:
        done = await oai.completions.create(model="alpha", prompt="#", temperature=0, max_tokens=8)
        assert done.choices[0].text == "éééé" and done.choices[0].finish_reason == "length"
        assert done.usage is not None and done.usage.completion_tokens == 8
        stream = await oai.completions.create(
            model="alpha", prompt="#", temperature=0, max_tokens=8, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == "éééé"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
