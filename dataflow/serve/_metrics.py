"""Metrics of the app: the engines' figures (``dataflow.metrics``, read from
``engine.stats()`` at scrape time), HTTP responses by route and status, and per model:
requests by status, prompt and completion tokens, and latency histograms (time to first
token, inter-token latency, end-to-end, queue time).

A small ASGI middleware counts every response, a 500 from an unhandled error included
(it sees the error on its way out, before Starlette's error handler answers it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine import Engine
from ..metrics import make_registry

__all__ = ["HttpMetrics", "ModelMetrics", "new_registry", "set_model"]

# seconds: from 1 ms to 2 min
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)
_ITL = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_MODEL_KEY = "dataflow_model"


def new_registry(engines: list[Engine]) -> CollectorRegistry:
    """A registry of its own per app, so two apps in one process do not collide."""
    return make_registry(*engines)


def set_model(scope: Scope, name: str) -> None:
    """Label this exchange's response with the model it served."""
    scope.setdefault("state", {})[_MODEL_KEY] = name


class ModelMetrics:
    """Per-model request figures, labelled ``model``."""

    def __init__(self, registry: CollectorRegistry, models: Iterable[str]) -> None:
        self.models = frozenset(models)
        label = ["model"]
        self.requests = Counter(
            "dataflow_serve_requests",
            "Requests by model and HTTP status",
            ["model", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "dataflow_serve_prompt_tokens", "Prompt tokens", label, registry=registry
        )
        self.completion_tokens = Counter(
            "dataflow_serve_completion_tokens", "Completion tokens", label, registry=registry
        )
        self.ttft = Histogram(
            "dataflow_serve_time_to_first_token_seconds",
            "Time from the request to its first output",
            label,
            buckets=_LATENCY,
            registry=registry,
        )
        self.itl = Histogram(
            "dataflow_serve_inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence",
            label,
            buckets=_ITL,
            registry=registry,
        )
        self.e2e = Histogram(
            "dataflow_serve_request_seconds",
            "Time from the request to its last output",
            label,
            buckets=_LATENCY,
            registry=registry,
        )
        self.queue = Histogram(
            "dataflow_serve_queue_seconds",
            "Time from the request's arrival until a generate node gave it a slot",
            label,
            buckets=_LATENCY,
            registry=registry,
        )

    def label(self, name: object) -> str:
        # A fixed set of label values: an unknown model must not grow the metric.
        return name if isinstance(name, str) and name in self.models else "none"

    def generation(
        self,
        model: str,
        *,
        queue: float,
        ttft: float | None,
        e2e: float,
        gaps: list[float],
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Record one finished generation request."""
        self.queue.labels(model).observe(queue)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        self.e2e.labels(model).observe(e2e)
        itl = self.itl.labels(model)
        for gap in gaps:
            itl.observe(gap)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)


def _route(path: str) -> str:
    # A fixed set of label values: an unknown path must not grow the metric without bound.
    if path.startswith("/v1/graphs/"):
        return "/v1/graphs/{name}/run"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/models",
        "/healthz",
        "/metrics",
    ):
        return path
    return "other"


class HttpMetrics:
    """ASGI middleware counting responses by route and status (and by model)."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry, models: ModelMetrics) -> None:
        self.app = app
        self.models = models
        self.responses = Counter(
            "dataflow_http_responses",
            "HTTP responses by route and status",
            ["route", "status"],
            registry=registry,
        )
        self._responses: dict[tuple[str, int], Any] = {}
        self._requests: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = _route(scope["path"])
        started = False

        def count(status: int) -> None:
            # Label lookups cost more than the increments: children are cached.
            key = (route, status)
            child = self._responses.get(key)
            if child is None:
                child = self._responses[key] = self.responses.labels(route, str(status))
            child.inc()
            model = scope.get("state", {}).get(_MODEL_KEY)
            if model is not None:
                mkey = (self.models.label(model), status)
                child = self._requests.get(mkey)
                if child is None:
                    child = self._requests[mkey] = self.models.requests.labels(mkey[0], str(status))
                child.inc()

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                count(500)  # Starlette's outer error handler answers it
            raise
