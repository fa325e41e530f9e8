"""Figures of a running graph: per request outcome, per node, per edge."""

from __future__ import annotations

import time
from typing import Any

from ._channel import Channel
from ._request import RequestCounters
from ._scheduler import Scheduler

__all__ = ["percentile", "snapshot"]


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``samples`` by nearest rank; 0.0 when empty."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[rank]


def snapshot(graph_name: str, scheduler: Scheduler, counters: RequestCounters) -> dict[str, Any]:
    """A JSON-able picture of the engine now.

    ``requests`` balances: ``submitted == succeeded + failed + cancelled + in_flight``.
    """
    now = time.perf_counter()
    nodes: dict[str, Any] = {}
    for name, runner in scheduler.runners.items():
        st = runner.stats
        elapsed = max(now - st.started, 1e-9)
        service = list(st.service)
        nodes[name] = {
            "kind": runner.node.kind,
            "placement": runner.placement,
            "replicas": runner.replicas,
            "items_in": st.items_in,
            "items_out": st.items_out,
            "failed": st.failed,
            "cancelled": st.cancelled,
            "busy": [min(1.0, b / elapsed) for b in st.busy_s],
            "service_p50_s": percentile(service, 0.5),
            "service_p99_s": percentile(service, 0.99),
            "batch_sizes": dict(sorted(st.batch_sizes.items())),
            "batch_wait_p50_s": percentile(list(st.batch_wait), 0.5),
            "pending_parts": runner.pending_parts(),
        }
    edges: dict[str, Any] = {}
    plan = scheduler.plan
    edges[f"input->{plan.source}"] = _channel(scheduler.inboxes[plan.source])
    for name in plan.order:
        for down in plan.downstream[name]:
            edges[f"{name}->{down}"] = _channel(scheduler.inboxes[down])
    return {
        "graph": graph_name,
        "requests": counters.as_dict(),
        "nodes": nodes,
        "edges": edges,
        "items_inside": scheduler.items_inside(),
    }


def _channel(ch: Channel[Any]) -> dict[str, Any]:
    return {
        "capacity": ch.capacity,
        "depth": len(ch),
        "max_depth": ch.stats.max_depth,
        "items": ch.stats.items,
        "blocked_s": ch.stats.blocked_s,
        "starved_s": ch.stats.starved_s,
    }
