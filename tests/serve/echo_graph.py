"""A deterministic streaming graph for the serve tests: echoes the prompt back one
character per "decode step".

``build()`` alone (as ``dataflow serve`` and the examples load it) streams freely. Tests
pass a :class:`Gate` to hand out steps one at a time and a :class:`Probe` to count the
steps computed and to see the generator closed. A prompt starting with ``fail:`` fails
before any output; a ``#`` in a prompt fails the stream when it is reached.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel

import dataflow as df

__all__ = ["Gate", "Probe", "build"]

EXAMPLE_INPUTS = ["def main(", "hello"]


class Gate:
    """Decode steps on demand: each step takes one permit; ``open()`` lifts the limit."""

    def __init__(self, permits: float = 0) -> None:
        self.permits = permits
        self.waiting = 0
        self._changed = anyio.Event()
        self.arrived = anyio.Event()  # set once any step waits here

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def step(self) -> None:
        self.waiting += 1
        self.arrived.set()
        try:
            while self.permits < 1:
                await self._changed.wait()
        finally:
            self.waiting -= 1
        self.permits -= 1

    def release(self, n: int = 1) -> None:
        self.permits += n
        self._wake()

    def open(self) -> None:
        self.permits = math.inf
        self._wake()


class Probe:
    """What the generator did: steps computed and generators closed."""

    def __init__(self) -> None:
        self.steps = 0
        self.closed = 0
        self.closed_event = anyio.Event()


def build(gate: Gate | None = None, probe: Probe | None = None, replicas: int = 64) -> df.Graph:
    """The echo graph; ``replicas`` generators run at once (one per stream)."""

    # ordered=False: each stream keeps its own order (one replica runs it), and an ordered
    # node with several replicas holds a generator's outputs until it ends.
    @df.infer(placement="loop", replicas=replicas, ordered=False)
    async def echo(
        prompt: str,
        max_new_tokens: int | None = None,
        temperature: float = 1.0,
        seed: int = 0,
        stop: str | list[str] | None = None,
    ) -> AsyncIterator[str]:
        if prompt.startswith("fail:"):
            raise ValueError("the prompt asked to fail")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        limit = len(prompt) if max_new_tokens is None else min(max_new_tokens, len(prompt))
        try:
            for ch in prompt[:limit]:
                if ch in stops:
                    return
                if gate is not None:
                    await gate.step()
                else:
                    await anyio.lowlevel.checkpoint()
                if ch == "#":
                    raise RuntimeError("a '#' in the prompt")
                if probe is not None:
                    probe.steps += 1
                yield ch
        finally:
            if probe is not None:
                probe.closed += 1
                probe.closed_event.set()

    return df.Graph("echo", echo)
