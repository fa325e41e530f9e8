"""Reading OpenAI-style request bodies into checked requests.

The parsers turn a JSON body into a checked request or raise :class:`ApiError` (400)
naming the field at fault. OpenAI sampling fields become the graph's own per-request
parameters (``max_tokens`` -> ``max_new_tokens`` ...), collected in ``params`` (always
handed to the engine as ``params=``, never as keyword arguments, so a field can never
reach an engine argument).

Unknown fields are a 400 naming the field (what OpenAI itself answers: "Unrecognized
request argument supplied"); a known field the graph cannot honour is a 400 too, unless
its value is the neutral one (``top_p: 1``, ``n: 1``, penalties ``0`` ...), so a client
never believes a setting took effect when it did not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._fields import (
    MAX_INPUTS,
    MAX_MESSAGES,
    bad,
    check_object,
    check_text,
    integer,
    model_name,
    number,
    stops,
    texts,
    truth,
)

__all__ = [
    "EmbeddingRequest",
    "GenRequest",
    "ModelInfo",
    "RunRequest",
    "parse_chat",
    "parse_completion",
    "parse_embedding",
    "parse_run",
]

MAX_N = 16
MAX_SEQUENCES = 2048  # prompts x n in one request
MAX_LOGPROBS = 20
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class ModelInfo(Protocol):
    """What parsing needs to know of a served model."""

    name: str
    detailed: bool  # a generate node at the exit: n, logprobs, exact token counts

    def takes(self, param: str) -> bool: ...


Lookup = Callable[[str, str], ModelInfo]

# OpenAI field -> graph parameter names to try, in order.
_SAMPLING: dict[str, tuple[str, ...]] = {
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "top_k": ("top_k",),
    "seed": ("seed",),
    "stop": ("stop",),
    "presence_penalty": ("presence_penalty",),
    "frequency_penalty": ("frequency_penalty",),
}
# The value that changes nothing: accepted even by a graph without the parameter.
_NEUTRAL_SAMPLING: dict[str, Any] = {
    "top_p": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
_COMMON = frozenset(
    {"model", "stream", "stream_options", "user", "n", "max_tokens", *_SAMPLING, "logit_bias"}
)
# Completions-only fields accepted at the value that means "off".
_COMPLETION_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
}
_CHAT_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "parallel_tool_calls": (True, False),
    "store": (False,),
    "modalities": (["text"],),
}
_COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", *_COMPLETION_NEUTRAL}
_CHAT_FIELDS = _COMMON | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "metadata",
    *_CHAT_NEUTRAL,
}
_EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
_RUN_FIELDS = frozenset({"input", "params", "timeout", "stream"})


@dataclass
class GenRequest:
    """A checked ``/v1/completions`` or ``/v1/chat/completions`` body.

    ``prompts`` are strings (completions) or one list of messages (chat); choice ``i * n +
    k`` of the answer is sequence ``k`` of prompt ``i``.
    """

    model: str
    chat: bool
    prompts: list[Any]
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    max_tokens: int | None = None
    logprobs: int | None = None  # top alternatives per token (0: the chosen token only)
    user: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


def _given(body: dict[str, Any], name: str) -> Any:
    return body.get(name)  # JSON null is "not given", as OpenAI treats it


def _neutral(body: dict[str, Any], table: dict[str, tuple[Any, ...]]) -> None:
    for name, neutral in table.items():
        value = _given(body, name)
        if value is not None and value not in neutral:
            raise bad(name, f"{name!r} is not supported here (only {neutral[0]!r})")


def _open(
    body: Any, lookup: Lookup, endpoint: str, allowed: frozenset[str], texts_field: str
) -> tuple[dict[str, Any], ModelInfo]:
    body = check_object(body, allowed, f"/v1/{endpoint}")
    model = model_name(body)
    if texts_field not in body or body[texts_field] is None:
        raise bad(texts_field, f"{texts_field!r} is required")
    return body, lookup(model, endpoint)


def _common(body: dict[str, Any], model: ModelInfo, req: GenRequest, max_tokens: Any) -> None:
    """Fields both generation endpoints share: stream, usage, n, limits and sampling."""
    stream = _given(body, "stream")
    req.stream = stream is not None and truth("stream", stream)
    options = _given(body, "stream_options")
    if options is not None:
        if not req.stream:
            raise bad("stream_options", "'stream_options' is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options", "'stream_options' accepts only {'include_usage': bool}")
        usage = options.get("include_usage")
        req.include_usage = usage is not None and truth("stream_options.include_usage", usage)
    bias = _given(body, "logit_bias")
    if bias is not None and bias != {}:
        raise bad("logit_bias", "'logit_bias' is not supported here (only {})")
    user = _given(body, "user")
    if user is not None:
        if not isinstance(user, str):
            raise bad("user", "'user' must be a string")
        req.user = user
    n = _given(body, "n")
    if n is not None:
        req.n = integer("n", n, 1, MAX_N)
        if req.n > 1:
            if not (model.detailed and model.takes("n")):
                raise bad(
                    "n", f"'n' must be 1: model {model.name!r} generates one sequence per prompt"
                )
            req.params["n"] = req.n
    if req.n * len(req.prompts) > MAX_SEQUENCES:
        raise bad("n", f"prompts x n is {req.n * len(req.prompts)}; at most {MAX_SEQUENCES}")
    if max_tokens is not None:
        req.max_tokens = integer("max_tokens", max_tokens, 1)
        target = next((t for t in ("max_new_tokens", "max_tokens") if model.takes(t)), None)
        if target is None:
            raise bad("max_tokens", f"model {model.name!r} does not support 'max_tokens'")
        req.params[target] = req.max_tokens
    for name, targets in _SAMPLING.items():
        value = _given(body, name)
        if value is None:
            continue
        value = _sampling_value(name, value)
        target = next((t for t in targets if model.takes(t)), None)
        if target is None:
            if name in _NEUTRAL_SAMPLING and value == _NEUTRAL_SAMPLING[name]:
                continue  # nothing to apply
            raise bad(name, f"model {model.name!r} does not support {name!r}")
        req.params[target] = value


def _sampling_value(name: str, value: Any) -> Any:
    if name == "top_k":
        return integer(name, value, 0)
    if name == "seed":
        return integer(name, value)
    if name == "temperature":
        return number(name, value, 0.0, 2.0)
    if name == "top_p":
        return number(name, value, 0.0, 1.0)
    if name in ("presence_penalty", "frequency_penalty"):
        return number(name, value, -2.0, 2.0)
    return stops(name, value)


def _want_logprobs(model: ModelInfo, req: GenRequest, top: int, param: str) -> None:
    if not (model.detailed and model.takes("logprobs")):
        raise bad(param, f"model {model.name!r} does not report logprobs")
    req.logprobs = top
    req.params["logprobs"] = top


def parse_completion(body: Any, lookup: Lookup) -> GenRequest:
    """Check a ``/v1/completions`` body; ``lookup(model, endpoint)`` finds the model.

    Raises:
        ApiError: 400 naming the field; 404 an unknown model (from ``lookup``).
    """
    body, model = _open(body, lookup, "completions", _COMPLETION_FIELDS, "prompt")
    req = GenRequest(model.name, False, list(texts("prompt", body["prompt"])))
    _neutral(body, _COMPLETION_NEUTRAL)
    _common(body, model, req, _given(body, "max_tokens"))
    logprobs = _given(body, "logprobs")
    if logprobs is not None:
        _want_logprobs(model, req, integer("logprobs", logprobs, 0, MAX_LOGPROBS), "logprobs")
    return req


def _messages(value: Any) -> list[dict[str, str]]:
    """Chat messages as ``[{"role", "content"}]`` with text content (parts joined)."""
    if not isinstance(value, list) or not value:
        raise bad("messages", "'messages' must be a non-empty list of message objects")
    if len(value) > MAX_MESSAGES:
        raise bad("messages", f"'messages' holds {len(value)} messages; at most {MAX_MESSAGES}")
    out: list[dict[str, str]] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, f"{where!r} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"{where}.role must be one of {', '.join(sorted(ROLES))}")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise bad(f"{where}.content[{j}]", "only text content parts are supported here")
                text = part.get("text")
                if not isinstance(text, str):
                    raise bad(f"{where}.content[{j}].text", "a text part needs 'text': a string")
                parts.append(text)
            content = "".join(parts)
        elif content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"{where}.content must be a string or text parts")
        for extra in message:
            if extra not in ("role", "content", "name"):
                raise bad(f"{where}.{extra}", f"{where}.{extra} is not supported here")
        out.append({"role": role, "content": check_text(f"{where}.content", content)})
    return out


def parse_chat(body: Any, lookup: Lookup) -> GenRequest:
    """Check a ``/v1/chat/completions`` body.

    Raises:
        ApiError: 400 naming the field; 404 an unknown model (from ``lookup``).
    """
    body, model = _open(body, lookup, "chat/completions", _CHAT_FIELDS, "messages")
    req = GenRequest(model.name, True, [_messages(body["messages"])])
    _neutral(body, _CHAT_NEUTRAL)
    metadata = _given(body, "metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad("metadata", "'metadata' must be an object")
    limit = _given(body, "max_completion_tokens")
    if limit is None:
        limit = _given(body, "max_tokens")
    elif _given(body, "max_tokens") not in (None, limit):
        raise bad("max_tokens", "'max_tokens' and 'max_completion_tokens' differ; send one")
    _common(body, model, req, limit)
    logprobs = _given(body, "logprobs")
    top = _given(body, "top_logprobs")
    if logprobs is not None and truth("logprobs", logprobs):
        top = 0 if top is None else integer("top_logprobs", top, 0, MAX_LOGPROBS)
        _want_logprobs(model, req, top, "logprobs")
    elif top is not None:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return req


@dataclass
class EmbeddingRequest:
    """A checked ``POST /v1/embeddings`` body."""

    model: str
    inputs: list[str]
    base64: bool = False
    params: dict[str, Any] = field(default_factory=dict)


def parse_embedding(body: Any, lookup: Lookup) -> EmbeddingRequest:
    """Check an embeddings body (at most 2,048 inputs, as OpenAI).

    Raises:
        ApiError: 400 naming the field; 404 for an unknown model.
    """
    body, model = _open(body, lookup, "embeddings", _EMBEDDING_FIELDS, "input")
    req = EmbeddingRequest(model.name, texts("input", body["input"], MAX_INPUTS))
    fmt = _given(body, "encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise bad("encoding_format", "'encoding_format' must be 'float' or 'base64'")
    req.base64 = fmt == "base64"
    user = _given(body, "user")
    if user is not None and not isinstance(user, str):
        raise bad("user", "'user' must be a string")
    dims = _given(body, "dimensions")
    if dims is not None:
        if not model.takes("dimensions"):
            raise bad("dimensions", f"model {model.name!r} does not support 'dimensions'")
        req.params["dimensions"] = integer("dimensions", dims, 1)
    return req


@dataclass
class RunRequest:
    """A checked ``POST /v1/graphs/{name}/run`` body."""

    input: Any
    params: dict[str, Any]
    timeout: float | None
    stream: bool


def parse_run(body: Any, model: ModelInfo) -> RunRequest:
    """Check a generic run body: ``{"input": ..., "params": {...}, "timeout": s}``.

    ``params`` are the graph's per-request parameters (any names, ``timeout`` included:
    they never become engine arguments); ``timeout`` may only shorten the server's own.

    Raises:
        ApiError: 400 naming the field.
    """
    body = check_object(body, _RUN_FIELDS, f"/v1/graphs/{model.name}/run")
    if "input" not in body:
        raise bad("input", "'input' is required")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise bad("params", "'params' must be a JSON object")
    for key in params:
        if not model.takes(key):
            raise bad(f"params.{key}", f"model {model.name!r} has no parameter {key!r}")
    timeout = body.get("timeout")
    if timeout is not None:
        timeout = number("timeout", timeout, 0.0)
        if timeout == 0:
            raise bad("timeout", "'timeout' must be > 0 seconds")
    stream = body.get("stream")
    return RunRequest(
        body["input"], params, timeout, stream is not None and truth("stream", stream)
    )
