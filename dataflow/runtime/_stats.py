"""Figures of a running graph: per request outcome, per node, per edge, and the bottleneck.

Counters are plain attributes bumped by the workers and channels (no locks, no clock
reads on the fast path beyond one pair per wake-up); this module only reads them.

Busy time is the time a replica spends in its body (a batch, a generator step), not the
time it waits for input or for room downstream, so a node blocked behind a slow one does
not look busy. A node's *busy fraction* is busy time over wall time, per replica.
"""

from __future__ import annotations

import time
from typing import Any

from ._channel import Channel
from ._request import RequestCounters
from ._scheduler import Scheduler

__all__ = ["bottleneck", "node_busy", "percentile", "snapshot"]

# An input edge counts as full when its producers spent at least this share of the
# window blocked on it (or it is at capacity right now).
_FULL_BLOCKED_SHARE = 0.05


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
    ``bottleneck`` is :func:`bottleneck` of this snapshot since the engine started.
    """
    now = time.perf_counter()
    nodes: dict[str, Any] = {}
    for name, runner in scheduler.runners.items():
        for replica in runner.replica_objs:
            replica.report_stats()
        st = runner.stats
        elapsed = max(now - st.started, 1e-9)
        service = list(st.service)
        nodes[name] = {
            "kind": runner.node.kind,
            "placement": runner.placement,
            "replicas": runner.replicas,
            "items_in": st.items_in,
            "items_out": st.items_out,
            # Items taken in that neither failed nor were dropped (those being worked
            # on right now included): per item, not per request.
            "succeeded": max(0, st.items_in - st.failed - st.cancelled),
            "failed": st.failed,
            "cancelled": st.cancelled,
            "uptime_s": elapsed,
            "busy_s": list(st.busy_s),
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
    snap: dict[str, Any] = {
        "graph": graph_name,
        "requests": counters.as_dict(),
        "nodes": nodes,
        "edges": edges,
        "items_inside": scheduler.items_inside(),
    }
    snap["bottleneck"] = bottleneck(snap)
    return snap


def _channel(ch: Channel[Any]) -> dict[str, Any]:
    return {
        "capacity": ch.capacity,
        "depth": len(ch),
        "max_depth": ch.stats.max_depth,
        "items": ch.stats.items,
        "blocked_s": ch.stats.blocked_s,
        "starved_s": ch.stats.starved_s,
    }


def node_busy(snap: dict[str, Any], since: dict[str, Any] | None = None) -> dict[str, float]:
    """Mean busy fraction of each node's replicas, over the window between ``since`` and
    ``snap`` (two :func:`snapshot` results; ``since=None``: since the engine started)."""
    out: dict[str, float] = {}
    for name, node in snap["nodes"].items():
        before = since["nodes"][name] if since is not None else None
        window = node["uptime_s"] - (before["uptime_s"] if before else 0.0)
        busy = node["busy_s"]
        if before:
            busy = [b - a for a, b in zip(before["busy_s"], busy, strict=True)]
        share = sum(busy) / (max(window, 1e-9) * max(1, len(busy)))
        out[name] = min(1.0, max(0.0, share))
    return out


def bottleneck(snap: dict[str, Any], since: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The node that limits throughput, from one snapshot (or the window since another).

    The bottleneck is the busiest node among those whose input edges are full
    (producers blocked on them for a noticeable share of the window, or at capacity now):
    work piles up in front of it and it is working, not waiting. If no edge is full the
    graph is not saturated (the callers send less than it can take); the busiest node is
    named with ``saturated: False``.

    Returns:
        ``{"node", "busy", "input_full", "input_blocked_s", "saturated", "reason"}``,
        or None for a graph with no nodes.
    """
    busy = node_busy(snap, since)
    if not busy:
        return None
    uptime = max((n["uptime_s"] for n in snap["nodes"].values()), default=0.0)
    window = uptime - (
        max((n["uptime_s"] for n in since["nodes"].values()), default=0.0) if since else 0.0
    )
    blocked: dict[str, float] = {}
    full: dict[str, bool] = {}
    for edge, figures in snap["edges"].items():
        down = edge.rsplit("->", 1)[1]
        b = figures["blocked_s"] - (since["edges"][edge]["blocked_s"] if since else 0.0)
        blocked[down] = blocked.get(down, 0.0) + b
        at_capacity = figures["depth"] >= figures["capacity"]
        full[down] = (
            full.get(down, False) or at_capacity or b >= _FULL_BLOCKED_SHARE * max(window, 1e-9)
        )
    pressed = [name for name in busy if full.get(name)]
    saturated = bool(pressed)
    pool = pressed or list(busy)
    name = max(pool, key=lambda n: (busy[n], blocked.get(n, 0.0)))
    if saturated:
        reason = (
            f"{name!r} is {busy[name]:.0%} busy and its input is full "
            f"(producers blocked {blocked.get(name, 0.0):.3f}s)"
        )
    else:
        reason = (
            f"no edge is full: the graph keeps up with its callers; busiest node "
            f"{name!r} at {busy[name]:.0%}"
        )
    return {
        "node": name,
        "busy": busy[name],
        "input_full": bool(full.get(name)),
        "input_blocked_s": blocked.get(name, 0.0),
        "saturated": saturated,
        "reason": reason,
    }
