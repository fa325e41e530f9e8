"""Prometheus metrics of the served engines, read from ``engine.stats()`` at scrape time.

Nothing is counted on the request path: the collector turns each engine's own figures
into metric families when ``/metrics`` is scraped, so serving pays nothing for metrics.
HTTP responses are counted by a small ASGI middleware (one counter increment each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine import Engine

__all__ = ["EngineCollector", "HttpMetrics", "new_registry"]

_OUTCOMES = ("succeeded", "failed", "cancelled", "timed_out")


class EngineCollector(Collector):
    """Requests by outcome, in flight, per-node latency and items, per-edge queue depth."""

    def __init__(self, engines: Callable[[], Mapping[str, Engine]]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "dataflow_requests", "Requests by outcome", labels=["model", "outcome"]
        )
        in_flight = GaugeMetricFamily(
            "dataflow_requests_in_flight", "Requests inside the engine", labels=["model"]
        )
        service = GaugeMetricFamily(
            "dataflow_node_service_seconds",
            "Per-item service time of a node (recent quantiles)",
            labels=["model", "node", "quantile"],
        )
        items = CounterMetricFamily(
            "dataflow_node_items", "Items through a node", labels=["model", "node", "direction"]
        )
        failed = CounterMetricFamily(
            "dataflow_node_failures", "Items a node failed on", labels=["model", "node"]
        )
        depth = GaugeMetricFamily(
            "dataflow_edge_queue_depth", "Items waiting on an edge", labels=["model", "edge"]
        )
        capacity = GaugeMetricFamily(
            "dataflow_edge_capacity", "Capacity of an edge", labels=["model", "edge"]
        )
        for model, engine in self._engines().items():
            stats: dict[str, Any] = engine.stats()
            counts = stats["requests"]
            for outcome in _OUTCOMES:
                requests.add_metric([model, outcome], counts[outcome])
            in_flight.add_metric([model], counts["in_flight"])
            for node, st in stats.get("nodes", {}).items():
                service.add_metric([model, node, "0.5"], st["service_p50_s"])
                service.add_metric([model, node, "0.99"], st["service_p99_s"])
                items.add_metric([model, node, "in"], st["items_in"])
                items.add_metric([model, node, "out"], st["items_out"])
                failed.add_metric([model, node], st["failed"])
            for edge, st in stats.get("edges", {}).items():
                depth.add_metric([model, edge], st["depth"])
                capacity.add_metric([model, edge], st["capacity"])
        yield from (requests, in_flight, service, items, failed, depth, capacity)


def new_registry(engines: Callable[[], Mapping[str, Engine]]) -> CollectorRegistry:
    """A registry of its own per app, so two apps in one process do not collide."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engines))
    return registry


def _route(path: str) -> str:
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
