"""Writing OpenAI-style response bodies: completions, chat completions, their stream
chunks, logprobs, usage and embeddings.

Stream frames of plain text are the hot path: :class:`Frames` serialises the fields that
never change within a response (id, object, created, model) once, and per token only the
text is escaped.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
import uuid
from collections.abc import Sequence
from typing import Any

from ..graph import TokenLogprob

__all__ = [
    "Frames",
    "chat_logprobs",
    "completion_logprobs",
    "embedding_response",
    "new_id",
    "to_jsonable",
    "usage",
]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def usage(prompt_tokens: int, completion_tokens: int | None = None) -> dict[str, int]:
    if completion_tokens is None:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``{"content": [...], "refusal": null}``."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": _token_bytes(e.token),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": _token_bytes(t)} for t, _, lp in e.top
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object (tokens, token_logprobs, top_logprobs,
    text_offset); ``offset`` is the text length before these tokens."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for t, _, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


class Frames:
    """The JSON of one response's objects, constant fields serialised once.

    ``chat`` selects ``chat.completion(.chunk)`` shapes, else ``text_completion``.
    """

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.model = model
        obj = "chat.completion.chunk" if chat else "text_completion"
        fingerprint = ',"system_fingerprint":null' if chat else ""
        self._head = (
            f'data: {{"id":"{self.id}","object":"{obj}","created":{self.created},'
            f'"model":{dumps(model)}{fingerprint},"choices":[{{"index":'
        ).encode()
        self._usage_null = False
        self._tail = b',"logprobs":null,"finish_reason":null}]}\n\n'

    def null_usage(self) -> None:
        """With ``include_usage``, every chunk carries ``"usage": null`` (as OpenAI)."""
        self._usage_null = True
        self._tail = b',"logprobs":null,"finish_reason":null}],"usage":null}\n\n'

    # -- stream frames -----------------------------------------------------------------
    def text(self, index: int, text: str) -> bytes:
        """The frame of plain new text for choice ``index`` (the hot path)."""
        body = dumps(text)
        key = '"delta":{"content":' + body + "}" if self.chat else '"text":' + body
        return self._head + f"{index},{key}".encode() + self._tail

    def chunk(
        self,
        index: int,
        text: str | None,
        *,
        logprobs: dict[str, Any] | None = None,
        finish: str | None = None,
        role: bool = False,
    ) -> bytes:
        """Any frame for choice ``index``: the role opener, text with logprobs, the end."""
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish
        obj = self._object(self.chat and "chat.completion.chunk")
        obj["choices"] = [choice]
        if self._usage_null:
            obj["usage"] = None
        return b"data: " + dumps(obj).encode() + b"\n\n"

    def usage_frame(self, counts: dict[str, int]) -> bytes:
        """The trailing chunk of ``include_usage``: no choices, the request's usage."""
        obj = self._object(self.chat and "chat.completion.chunk")
        obj["choices"] = []
        obj["usage"] = counts
        return b"data: " + dumps(obj).encode() + b"\n\n"

    def _object(self, kind: str | bool) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": kind or "text_completion",
            "created": self.created,
            "model": self.model,
        }
        if self.chat:
            obj["system_fingerprint"] = None
        return obj

    # -- whole responses ---------------------------------------------------------------
    def response(self, choices: list[dict[str, Any]], counts: dict[str, int]) -> dict[str, Any]:
        """The non-streaming answer; ``choices`` hold ``text``, ``logprobs`` (entries or
        None) and ``finish_reason``."""
        obj = self._object("chat.completion" if self.chat else "text_completion")
        out = []
        for i, c in enumerate(choices):
            entries = c["logprobs"]
            if self.chat:
                out.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": c["text"], "refusal": None},
                        "logprobs": None if entries is None else chat_logprobs(entries),
                        "finish_reason": c["finish_reason"],
                    }
                )
            else:
                out.append(
                    {
                        "index": i,
                        "text": c["text"],
                        "logprobs": None if entries is None else completion_logprobs(entries),
                        "finish_reason": c["finish_reason"],
                    }
                )
        obj["choices"] = out
        obj["usage"] = counts
        return obj


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
