"""The ``dataflow`` command: run, show (each format available) and bench (small N)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from dataflow.cli import main

GRAPH = """
import time
from collections.abc import Iterator

import dataflow as df

EXAMPLE_INPUTS = ["a", "bb", "ccc"]


def build(delay: float = 0.0, stream: bool = False, fail_on: str = "") -> df.Graph:
    @df.encode
    def size(text: str) -> int:
        if text == fail_on:
            raise ValueError("bad input")
        return len(text)

    @df.infer(placement="thread", capacity=2)
    def slow(n: int) -> int:
        time.sleep(delay)  # simulated work in a node body (intended)
        return n * 2

    @df.map
    def count(n: int) -> Iterator[int]:
        yield from range(n)

    return df.Graph("cli_demo", size >> slow >> count if stream else size >> slow)
"""

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' not installed")


@pytest.fixture
def graph_file(tmp_path: Path) -> str:
    path = tmp_path / "cli_demo.py"
    path.write_text(GRAPH)
    return str(path)


# -- run ------------------------------------------------------------------------------------
def test_run_prints_each_result(graph_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", graph_file, "--no-stats"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["'a' -> 2", "'bb' -> 4", "'ccc' -> 6"]


def test_run_prints_stats_with_the_bottleneck_fields(
    graph_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", graph_file, "-i", "xy"]) == 0
    out = capsys.readouterr().out
    first, _, rest = out.partition("\n")
    assert first == "'xy' -> 4"
    stats = json.loads(rest)
    assert stats["requests"]["succeeded"] == 1
    assert stats["nodes"]["slow"]["items_in"] == 1


# -- show ------------------------------------------------------------------------------------
def test_show_prints_mermaid_by_default(
    graph_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", graph_file]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flowchart LR")
    assert "slow<br/>infer · thread" in out and "|cap 2|" in out


def test_show_dot(graph_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", graph_file, "--format", "dot", "-o", "stream=true"]) == 0
    out = capsys.readouterr().out
    assert out.startswith('digraph "cli_demo"')
    assert '"slow" -> "count"' in out and "stream" in out


@needs_dot
def test_show_svg(graph_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", graph_file, "--format", "svg"]) == 0
    out = capsys.readouterr().out
    assert "<svg" in out and "slow" in out


@needs_dot
def test_show_png_to_a_file(graph_file: str, tmp_path: Path) -> None:
    target = tmp_path / "graph.png"
    assert main(["show", graph_file, "--format", "png", "--output", str(target)]) == 0
    assert target.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_show_image_without_graphviz_says_how_to_install(
    graph_file: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataflow._cli.show as show

    monkeypatch.setitem(sys.modules, "graphviz", None)  # import graphviz -> ImportError
    monkeypatch.setattr(show.shutil, "which", lambda _: None)
    assert main(["show", graph_file, "--format", "svg"]) == 3
    err = capsys.readouterr().err
    assert "dataflow-engine[viz]" in err and "apt-get install graphviz" in err


# -- bench -----------------------------------------------------------------------------------
def _bench_json(capsys: pytest.CaptureFixture[str], *argv: str, status: int = 0) -> dict:  # type: ignore[type-arg]
    assert main(["bench", *argv, "--json"]) == status
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_bench_json_report(graph_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    delay = 0.005
    report = _bench_json(
        capsys, graph_file, "--requests", "16", "--concurrency", "4", "-o", f"delay={delay}"
    )
    assert (report["succeeded"], report["failed"], report["requests"]) == (16, 0, 16)
    assert report["throughput_rps"] > 0
    lat = report["latency_s"]
    assert delay <= lat["p50"] <= lat["p90"] <= lat["p99"]
    assert report["ttft_s"] is None  # not a streaming graph
    assert set(report["nodes"]) == {"size", "slow"}
    assert report["nodes"]["slow"]["items_in"] == 16
    # 4 clients against a node that sleeps: it is the bottleneck, busy most of the run.
    assert report["bottleneck"]["node"] == "slow"
    assert report["nodes"]["slow"]["busy"] > 0.5


def test_bench_streaming_reports_time_to_first_output(
    graph_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _bench_json(
        capsys, graph_file, "-n", "6", "-c", "2", "-o", "stream=true", "-i", "abcd"
    )
    assert report["streaming"] and report["succeeded"] == 6
    assert report["outputs_per_s"] == pytest.approx(report["throughput_rps"] * 8)
    assert 0 < report["ttft_s"]["p50"] <= report["latency_s"]["p99"]


def test_bench_table(graph_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", graph_file, "-n", "8", "-c", "2", "-o", "delay=0.002"]) == 0
    out = capsys.readouterr().out
    for text in ("throughput", "latency p50/p90/p99", "busy", "bottleneck: slow"):
        assert text in out, out


def test_bench_writes_a_trace(
    graph_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "bench.json"
    report = _bench_json(capsys, graph_file, "-n", "5", "-c", "2", "--trace", str(trace))
    assert report["trace"] == str(trace)
    events = json.loads(trace.read_text())["traceEvents"]
    requests = {ev["id"] for ev in events if ev.get("cat") == "request"}
    assert requests == {1, 2, 3, 4, 5}


def test_bench_counts_failures_and_exits_nonzero(
    graph_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _bench_json(capsys, graph_file, "-n", "6", "-c", "2", "-o", "fail_on=bb", status=1)
    assert (report["succeeded"], report["failed"]) == (4, 2)
    assert list(report["errors"].values()) == [2]


def test_bench_rejects_bad_counts(graph_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", graph_file, "--requests", "0"]) == 2
    assert "--requests" in capsys.readouterr().err
