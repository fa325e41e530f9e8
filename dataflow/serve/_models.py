"""The served models: one engine each, its kind, and what its requests may carry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._errors import InvalidRequest
from ..engine import Engine
from ..graph import GenerationConfig, generation_config
from ._errors import ApiError
from ._limits import DrainRate

__all__ = ["Model"]

# What each endpoint serves, by model kind.
_ENDPOINTS = {
    "text-generation": {"completions", "chat/completions", "run"},
    "streaming": {"completions", "chat/completions", "run"},
    "embedding": {"embeddings", "run"},
}


class Model:
    """One served graph.

    ``kind``: ``"text-generation"`` (a ``generate`` node at the graph's exit: exact token
    counts, ``n``, logprobs and finish reasons come from its ``df.Chunk`` outputs),
    ``"streaming"`` (another streaming graph: each output is one text chunk) or
    ``"embedding"`` (one output per input).
    """

    def __init__(
        self,
        name: str,
        engine: Engine,
        owned: bool,
        *,
        count_tokens: Callable[[str], int],
        retry_after: float,
    ) -> None:
        self.name = name
        self.engine = engine
        self.owned = owned  # the app opens and closes it in its lifespan
        self.count_tokens = count_tokens
        graph = engine.graph
        nodes = graph.nodes.values()
        self.params: frozenset[str] = frozenset().union(*(n.info.params for n in nodes))
        self.any_param = any(n.info.accepts_any_param for n in nodes)
        self.streaming = engine.plan.streaming
        found = generation_config(graph) if self.streaming else None
        self.generation: GenerationConfig | None = None
        self.entry_generates = False
        if found is not None and found[0] == engine.plan.sink:
            self.generation = found[1]
            self.entry_generates = found[0] == engine.plan.order[0]
        self.detailed = self.generation is not None and "details" in self.params
        if self.detailed:
            self.kind = "text-generation"
        else:
            self.kind = "streaming" if self.streaming else "embedding"
        self.drain = DrainRate(engine, retry_after)

    def takes(self, param: str) -> bool:
        return self.any_param or param in self.params

    def check_endpoint(self, endpoint: str) -> None:
        """Raises ApiError 400 when this model's kind does not serve ``endpoint``."""
        if endpoint in _ENDPOINTS[self.kind]:
            return
        if self.kind == "embedding":
            what = "an embedding model (one output per input, no text stream)"
            use = "use /v1/embeddings or /v1/graphs/{name}/run"
        else:
            what = f"a {self.kind} model (it streams its outputs)"
            use = "use /v1/completions"
        raise ApiError(
            400,
            f"model {self.name!r} is {what}; /v1/{endpoint} does not serve it; {use}",
            param="model",
            code="wrong_model_kind",
        )

    def chat_prompt(self, messages: list[dict[str, str]]) -> Any:
        """What to submit for chat ``messages``: the graph renders them itself when its
        generate node is the entry (or its encoder renders them, as the LM graphs do);
        the rendered text otherwise.

        Raises:
            ApiError: 400 when the model has no chat template or the template failed.
        """
        config = self.generation
        if config is None or not config.has_chat_template:
            raise ApiError(
                400,
                f"model {self.name!r} has no chat template, so it cannot answer "
                "/v1/chat/completions; use /v1/completions with a prompt",
                param="messages",
                code="no_chat_template",
            )
        try:
            rendered = config.render_chat(messages)
        except InvalidRequest as exc:
            raise ApiError(400, f"model {self.name!r}: {exc}", param="messages") from None
        if isinstance(rendered, str) and not self.entry_generates:
            return rendered
        return messages

    def count(self, prompt: Any) -> int:
        """Prompt tokens of a graph that does not report them (``count_tokens``)."""
        if isinstance(prompt, str):
            return self.count_tokens(prompt)
        return sum(self.count_tokens(m["content"]) for m in prompt)
