"""graphs/hf_lm.py behind the OpenAI-compatible server: completions and chat."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

import openai

import dataflow as df
from dataflow.serve import create_app
from graphs import hf_lm
from tests.serve.conftest import running

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_chat_and_completions_on_the_shipped_checkpoint() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_lm.CHECKPOINT, local_files_only=True)
    messages: list[Any] = [{"role": "user", "content": "write a function named join"}]
    rendered = tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    graph = hf_lm.build(max_batch=4)
    async with df.Engine(graph) as engine:
        expected = "".join(await engine.run(messages, max_new_tokens=16, temperature=0))
    async with running(create_app(hf_lm.build(max_batch=4))) as server:
        oai = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        async with oai:
            chat = await oai.chat.completions.create(
                model="hf_lm", messages=messages, max_tokens=16, temperature=0
            )
            done = await oai.completions.create(
                model="hf_lm", prompt="def main(", max_tokens=8, temperature=0
            )
    assert chat.choices[0].message.content == expected
    assert chat.usage is not None and chat.usage.prompt_tokens == len(rendered)
    assert done.choices[0].text and done.usage is not None
    assert done.usage.prompt_tokens == len(tok("def main(")["input_ids"])
