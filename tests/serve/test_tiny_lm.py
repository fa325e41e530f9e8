"""/v1/completions over the real token-streaming graph, graphs/tiny_lm.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import dataflow as df
from dataflow.serve import create_app

openai = pytest.importorskip("openai")
if not (Path(__file__).resolve().parents[2] / "graphs" / "tiny_lm.py").exists():
    pytest.skip("graphs/tiny_lm.py is not there", allow_module_level=True)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_openai_client_against_tiny_lm(serve: Any) -> None:
    from graphs import tiny_lm

    try:
        graph = tiny_lm.build()
    except df.GraphError as exc:  # weights not trained in this checkout
        pytest.skip(str(exc))
    async with serve(create_app(graph)) as server:
        oai = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        async with oai:
            args: dict[str, Any] = {"model": "tiny_lm", "prompt": "def main(", "seed": 1}
            done = await oai.completions.create(max_tokens=12, extra_body={"top_k": 5}, **args)
            choice = done.choices[0]
            assert done.usage is not None and 1 <= done.usage.completion_tokens <= 12
            assert choice.finish_reason == (
                "length" if done.usage.completion_tokens == 12 else "stop"
            )
            stream = await oai.completions.create(
                max_tokens=12, extra_body={"top_k": 5}, stream=True, **args
            )
            text = "".join([c.choices[0].text async for c in stream if c.choices])
            assert text == choice.text  # same seed, same tokens, streamed or not
            # byte tokens: at least as many as the text's UTF-8 bytes (EOS counts too)
            assert done.usage.completion_tokens >= len(choice.text.encode("utf-8"))
            # chat through the graph's chat template
            chat = await oai.chat.completions.create(
                model="tiny_lm",
                messages=[{"role": "user", "content": "def main("}],
                max_tokens=6,
                seed=1,
                n=2,
            )
            assert len(chat.choices) == 2 and chat.usage is not None
            assert chat.usage.prompt_tokens == len(b"user: def main(\nassistant: ")
            assert all(c.finish_reason in ("stop", "length") for c in chat.choices)
