"""Chat messages and chat templates for ``generate`` nodes.

A chat template turns a list of messages (``[{"role": ..., "content": ...}, ...]``) into
the prompt the model continues: a callable ``messages -> str | list[int]``, or a Jinja
template string rendered the way Hugging Face tokenizers render theirs (variables
``messages`` and ``add_generation_prompt=True``, a ``raise_exception(message)`` helper,
sandboxed). Jinja needs ``jinja2`` (a dependency of torch, so always there in practice).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from .._errors import GraphError, InvalidRequest

__all__ = ["ChatTemplate", "check_template", "is_messages", "render"]

ChatTemplate = str | Callable[[list[dict[str, str]]], "str | list[int]"]

MAX_MESSAGES = 4096


def is_messages(value: Any) -> bool:
    """Whether ``value`` looks like chat messages: a non-empty list of mappings."""
    return isinstance(value, list | tuple) and bool(value) and isinstance(value[0], Mapping)


def check_messages(where: str, messages: Any) -> list[dict[str, str]]:
    """Messages as plain ``{"role", "content"}`` dicts; content given as a list of text
    parts (``[{"type": "text", "text": ...}]``) is joined.

    Raises:
        InvalidRequest: not a list of messages with a string role and text content.
    """
    if not isinstance(messages, list | tuple) or not messages:
        raise InvalidRequest(f"{where}: messages must be a non-empty list of messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"{where}: at most {MAX_MESSAGES} messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequest(f"{where}: message {i} is {type(m).__name__}, not an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(f"{where}: message {i} needs a string 'role'")
        out.append({"role": role, "content": _content(where, i, m.get("content"))})
    return out


def _content(where: str, i: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list | tuple):
        parts = []
        for part in content:
            text = part.get("text") if isinstance(part, Mapping) else None
            if not isinstance(text, str) or part.get("type", "text") != "text":
                raise InvalidRequest(
                    f"{where}: message {i} content parts must be text parts "
                    '({"type": "text", "text": ...})'
                )
            parts.append(text)
        return "".join(parts)
    raise InvalidRequest(
        f"{where}: message {i} 'content' must be a string or a list of text parts, "
        f"got {type(content).__name__}"
    )


def check_template(where: str, template: Any) -> None:
    """Raises GraphError unless ``template`` is None, a callable or a valid Jinja string."""
    if template is None or callable(template):
        return
    if not isinstance(template, str) or not template:
        raise GraphError(
            f"{where}: chat_template must be a Jinja template string or a callable "
            "messages -> str | list[int]"
        )
    try:
        _compiled(template)
    except ImportError:
        raise GraphError(f"{where}: a Jinja chat_template needs jinja2 installed") from None
    except Exception as exc:
        raise GraphError(f"{where}: chat_template is not a valid Jinja template: {exc}") from None


def render(where: str, template: ChatTemplate, messages: Any) -> str | list[int]:
    """Render checked ``messages`` with ``template``.

    Raises:
        InvalidRequest: bad messages, or the template raised (its message included).
    """
    checked = check_messages(where, messages)
    try:
        if isinstance(template, str):
            out: Any = _compiled(template).render(messages=checked, add_generation_prompt=True)
        else:
            out = template(checked)
    except InvalidRequest:
        raise
    except Exception as exc:
        raise InvalidRequest(
            f"{where}: the chat template failed on these messages: {exc}"
        ) from None
    if isinstance(out, str):
        return out
    tolist = getattr(out, "tolist", None)
    if callable(tolist):
        out = tolist()
    if isinstance(out, list | tuple) and all(isinstance(t, int) for t in out):
        return list(out)
    raise InvalidRequest(
        f"{where}: the chat template returned {type(out).__name__}, not str or token ids"
    )


@lru_cache(maxsize=32)
def _compiled(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InvalidRequest(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)
