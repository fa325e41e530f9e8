"""An optional API key: ``Authorization: Bearer <key>`` on every route but the open ones.

``create_app(api_key=...)`` (or ``dataflow serve --api-key``, or the ``DATAFLOW_API_KEY``
environment variable) turns it on. The key is compared in constant time
(:func:`hmac.compare_digest`); a missing or wrong key is a 401 with an OpenAI-style
error body and ``WWW-Authenticate: Bearer``. ``/healthz`` (for load balancers) and the
dashboard page at ``/`` and its ``/static/`` assets (which hold no data) stay open.

Other modules' routes use :func:`authorized` (a request's headers against the app's key)
or rely on :class:`ApiKeyAuth`, the middleware that checks every HTTP request.
"""

from __future__ import annotations

import hmac
import os

from starlette.types import ASGIApp, Receive, Scope, Send

from ._asgi import send_error
from ._errors import ApiError

__all__ = [
    "ENV_VAR",
    "OPEN_PATHS",
    "OPEN_PREFIXES",
    "ApiKeyAuth",
    "authorized",
    "key_from_env",
    "unauthorized",
]

ENV_VAR = "DATAFLOW_API_KEY"
OPEN_PATHS = frozenset({"/healthz", "/"})
OPEN_PREFIXES = ("/static/",)  # the dashboard page's assets


def key_from_env() -> str | None:
    """The key in ``DATAFLOW_API_KEY``, or None when it is unset or empty."""
    return os.environ.get(ENV_VAR) or None


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def authorized(headers: list[tuple[bytes, bytes]], api_key: str | None) -> bool:
    """Whether raw ASGI ``headers`` carry ``api_key`` as a bearer token (always True
    when no key is set). Constant time in the token's content."""
    if api_key is None:
        return True
    token = _bearer(headers)
    if token is None:
        return False
    return hmac.compare_digest(token, api_key.encode("utf-8"))


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "missing or invalid API key: send 'Authorization: Bearer <key>'",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


class ApiKeyAuth:
    """ASGI middleware: a 401 for an HTTP request without the key (except ``open_paths``;
    CORS preflight ``OPTIONS`` requests pass, as browsers send them without credentials)."""

    def __init__(
        self, app: ASGIApp, api_key: str | None, open_paths: frozenset[str] = OPEN_PATHS
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.api_key is None
            or scope["type"] != "http"
            or scope["path"] in self.open_paths
            or scope["path"].startswith(OPEN_PREFIXES)
            or scope["method"] == "OPTIONS"
            or authorized(scope["headers"], self.api_key)
        ):
            await self.app(scope, receive, send)
            return
        await send_error(send, unauthorized())
