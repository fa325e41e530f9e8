"""The shipped LM graphs (tiny_lm, lstm_lm): load their weights, stream text, reject bad
input per request."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import anyio
import pytest

import dataflow as df
from dataflow.graph import generation_config
from graphs import lstm_lm, tiny_lm

pytestmark = pytest.mark.anyio

GRAPHS = [pytest.param(tiny_lm, id="tiny_lm"), pytest.param(lstm_lm, id="lstm_lm")]


async def text(engine: df.Engine, prompt: object, **params: object) -> str:
    chunks = [c async for c in engine.stream(prompt, **params)]
    assert all(isinstance(c, str) and c for c in chunks)
    return "".join(chunks)


@pytest.mark.parametrize("module", GRAPHS)
async def test_streams_text_and_same_seed_gives_same_text_in_a_batch(module: ModuleType) -> None:
    graph = module.build(max_batch=8, threads=1)
    async with df.Engine(graph) as engine:
        alone = await text(engine, "def main(", max_new_tokens=48, seed=3)
        out: dict[int, str] = {}
        async with anyio.create_task_group() as tg:
            for i in range(5):

                async def one(i: int = i) -> None:
                    prompt = "def main(" if i == 0 else f"import os{i}\n"
                    out[i] = await text(engine, prompt, max_new_tokens=48, seed=3 if i == 0 else i)

                tg.start_soon(one)
        stats = engine.stats()
    assert 0 < len(alone.encode()) <= 48
    assert out[0] == alone
    assert max(stats["nodes"][graph.plan().sink]["batch_sizes"]) > 1


@pytest.mark.parametrize("module", GRAPHS)
async def test_bad_input_is_a_clear_error_for_that_request_only(module: ModuleType) -> None:
    graph = module.build(max_batch=4, threads=1, max_new_tokens_limit=512)
    async with df.Engine(graph) as engine:
        good: list[str] = []
        async with anyio.create_task_group() as tg:

            async def run_good() -> None:
                good.append(await text(engine, "class ", max_new_tokens=64, temperature=0))

            tg.start_soon(run_good)
            for prompt, params, match in [
                ("", {}, "empty"),
                (b"\xff\xfe", {}, "UTF-8"),
                ("x", {"max_new_tokens": 0}, "max_new_tokens"),
                ("x", {"max_new_tokens": 10**6}, "max_new_tokens"),
                ("x", {"temperature": -1.0}, "temperature"),
                ("x", {"stop": 3}, "stop"),
                ("x", {"nucleus": 0.9}, "nucleus"),
            ]:
                with pytest.raises(df.InvalidRequest, match=match):
                    await engine.run(prompt, **params)
        # A prompt longer than the context is cut from the left, not refused.
        long = await text(engine, "x = 1\n" * 200, max_new_tokens=8, temperature=0)
    assert len(good[0].encode()) == 64
    assert 0 < len(long.encode()) <= 8


@pytest.mark.parametrize("module", GRAPHS)
def test_missing_weights_is_a_graph_error(module: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(df.GraphError, match="train"):
        module.build(weights=tmp_path / "none.safetensors")


@pytest.mark.parametrize("module", GRAPHS)
async def test_chat_messages_work_directly_and_rendered_first(module: ModuleType) -> None:
    graph = module.build(max_batch=4, threads=1)
    found = generation_config(graph)
    assert found is not None
    name, config = found
    assert name == graph.plan().sink and config.has_chat_template
    messages = [{"role": "user", "content": "def main("}]
    rendered = config.render_chat(messages)
    assert rendered == "user: def main(\nassistant: "
    async with df.Engine(graph) as engine:
        direct = await text(engine, messages, max_new_tokens=24, seed=5)
        # A server that renders with the generate node's template before the prompt node.
        assert isinstance(rendered, str)
        first = await text(engine, rendered, max_new_tokens=24, seed=5)
        chunks = await engine.run(messages, max_new_tokens=24, seed=5, details=True)
        with pytest.raises(df.InvalidRequest, match="role"):
            await engine.run([{"content": "x"}])
    assert direct == first == "".join(c.text for c in chunks)
    assert chunks[-1].prompt_tokens == len(rendered.encode())
    assert chunks[-1].completion_tokens == 24 and chunks[-1].finish_reason == "length"


@pytest.mark.parametrize("module", GRAPHS)
async def test_stalled_readers_give_their_slots_to_others(module: ModuleType) -> None:
    graph = module.build(max_batch=2, threads=1)
    async with df.Engine(graph, stream_buffer=2) as engine:
        stalled = [
            engine.stream(p, max_new_tokens=40, seed=1, details=True) for p in ("def ", "import ")
        ]
        for s in stalled:
            await anext(s)
        with anyio.fail_after(30):
            other = await text(engine, "class ", max_new_tokens=20, temperature=0)
        ends = [[c async for c in s][-1] for s in stalled]
    assert len(other.encode()) == 20
    # Rebuilt from prompt + tokens by one prefill, each went on to its full length.
    assert [(c.completion_tokens, c.finish_reason) for c in ends] == [(40, "length")] * 2
