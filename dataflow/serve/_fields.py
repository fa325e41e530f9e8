"""Field checks for request bodies: each raises :class:`ApiError` (400) naming the field.

Pure functions over parsed JSON; the parsers in ``_openai`` and ``_chat`` compose them.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ._errors import ApiError

__all__ = [
    "MAX_INPUTS",
    "MAX_MESSAGES",
    "bad",
    "check_object",
    "check_text",
    "integer",
    "model_name",
    "number",
    "stops",
    "texts",
    "truth",
]

# OpenAI's own limit for embedding inputs; also the most prompts of one completion.
MAX_INPUTS = 2048
MAX_MESSAGES = 2048
MAX_STOPS = 4

# A JSON string escape of a UTF-16 surrogate: only then can a parsed str hold a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def check_object(body: Any, allowed: frozenset[str], what: str) -> dict[str, Any]:
    """``body`` as a JSON object of ``allowed`` fields only (an unknown field is a 400
    naming it, as OpenAI answers ``Unrecognized request argument``)."""
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


def model_name(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' is required and must be a non-empty string")
    return model


def integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(name, f"{name!r} must be an integer, got {type(value).__name__}")
    if low is not None and value < low:
        raise bad(name, f"{name!r} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise bad(name, f"{name!r} must be <= {high}, got {value}")
    return value


def number(name: str, value: Any, low: float, high: float = math.inf) -> float:
    """A finite number in ``[low, high]`` (``Infinity`` and ``NaN`` are refused)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise bad(name, f"{name!r} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise bad(name, f"{name!r} must be between {low:g} and {high:g}, got {value}")
    return float(value)


def truth(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad(name, f"{name!r} must be true or false, got {type(value).__name__}")
    return value


def check_text(name: str, text: str) -> str:
    """``text`` if it is valid Unicode (no lone surrogate such as ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(
            name,
            f"{name!r} holds a lone UTF-16 surrogate at character {exc.start}; send valid Unicode",
            code="invalid_text",
        ) from None
    return text


def texts(name: str, value: Any, limit: int = MAX_INPUTS) -> list[str]:
    """A string or a non-empty list of at most ``limit`` non-empty strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise bad(name, f"{name!r} must be a string or a non-empty list of strings")
    if len(items) > limit:
        raise bad(
            name, f"{name!r} holds {len(items)} items; at most {limit} per request", "too_many"
        )
    for i, item in enumerate(items):
        where = f"{name}[{i}]" if len(items) > 1 else name
        if not isinstance(item, str):
            if isinstance(item, int | list):
                raise bad(name, f"{name!r}: token arrays are not supported; send text")
            raise bad(where, f"{where!r} must be text")
        if not item:
            raise bad(where, f"{where!r} must not be empty")
        check_text(where, item)
    return items


def stops(name: str, value: Any) -> str | list[str]:
    """``stop``: a non-empty string or a list of 1 to 4 of them."""
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list)
        or not 1 <= len(items) <= MAX_STOPS
        or not all(isinstance(s, str) and s for s in items)
    ):
        raise bad(name, f"{name!r} must be a non-empty string or a list of 1 to 4 of them")
    for s in items:
        check_text(name, s)
    return value  # type: ignore[no-any-return]


def has_surrogate_escape(data: bytes) -> bool:
    """Whether a raw JSON body may hold a lone surrogate (then walk it with
    :func:`find_lone_surrogate`)."""
    return _SURROGATE_ESCAPE.search(data) is not None


def find_lone_surrogate(value: Any, where: str = "body") -> str | None:
    """The path of the first string in ``value`` holding a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = find_lone_surrogate(k, where) or find_lone_surrogate(v, f"{where}.{k}")
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = find_lone_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None
