"""Running a completion or chat request through its engine: the sequences of every
prompt, their text, token counts, logprobs and finish reasons.

A ``text-generation`` model is asked for ``details=True``, so each output is a
``df.Chunk`` that says which of the ``n`` sequences it extends, how many tokens the prompt
and the completion used, and why the sequence ended. Any other streaming graph gives one
text chunk per output; its counts are then chunks, and ``finish_reason`` is ``"length"``
when it produced ``max_tokens`` of them.

Outputs already waiting when the writer comes back for more (a slow client) are read in
one go and written as one frame per sequence; the first output is never held back.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ..graph import Chunk, TokenLogprob
from ._models import Model
from ._openai import GenRequest

__all__ = ["Emit", "Outcome", "as_text", "generate"]

# emit(choice, text, logprobs or None, finish_reason or None)
Emit = Callable[[int, str, "list[TokenLogprob] | None", "str | None"], Awaitable[None]]


def as_text(value: Any) -> str:
    """One output of a plain streaming graph as text.

    Raises:
        TypeError: an output that is not text (the graph does not generate text).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    raise TypeError(f"its outputs are {type(value).__name__}, not text")


class Outcome:
    """What one request's sequences produced (choice ``i * n + k``: sequence ``k`` of
    prompt ``i``)."""

    def __init__(self, req: GenRequest) -> None:
        choices = len(req.prompts) * req.n
        self.req = req
        self.texts: list[list[str]] = [[] for _ in range(choices)]
        self.logprobs: list[list[TokenLogprob]] | None = (
            None if req.logprobs is None else [[] for _ in range(choices)]
        )
        self.finish: list[str | None] = [None] * choices
        self.completion = [0] * choices
        self.prompt = [0] * len(req.prompts)
        self.start = time.perf_counter()
        self.first: float | None = None  # when the first output arrived
        self.scheduled: float | None = None  # when the first of its sequences got a slot
        self.gaps: list[float] = []  # inter-token gaps, for the metrics
        self._last = 0.0

    def scheduled_at(self, when: float | None) -> None:
        """One prompt's slot time: the request's queue time ends at the first."""
        if when is not None and (self.scheduled is None or when < self.scheduled):
            self.scheduled = when

    def arrived(self, tokens: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        elif tokens > 0:
            gap = (now - self._last) / tokens
            self.gaps.extend([gap] * min(tokens, 64))
        self._last = now

    def usage(self) -> dict[str, int]:
        prompt, completion = sum(self.prompt), sum(self.completion)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def choices(self) -> list[dict[str, Any]]:
        return [
            {
                "text": "".join(self.texts[c]),
                "logprobs": None if self.logprobs is None else self.logprobs[c],
                "finish_reason": self.finish[c] or "stop",
            }
            for c in range(len(self.texts))
        ]

    async def collect(
        self, choice: int, text: str, logprobs: list[TokenLogprob] | None, finish: str | None
    ) -> None:
        """The ``emit`` of a non-streaming request: keep everything."""
        if text:
            self.texts[choice].append(text)
        if logprobs and self.logprobs is not None:
            self.logprobs[choice].extend(logprobs)


async def generate(
    model: Model,
    req: GenRequest,
    index: int,
    prompt: Any,
    timeout: float | None,
    wait: bool,
    out: Outcome,
    emit: Emit,
) -> None:
    """Run prompt ``index`` to its end, calling ``emit`` per (coalesced) piece of each
    of its sequences and recording counts and finish reasons in ``out``."""
    params = {**req.params, "details": True} if model.detailed else req.params
    stream = model.engine.stream(prompt, timeout=timeout, wait=wait, params=params)
    base = index * req.n
    async with stream:
        try:
            if model.detailed:
                async for first in stream:
                    items = [first]
                    while stream.ready:  # already waiting: reading them does not wait
                        items.append(await anext(stream))
                    await _chunks(items, base, index, out, emit)
                return
            count = 0
            async for first in stream:
                texts = [as_text(first)]
                while stream.ready:
                    texts.append(as_text(await anext(stream)))
                count += len(texts)
                out.arrived(len(texts))
                await emit(base, "".join(texts), None, None)
            out.completion[base] = count
            out.prompt[index] = model.count(prompt)
            length = req.max_tokens is not None and count >= req.max_tokens
            out.finish[base] = "length" if length else "stop"
            await emit(base, "", None, out.finish[base])
        finally:
            out.scheduled_at(stream.scheduled_at)


async def _chunks(items: list[Chunk], base: int, index: int, out: Outcome, emit: Emit) -> None:
    """Merge waiting chunks per sequence, record their counts, emit one piece each."""
    merged: dict[int, list[Any]] = {}  # sequence -> [texts, logprobs, finish]
    tokens = 0
    for c in items:
        choice = base + c.index
        slot = merged.get(choice)
        if slot is None:
            slot = merged[choice] = [[], None, None]
        if c.text:
            slot[0].append(c.text)
        if c.logprobs:
            slot[1] = [*(slot[1] or ()), *c.logprobs]
        if c.finish_reason is not None:
            slot[2] = c.finish_reason
            out.finish[choice] = c.finish_reason
        tokens += max(0, c.completion_tokens - out.completion[choice])
        out.completion[choice] = c.completion_tokens
        out.prompt[index] = c.prompt_tokens
    out.arrived(tokens)
    for choice, (texts, logprobs, finish) in merged.items():
        await emit(choice, "".join(texts), logprobs, finish)


async def run_all(
    count: int, call: Callable[[int], Awaitable[None]], window: int
) -> BaseException | None:
    """Runs ``call(0) .. call(count - 1)``, at most ``window`` at once; the first to raise
    cancels the rest. Returns that exception (never an exception group), or None."""
    errors: list[BaseException] = []
    if count == 1:
        try:
            await call(0)
        except Exception as exc:
            return exc
        return None
    limiter = anyio.Semaphore(max(1, window))

    async def one(i: int, tg: anyio.abc.TaskGroup) -> None:
        async with limiter:
            try:
                await call(i)
            except Exception as exc:
                errors.append(exc)
                tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i, tg)
    return errors[0] if errors else None
