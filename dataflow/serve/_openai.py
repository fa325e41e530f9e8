"""Reading OpenAI-style requests and writing OpenAI-style responses.

The parsers turn a JSON body into a checked request or raise :class:`ApiError` (400)
naming the field at fault. OpenAI sampling fields become the graph's own per-request
parameters (``max_tokens`` -> ``max_new_tokens`` ...); a field the graph has no parameter
for is a 400 rather than silently ignored, so a client never believes a setting took
effect when it did not.
"""

from __future__ import annotations

import base64
import math
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._errors import ApiError

__all__ = [
    "CompletionRequest",
    "EmbeddingRequest",
    "RunRequest",
    "as_text",
    "completion_chunk",
    "completion_response",
    "embedding_response",
    "new_id",
    "parse_completion",
    "parse_embedding",
    "parse_run",
    "to_jsonable",
]

Accepts = Callable[[str], bool]

# OpenAI field -> graph parameter names to try, in order.
_SAMPLING: dict[str, tuple[str, ...]] = {
    "max_tokens": ("max_new_tokens", "max_tokens"),
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "top_k": ("top_k",),
    "seed": ("seed",),
    "stop": ("stop",),
    "presence_penalty": ("presence_penalty",),
    "frequency_penalty": ("frequency_penalty",),
}
# Fields accepted only at the value that means "off" (what this server does anyway).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (0,),
    "suffix": ("",),
    "logit_bias": ({},),
}
_COMPLETION_FIELDS = frozenset(
    {"model", "prompt", "stream", "stream_options", "user", *_SAMPLING, *_NEUTRAL}
)
_EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
_RUN_FIELDS = frozenset({"input", "params", "timeout", "stream"})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# -- field checks ---------------------------------------------------------------------
def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _check_object(body: Any, allowed: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the body of {what} must be a JSON object", code="invalid_json")
    for key in body:
        if key not in allowed:
            raise ApiError(
                400,
                f"unknown field {key!r} for {what}; accepted: {', '.join(sorted(allowed))}",
                param=key,
                code="unknown_field",
            )
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "'model' is required and must be a non-empty string")
    return model


def _int(name: str, value: Any, low: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(name, f"{name!r} must be an integer, got {type(value).__name__}")
    if low is not None and value < low:
        raise _bad(name, f"{name!r} must be >= {low}, got {value}")
    return value


def _number(name: str, value: Any, low: float, high: float = math.inf) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        raise _bad(name, f"{name!r} must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise _bad(name, f"{name!r} must be between {low} and {high}, got {value}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, f"{name!r} must be true or false, got {type(value).__name__}")
    return value


def _texts(name: str, value: Any) -> list[str]:
    """A string or a non-empty list of non-empty strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _bad(name, f"{name!r} must be a string or a non-empty list of strings")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            if isinstance(item, int | list):
                raise _bad(name, f"{name!r}: token arrays are not supported; send text")
            raise _bad(f"{name}[{i}]" if len(items) > 1 else name, f"{name!r} must be text")
        if not item:
            raise _bad(name, f"{name!r} must not be empty")
    return items


def _sampling_value(name: str, value: Any) -> Any:
    if name == "max_tokens":
        return _int(name, value, 1)
    if name == "top_k":
        return _int(name, value, 0)
    if name == "seed":
        return _int(name, value)
    if name == "temperature":
        return _number(name, value, 0.0, 2.0)
    if name == "top_p":
        return _number(name, value, 0.0, 1.0)
    if name in ("presence_penalty", "frequency_penalty"):
        return _number(name, value, -2.0, 2.0)
    # stop: a string or up to 4 strings
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= 4
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise _bad(name, "'stop' must be a non-empty string or a list of 1 to 4 of them")
    return value


# -- requests -------------------------------------------------------------------------
def _open_body(
    body: Any,
    accepts: Callable[[str, str], Accepts],
    endpoint: str,
    allowed: frozenset[str],
    texts: str,
) -> tuple[dict[str, Any], str, Accepts, list[str]]:
    """The checks that open both OpenAI bodies, in order: an object of ``allowed`` fields,
    the model, the required ``texts`` field, the model serving ``endpoint``, the texts.

    Returns:
        ``(body, model, the model's parameter test, the texts)``.
    """
    body = _check_object(body, allowed, f"/v1/{endpoint}")
    model = _model(body)
    if texts not in body:
        raise _bad(texts, f"{texts!r} is required")
    takes = accepts(model, endpoint)
    return body, model, takes, _texts(texts, body[texts])


@dataclass
class CompletionRequest:
    """A checked ``POST /v1/completions`` body."""

    model: str
    prompts: list[str]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    params: dict[str, Any] = field(default_factory=dict)


def parse_completion(body: Any, accepts: Callable[[str, str], Accepts]) -> CompletionRequest:
    """Check a completions body. ``accepts(model)`` gives the model's parameter test.

    Raises:
        ApiError: 400 naming the field; 404 for an unknown model (from ``accepts``).
    """
    body, model, takes, prompts = _open_body(
        body, accepts, "completions", _COMPLETION_FIELDS, "prompt"
    )
    req = CompletionRequest(model, prompts)
    stream = body.get("stream")
    req.stream = stream is not None and _bool("stream", stream)
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            raise _bad("stream_options", "'stream_options' is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options", "'stream_options' accepts only {'include_usage': bool}")
        req.include_usage = _bool("stream_options.include_usage", options.get("include_usage"))
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if value is not None and value not in neutral:
            raise _bad(name, f"{name!r} is not supported here (only {neutral[0]!r})")
    for name, targets in _SAMPLING.items():
        value = body.get(name)
        if value is None:
            continue
        value = _sampling_value(name, value)
        target = next((t for t in targets if takes(t)), None)
        if target is None:
            if name.endswith("_penalty") and value == 0:
                continue  # neutral: nothing to apply
            raise _bad(name, f"model {model!r} does not support {name!r}")
        req.params[target] = value
        if name == "max_tokens":
            req.max_tokens = value
    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
        raise _bad("user", "'user' must be a string")
    return req


@dataclass
class EmbeddingRequest:
    """A checked ``POST /v1/embeddings`` body."""

    model: str
    inputs: list[str]
    base64: bool = False
    params: dict[str, Any] = field(default_factory=dict)


def parse_embedding(body: Any, accepts: Callable[[str, str], Accepts]) -> EmbeddingRequest:
    """Check an embeddings body.

    Raises:
        ApiError: 400 naming the field; 404 for an unknown model.
    """
    body, model, takes, inputs = _open_body(body, accepts, "embeddings", _EMBEDDING_FIELDS, "input")
    req = EmbeddingRequest(model, inputs)
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise _bad("encoding_format", "'encoding_format' must be 'float' or 'base64'")
    req.base64 = fmt == "base64"
    dims = body.get("dimensions")
    if dims is not None:
        if not takes("dimensions"):
            raise _bad("dimensions", f"model {model!r} does not support 'dimensions'")
        req.params["dimensions"] = _int("dimensions", dims, 1)
    return req


@dataclass
class RunRequest:
    """A checked ``POST /v1/graphs/{name}/run`` body."""

    input: Any
    params: dict[str, Any]
    timeout: float | None
    stream: bool


def parse_run(body: Any, takes: Accepts, model: str) -> RunRequest:
    """Check a generic run body: ``{"input": ..., "params": {...}, "timeout": s}``.

    Raises:
        ApiError: 400 naming the field.
    """
    body = _check_object(body, _RUN_FIELDS, f"/v1/graphs/{model}/run")
    if "input" not in body:
        raise _bad("input", "'input' is required")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise _bad("params", "'params' must be a JSON object")
    for key in params:
        if not takes(key):
            raise _bad(f"params.{key}", f"model {model!r} has no parameter {key!r}")
    timeout = body.get("timeout")
    if timeout is not None:
        timeout = _number("timeout", timeout, 0.0)
        if timeout == 0:
            raise _bad("timeout", "'timeout' must be > 0 seconds")
    stream = body.get("stream")
    return RunRequest(
        body["input"], params, timeout, stream is not None and _bool("stream", stream)
    )


# -- responses ------------------------------------------------------------------------
def as_text(value: Any) -> str:
    """One output of a text graph as text."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def finish_reason(tokens: int, max_tokens: int | None) -> str:
    return "length" if max_tokens is not None and tokens >= max_tokens else "stop"


def usage(prompt_tokens: int, completion_tokens: int | None = None) -> dict[str, int]:
    if completion_tokens is None:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_response(
    cid: str,
    model: str,
    texts: list[str],
    counts: list[int],
    max_tokens: int | None,
    prompt_tokens: int,
) -> dict[str, Any]:
    """The non-streaming completions answer, with usage counts."""
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason(count, max_tokens),
            }
            for i, (text, count) in enumerate(zip(texts, counts, strict=True))
        ],
        "usage": usage(prompt_tokens, sum(counts)),
    }


def completion_chunk(
    cid: str,
    model: str,
    created: int,
    index: int | None,
    text: str = "",
    reason: str | None = None,
    usage_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One server-sent event of a streaming completion (no choice when ``index`` is None:
    the trailing usage chunk)."""
    choices = (
        []
        if index is None
        else [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]
    )
    chunk: dict[str, Any] = {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_counts is not None:
        chunk["usage"] = usage_counts
    return chunk


def _vector(value: Any) -> list[float]:
    flat = to_jsonable(value)
    if not isinstance(flat, list) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in flat
    ):
        raise TypeError("an embedding graph must return a 1-d vector of numbers")
    return [float(x) for x in flat]


def embedding_response(
    model: str, vectors: list[Any], as_base64: bool, prompt_tokens: int
) -> dict[str, Any]:
    """The embeddings answer; ``as_base64`` packs little-endian float32 as OpenAI does."""
    data: list[dict[str, Any]] = []
    for i, value in enumerate(vectors):
        vec = _vector(value)
        embedding: Any = vec
        if as_base64:
            embedding = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return {"object": "list", "data": data, "model": model, "usage": usage(prompt_tokens)}


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: tensors and arrays become (nested) lists.

    Raises:
        TypeError: something that has no JSON form.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # torch.Tensor, numpy arrays and scalars
    if callable(tolist):
        return to_jsonable(tolist())
    raise TypeError(f"{type(value).__name__} has no JSON form")
