"""Outputs already waiting are read without waiting (``Stream.ready``) and written as one
frame; the first output is never held back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

import dataflow as df

pytestmark = pytest.mark.anyio


async def test_stream_ready_counts_waiting_outputs() -> None:
    produced, release = anyio.Event(), anyio.Event()

    @df.infer(placement="loop")
    async def three(x: str) -> AsyncIterator[str]:
        for ch in "abc":
            yield ch
        produced.set()
        await release.wait()

    async with df.Engine(df.Graph("three", three)) as engine:
        stream = engine.stream("x")
        assert stream.ready == 0  # not submitted yet
        async with stream:
            assert await anext(stream) == "a"
            await produced.wait()
            assert stream.ready == 2  # "b" and "c" are waiting
            assert [await anext(stream), await anext(stream)] == ["b", "c"]
            assert stream.ready == 0
            release.set()
            assert [x async for x in stream] == []
        assert stream.ready == 0


async def test_waiting_tokens_share_one_frame() -> None:
    from dataflow.serve._models import Model
    from dataflow.serve._openai import GenRequest
    from dataflow.serve._sequences import Outcome, generate

    produced = anyio.Event()

    @df.infer(placement="loop")
    async def burst(x: str, max_new_tokens: int = 8) -> AsyncIterator[str]:
        yield "first"
        await produced.wait()  # the reader has the first token before the rest exist
        for ch in "bcd":
            yield ch

    async with df.Engine(df.Graph("burst", burst)) as engine:
        model = Model("burst", engine, False, count_tokens=len, retry_after=1.0)
        req = GenRequest("burst", False, ["x"])
        out = Outcome(req)
        pieces: list[tuple[str, str | None]] = []

        async def emit(choice: int, text: str, logprobs: object, finish: str | None) -> None:
            pieces.append((text, finish))
            if text == "first":
                produced.set()
                with anyio.fail_after(10):
                    while engine.stats()["requests"]["succeeded"] == 0:
                        await anyio.sleep(0.005)  # allowed: polling the counter

        await generate(model, req, 0, "x", None, False, out, emit)
    assert pieces == [("first", None), ("bcd", None), ("", "stop")]
    assert out.completion == [4]
