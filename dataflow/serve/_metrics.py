"""Metrics of the app: the engines' figures (``dataflow.metrics``, read from
``engine.stats()`` at scrape time) plus HTTP responses by route and status, counted by a
small ASGI middleware (one counter increment per response)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine import Engine
from ..metrics import make_registry

__all__ = ["HttpMetrics", "new_registry"]


def new_registry(engines: list[Engine]) -> CollectorRegistry:
    """A registry of its own per app, so two apps in one process do not collide."""
    return make_registry(*engines)


def _route(path: str) -> str:
    # A fixed set of label values: an unknown path must not grow the metric without bound.
    if path.startswith("/v1/graphs/"):
        return "/v1/graphs/{name}/run"
    if path in ("/v1/completions", "/v1/embeddings", "/v1/models", "/healthz", "/metrics"):
        return path
    return "other"


class HttpMetrics:
    """ASGI middleware counting responses by route and status."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.responses = Counter(
            "dataflow_http_responses",
            "HTTP responses by route and status",
            ["route", "status"],
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _route(scope["path"])

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.responses.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
