"""Engine figures as Prometheus metrics (extra ``dataflow-engine[metrics]``).

A collector reads :meth:`Engine.stats` when Prometheus scrapes, so the hot path pays
nothing for metrics: no counter objects are touched per item. Every metric carries a
``graph`` label; node metrics add ``node`` (and ``replica``), edge metrics add ``edge``.

    from dataflow.metrics import make_registry, render

    registry = make_registry(engine)            # or EngineCollector(engine).register(r)
    body, content_type = render(registry)       # what a /metrics endpoint returns

Metrics (``_total`` are counters, the rest gauges):

* ``dataflow_requests_total{outcome}`` (submitted, succeeded, failed, cancelled,
  timed_out), ``dataflow_requests_in_flight``
* ``dataflow_node_items_in_total``, ``..._items_out_total``, ``..._items_failed_total``,
  ``..._items_cancelled_total``
* ``dataflow_node_busy_seconds_total{replica}``, ``dataflow_node_busy_ratio{replica}``
* ``dataflow_node_service_seconds{quantile="0.5"|"0.99"}``
* ``dataflow_node_batches_total{size}``, ``dataflow_node_batch_wait_seconds`` (p50)
* ``dataflow_edge_capacity``, ``..._depth``, ``..._max_depth``, ``..._items_total``,
  ``..._blocked_seconds_total``, ``..._starved_seconds_total``
* ``dataflow_bottleneck{node}``: 1 on the node :func:`~dataflow.runtime._stats.bottleneck`
  names, with ``saturated`` "true"/"false".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dataflow.metrics needs prometheus-client: pip install 'dataflow-engine[metrics]'"
    ) from exc

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["EngineCollector", "make_registry", "render"]


class EngineCollector:
    """A Prometheus collector over one or more engines' :meth:`~dataflow.Engine.stats`.

    Args:
        *engines: the engines to report; more can be added with :meth:`add`.
    """

    def __init__(self, *engines: Engine) -> None:
        self.engines: list[Engine] = list(engines)

    def add(self, engine: Engine) -> None:
        """Report ``engine`` too (e.g. one more graph served by the same app)."""
        self.engines.append(engine)

    def register(self, registry: CollectorRegistry) -> EngineCollector:
        """Register with ``registry``; returns self."""
        registry.register(self)
        return self

    def describe(self) -> list[Metric]:
        # Nothing to describe up front: families depend on the engines' graphs, and
        # an empty describe() keeps registration from calling collect() early.
        return []

    def collect(self) -> Iterator[Metric]:
        """One family per metric, with a sample per graph/node/edge."""
        fams = _Families()
        for engine in self.engines:
            stats = engine.stats()
            fams.add_engine(stats)
        yield from fams.all()


_Family = GaugeMetricFamily | CounterMetricFamily


def _keyed(
    labels: list[str], *rows: tuple[str, Callable[..., _Family], str, str]
) -> list[tuple[str, _Family]]:
    """``(stats key, family)`` pairs from ``(stats key, family type, name, help)`` rows."""
    return [(key, make(name, doc, labels=labels)) for key, make, name, doc in rows]


class _Families:
    def __init__(self) -> None:
        g, c = GaugeMetricFamily, CounterMetricFamily
        node = ["graph", "node"]
        replica = ["graph", "node", "replica"]
        edge = ["graph", "edge"]
        self.requests = c("dataflow_requests", "Requests by outcome", labels=["graph", "outcome"])
        self.in_flight = g("dataflow_requests_in_flight", "Requests inside", labels=["graph"])
        # One sample per node, read straight from the node's stats under the key given.
        self.node_counts = _keyed(
            node,
            ("items_in", c, "dataflow_node_items_in", "Items taken in by a node"),
            ("items_out", c, "dataflow_node_items_out", "Items emitted by a node"),
            ("failed", c, "dataflow_node_items_failed", "Items whose body raised"),
            ("cancelled", c, "dataflow_node_items_cancelled", "Items dropped: request ended"),
        )
        self.busy_s = c(
            "dataflow_node_busy_seconds", "Seconds a replica spent in its body", labels=replica
        )
        self.busy = g(
            "dataflow_node_busy_ratio", "Busy share of a replica since start", labels=replica
        )
        self.service = g(
            "dataflow_node_service_seconds",
            "Body call time quantiles (one item, batch or generator step)",
            labels=["graph", "node", "quantile"],
        )
        self.batches = c(
            "dataflow_node_batches", "Batches by size", labels=["graph", "node", "size"]
        )
        self.batch_wait = g(
            "dataflow_node_batch_wait_seconds", "Median wait for a batch to fill", labels=node
        )
        # One sample per edge, likewise.
        self.edge_figures = _keyed(
            edge,
            ("capacity", g, "dataflow_edge_capacity", "Edge capacity"),
            ("depth", g, "dataflow_edge_depth", "Items in an edge now"),
            ("max_depth", g, "dataflow_edge_max_depth", "Most items seen in an edge"),
            ("items", c, "dataflow_edge_items", "Items through an edge"),
            (
                "blocked_s",
                c,
                "dataflow_edge_blocked_seconds",
                "Producer time blocked on a full edge",
            ),
            (
                "starved_s",
                c,
                "dataflow_edge_starved_seconds",
                "Consumer time waiting on an empty edge",
            ),
        )
        self.bottleneck = g(
            "dataflow_bottleneck",
            "1 on the node limiting throughput",
            labels=["graph", "node", "saturated"],
        )

    def add_engine(self, stats: dict[str, Any]) -> None:
        graph = stats["graph"]
        reqs = stats["requests"]
        for outcome in ("submitted", "succeeded", "failed", "cancelled", "timed_out"):
            self.requests.add_metric([graph, outcome], reqs[outcome])
        self.in_flight.add_metric([graph], reqs["in_flight"])
        for name, n in stats.get("nodes", {}).items():
            labels = [graph, name]
            for key, family in self.node_counts:
                family.add_metric(labels, n[key])
            for i, (secs, share) in enumerate(zip(n["busy_s"], n["busy"], strict=True)):
                self.busy_s.add_metric([graph, name, str(i)], secs)
                self.busy.add_metric([graph, name, str(i)], share)
            self.service.add_metric([graph, name, "0.5"], n["service_p50_s"])
            self.service.add_metric([graph, name, "0.99"], n["service_p99_s"])
            for size, count in n["batch_sizes"].items():
                self.batches.add_metric([graph, name, str(size)], count)
            self.batch_wait.add_metric(labels, n["batch_wait_p50_s"])
        for edge, e in stats.get("edges", {}).items():
            labels = [graph, edge]
            for key, family in self.edge_figures:
                family.add_metric(labels, e[key])
        neck = stats.get("bottleneck")
        if neck:
            self.bottleneck.add_metric([graph, neck["node"], str(neck["saturated"]).lower()], 1)

    def all(self) -> list[Metric]:
        """Every family, in the order defined."""
        families: list[Metric] = []
        for value in vars(self).values():
            if isinstance(value, Metric):
                families.append(value)
            else:
                families.extend(family for _, family in value)
        return families


def make_registry(*engines: Engine) -> CollectorRegistry:
    """A fresh registry reporting ``engines`` (the process-wide default one is left alone,
    so two apps in one process do not collide)."""
    registry = CollectorRegistry()
    EngineCollector(*engines).register(registry)
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition of ``registry`` and its content type, for a /metrics route."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
