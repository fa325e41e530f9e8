"""Prometheus metrics: the engine's figures, read at scrape time."""

from __future__ import annotations

import time

import pytest

import dataflow as df

prometheus_client = pytest.importorskip("prometheus_client")
parser = pytest.importorskip("prometheus_client.parser")

from dataflow.metrics import EngineCollector, make_registry, render  # noqa: E402

pytestmark = pytest.mark.anyio

SLEEP = 0.01


def _graph() -> df.Graph:
    @df.map
    def first(x: int) -> int:
        return x

    @df.map(placement="thread")
    def slow(x: int) -> int:
        time.sleep(SLEEP)  # simulated work in a node body (intended)
        if x == 3:
            raise ValueError("three")
        return x

    return df.Graph("metered", first >> slow)


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in parser.text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_report_requests_nodes_edges_and_bottleneck() -> None:
    async with df.Engine(_graph()) as engine:
        registry = make_registry(engine)
        outs = [r async for r in engine.map(range(6), return_exceptions=True)]
        body, content_type = render(registry)
    assert sum(isinstance(o, df.NodeError) for o in outs) == 1
    assert content_type.startswith("text/plain")
    m = _samples(body)
    g = ("graph", "metered")
    assert m[("dataflow_requests_total", (g, ("outcome", "succeeded")))] == 5
    assert m[("dataflow_requests_total", (g, ("outcome", "failed")))] == 1
    assert m[("dataflow_requests_in_flight", (g,))] == 0
    slow = (g, ("node", "slow"))
    assert m[("dataflow_node_items_in_total", slow)] == 6
    assert m[("dataflow_node_items_failed_total", slow)] == 1
    busy = m[("dataflow_node_busy_seconds_total", (g, ("node", "slow"), ("replica", "0")))]
    assert 6 * SLEEP <= busy < 6 * SLEEP + 0.5  # six bodies that each sleep SLEEP
    p50 = m[("dataflow_node_service_seconds", (g, ("node", "slow"), ("quantile", "0.5")))]
    assert p50 >= SLEEP
    edge = (("edge", "first->slow"), g)
    assert m[("dataflow_edge_capacity", edge)] == 16
    assert m[("dataflow_edge_items_total", edge)] == 6
    necks = [k for k in m if k[0] == "dataflow_bottleneck"]
    assert len(necks) == 1 and ("node", "slow") in necks[0][1]


async def test_one_collector_reports_several_engines() -> None:
    registry = prometheus_client.CollectorRegistry()
    collector = EngineCollector().register(registry)
    g1, g2 = _graph(), df.Graph("other", df.map(lambda x: x, name="only"))
    async with df.Engine(g1) as e1, df.Engine(g2) as e2:
        collector.add(e1)
        collector.add(e2)
        await e1.run(1)
        await e2.run(1)
        await e2.run(2)
        m = _samples(render(registry)[0])
    assert m[("dataflow_requests_total", (("graph", "metered"), ("outcome", "submitted")))] == 1
    assert m[("dataflow_requests_total", (("graph", "other"), ("outcome", "submitted")))] == 2


def test_collector_of_unstarted_engine_reports_requests_only() -> None:
    registry = make_registry(df.Engine(_graph()))
    m = _samples(render(registry)[0])
    assert m[("dataflow_requests_total", (("graph", "metered"), ("outcome", "submitted")))] == 0
    assert not [k for k in m if k[0].startswith("dataflow_node")]
