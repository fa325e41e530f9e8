"""A slow streaming graph for the shutdown tests: one token every ``step_s`` seconds."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

import dataflow as df

EXAMPLE_INPUTS = ["go"]


def build(step_s: float = 0.02) -> df.Graph:
    @df.infer(placement="loop", replicas=16, ordered=False)
    async def slow(prompt: str, max_new_tokens: int = 1000) -> AsyncIterator[str]:
        for i in range(max_new_tokens):
            await anyio.sleep(step_s)  # allowed: simulated decode work
            yield f"{i} "

    return df.Graph("slow", slow)
