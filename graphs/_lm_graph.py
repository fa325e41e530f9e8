"""What the byte-level LM graphs share: the prompt encoder and the graph's wiring.

Each LM graph is ``encode (text -> byte ids) >> generate (continuous batching)``. The
generate node decodes its own bytes to text incrementally (``decode="bytes"``): the
UTF-8 decoder holds one request's partial character between tokens, state that a
separate node, which sees items but not their requests' history, could not keep.

Chat: the generate node's chat template is :func:`chat_prompt` (``role: content`` lines,
then ``assistant: ``), and the prompt node renders chat messages with it before encoding,
so ``engine.stream([{"role": "user", "content": "hi"}])`` works on these graphs as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dataflow as df

__all__ = ["PromptBytes", "chat_prompt", "lm_graph"]

WEIGHTS = Path(__file__).resolve().parent / "weights"


def chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The byte LMs' chat template: one ``role: content`` line per message, then
    ``assistant: `` for the model to continue."""
    lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return lines + "assistant: "


class PromptBytes:
    """The encode node's body: a prompt as byte ids, left-truncated to ``max_prompt``.

    Policy for long prompts: keep the *last* ``max_prompt`` bytes (the model continues
    the end of the text; the start would fall out of its context anyway). Chat messages
    (a list of ``{"role", "content"}``) are first rendered with ``render_chat`` (the
    generate node's template), so the kept end is the latest turns and ``assistant: ``.
    """

    def __init__(
        self, max_prompt: int, render_chat: Callable[[Any], str | list[int]] | None = None
    ) -> None:
        self.max_prompt = max_prompt
        self.render_chat = render_chat

    def __call__(self, prompt: str | bytes | list[dict[str, str]]) -> list[int]:
        """Raises:
        InvalidRequest: the prompt is empty, not text or messages, or bytes that are
            not UTF-8.
        """
        if isinstance(prompt, list) and self.render_chat is not None:
            rendered = self.render_chat(prompt)
            if not isinstance(rendered, str):
                return list(rendered)[-self.max_prompt :]
            prompt = rendered
        if isinstance(prompt, bytes | bytearray):
            try:
                bytes(prompt).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise df.InvalidRequest(
                    f"the prompt is not valid UTF-8 (byte {exc.start}): send text"
                ) from None
            data = bytes(prompt)
        elif isinstance(prompt, str):
            data = prompt.encode("utf-8", errors="surrogatepass")
        else:
            raise df.InvalidRequest(
                f"a prompt is str, UTF-8 bytes or chat messages, not {type(prompt).__name__}"
            )
        if not data:
            raise df.InvalidRequest("the prompt is empty: give at least one character")
        return list(data[-self.max_prompt :])


def lm_graph(
    name: str,
    factory: Callable[[int], df.StepModel],
    weights: Path,
    *,
    max_prompt: int,
    train_command: str,
    max_batch: int = 32,
    max_new_tokens: int = 128,
    max_new_tokens_limit: int = 4096,
    temperature: float = 0.8,
    top_k: int = 0,
    replicas: int = 1,
    placement: str = "auto",
    threads: int | None = None,
    **options: Any,
) -> df.Graph:
    """``encode >> generate`` for a byte-level step model: what each LM graph's ``build`` does.

    ``max_batch`` and the options after it are the LM graphs' defaults for
    :func:`dataflow.generate`; ``**options`` passes further ones through. Per-request
    parameters: see ``docs/generation.md`` (``max_new_tokens``, ``temperature``,
    ``top_k``, ``top_p``, ``seed``, ``stop``, ``details``, ``n``, ``logprobs``, penalties).
    The chat template defaults to :func:`chat_prompt` (``chat_template=`` replaces it).

    Raises:
        GraphError: the weights file is missing (the message says how to train it).
    """
    if not weights.is_file():
        raise df.GraphError(f"graph {name!r}: no weights at {weights}; train with {train_command}")
    options.setdefault("chat_template", chat_prompt)
    generate = df.generate(
        factory,
        name=name,
        decode="bytes",
        max_batch=max_batch,
        max_new_tokens=max_new_tokens,
        max_new_tokens_limit=max_new_tokens_limit,
        temperature=temperature,
        top_k=top_k,
        replicas=replicas,
        placement=placement,
        threads=threads,
        **options,
    )
    config = generate.options["generation"]
    encode = df.encode(PromptBytes(max_prompt, config.render_chat), name="prompt")
    return df.Graph(name, encode >> generate)
