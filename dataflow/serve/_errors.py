"""OpenAI-style error bodies, and the HTTP status each engine outcome maps to.

Every error the app answers has the same JSON shape, the one OpenAI clients parse::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": null}}

The message is always short and written here; a traceback never reaches a response (it
goes to the ``dataflow.serve`` logger instead).
"""

from __future__ import annotations

import logging
import math
from asyncio import CancelledError
from typing import Any

from .._errors import DataflowError, EngineClosed, InvalidRequest, NodeError, Overloaded

__all__ = ["ApiError", "error_body", "from_exception", "retry_headers", "unwrap"]

log = logging.getLogger("dataflow.serve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered to the client as an OpenAI-style error object.

    Attributes:
        status: the HTTP status.
        message: a short, human-readable explanation.
        param: the request field at fault, if one is.
        code: a machine-readable code (``"overloaded"``, ``"body_too_large"``...).
        headers: extra response headers (``Retry-After`` for 429).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON object of an error response."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _cancelled(exc: BaseException) -> bool:
    # asyncio's CancelledError or trio's Cancelled (not importable without trio)
    return isinstance(exc, CancelledError) or type(exc).__name__ == "Cancelled"


def unwrap(exc: BaseException) -> BaseException:
    """The error an exception group stands for: its first leaf that is not a
    cancellation (a task group of several prompts wraps the one that failed)."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not _cancelled(e)]
        exc = (leaves or list(exc.exceptions))[0]
    return exc


def retry_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1, as HTTP wants) and ``retry-after-ms``
    (what the OpenAI clients read first)."""
    return {
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, round(seconds * 1000))),
    }


def from_exception(exc: BaseException, *, model: str, retry_after: float) -> ApiError:
    """The answer to an exception raised by an engine call for ``model``.

    ``Overloaded`` -> 429 with ``Retry-After``; a deadline -> 504; ``InvalidRequest`` ->
    400; ``NodeError`` -> 500 naming the node; ``EngineClosed`` -> 503; anything else ->
    500 with a generic message (and the traceback in the log).
    """
    exc = unwrap(exc)
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Overloaded):
        headers = retry_headers(retry_after)
        return ApiError(
            429,
            f"model {model!r} is at its limit of requests in flight; "
            f"retry after {headers['Retry-After']} s",
            code="overloaded",
            headers=headers,
        )
    if isinstance(exc, TimeoutError):
        return ApiError(504, f"model {model!r}: the request passed its deadline", code="timeout")
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), code="invalid_request")
    if isinstance(exc, NodeError):
        cause = exc.__cause__
        what = f" ({type(cause).__name__})" if cause is not None else ""
        log.error("model %r: %s", model, exc, exc_info=exc)
        return ApiError(500, f"model {model!r}: node {exc.node!r} failed{what}", code="node_error")
    if isinstance(exc, EngineClosed):
        return ApiError(503, f"model {model!r} is not running", code="engine_closed")
    if isinstance(exc, DataflowError):
        log.error("model %r: %s", model, exc, exc_info=exc)
        return ApiError(500, f"model {model!r}: {type(exc).__name__}", code="engine_error")
    log.error("model %r: unexpected error", model, exc_info=exc)
    return ApiError(500, "internal error", code="internal_error")
