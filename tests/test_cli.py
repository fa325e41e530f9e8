"""The ``dataflow`` command: run, show (each format available) and bench (small N), and
what a user sees when something is wrong (subprocess: stdout, stderr, exit status)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dataflow.cli import main

ROOT = Path(__file__).resolve().parent.parent

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
        time.sleep(delay)  # allowed: simulated work in a node body
        return n * 2

    @df.map
    def count(n: int) -> Iterator[int]:
        yield from range(n)

    return df.Graph("cli_demo", size >> slow >> count if stream else size >> slow)
"""

# A module-level graph (no build), a second graph under another name, and a factory.
PLAIN = """
import anyio

import dataflow as df


@df.map
def shout(text: str) -> str:
    return text.upper()


@df.map
async def wait_forever(text: str):
    yield "ready"
    await anyio.sleep(3600)  # allowed: a body that waits until it is cancelled
    yield "never"


graph = df.Graph("plain", shout)
other = df.Graph("other", df.map(str.lower, name="lower"))
hang = df.Graph("hang", wait_forever)


def make(suffix: str = "!") -> df.Graph:
    return df.Graph("made", df.map(lambda s: s + suffix, name="suffix"))


def broken() -> df.Graph:
    raise RuntimeError("build exploded")
"""

needs_dot = pytest.mark.skipif(
    __import__("shutil").which("dot") is None, reason="missing: Graphviz 'dot' (make system)"
)


@pytest.fixture
def graph_file(tmp_path: Path) -> str:
    path = tmp_path / "cli_demo.py"
    path.write_text(GRAPH)
    return str(path)


@pytest.fixture
def plain_file(tmp_path: Path) -> str:
    path = tmp_path / "plain.py"
    path.write_text(PLAIN)
    return str(path)


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``dataflow ARGV...`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "dataflow.cli", *argv],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
        env={**os.environ, **(env or {}), "DATAFLOW_DEBUG": (env or {}).get("DATAFLOW_DEBUG", "")},
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str], status: int) -> str:
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# -- errors a user can cause: one line on stderr, exit 2 (usage) or 1 (failure) -------------
def test_version() -> None:
    done = cli("--version")
    assert done.returncode == 0
    assert re.fullmatch(r"dataflow \d+\.\d+\.\d+\S*\n", done.stdout), done.stdout


def test_missing_file_is_a_usage_error() -> None:
    line = one_line_error(cli("run", "no/such/graph.py"), 2)
    assert line == "dataflow run: no such graph file: no/such/graph.py"


def test_unknown_module_is_a_usage_error() -> None:
    line = one_line_error(cli("show", "no_such_module_xyz"), 2)
    assert "no graph file or module 'no_such_module_xyz'" in line


def test_module_without_a_graph_is_a_usage_error() -> None:
    line = one_line_error(cli("run", "json"), 2)
    assert "json defines no graph" in line and "build(" in line


def test_missing_attribute_is_a_usage_error(plain_file: str) -> None:
    line = one_line_error(cli("show", f"{plain_file}:nope"), 2)
    assert "no attribute 'nope'" in line


def test_bad_option_values_are_usage_errors(graph_file: str) -> None:
    done = cli("run", graph_file, "--concurrency", "x")
    assert done.returncode == 2 and "invalid int value: 'x'" in done.stderr
    assert "Traceback" not in done.stderr
    line = one_line_error(cli("run", graph_file, "-o", "novalue"), 2)
    assert "--option expects KEY=VALUE, got 'novalue'" in line
    line = one_line_error(cli("run", graph_file, "-o", "nosuch=1"), 2)
    assert "bad --option" in line and "nosuch" in line
    line = one_line_error(cli("run", graph_file, "--concurrency", "0"), 2)
    assert "--concurrency must be >= 1" in line


def test_a_failing_build_is_a_failure_with_one_line(plain_file: str) -> None:
    line = one_line_error(cli("run", f"{plain_file}:broken", "-i", "x"), 1)
    assert line.startswith("dataflow run: RuntimeError: build exploded")


def test_debug_flag_and_env_var_show_the_traceback(plain_file: str) -> None:
    for done in (
        cli("run", f"{plain_file}:broken", "-i", "x", "--debug"),
        cli("run", f"{plain_file}:broken", "-i", "x", env={"DATAFLOW_DEBUG": "1"}),
    ):
        assert done.returncode == 1
        assert "Traceback" in done.stderr and "build exploded" in done.stderr


def test_a_failing_request_exits_1_and_names_its_input(graph_file: str) -> None:
    done = cli("run", graph_file, "-o", "fail_on=bb")
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == ["2", "6"]  # the good inputs still ran
    assert "input 1 ('bb')" in done.stderr and "bad input" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_invalid_prompt_is_one_line() -> None:
    line = one_line_error(cli("run", "graphs/tiny_lm.py", "--prompt", "", "--max-tokens", "4"), 1)
    assert line.startswith("dataflow run: ") and "empty" in line


def test_ctrl_c_exits_130_without_a_traceback(plain_file: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "dataflow.cli", "run", f"{plain_file}:hang", "-i", "x"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "DATAFLOW_DEBUG": ""},
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.read(5) == "ready"  # the stream is running
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err


def test_serve_on_a_busy_port_is_one_line(plain_file: str) -> None:
    pytest.importorskip("uvicorn", reason="missing: the serve extra")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = one_line_error(cli("serve", plain_file, "--port", str(port)), 1)
    assert line.startswith(f"dataflow serve: cannot listen on 127.0.0.1:{port}")


# -- run: only outputs on stdout --------------------------------------------------------------
def test_run_writes_only_outputs_to_stdout(graph_file: str) -> None:
    done = cli("run", graph_file)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2\n4\n6\n"
    assert re.fullmatch(r"\[3 requests: 3 ok, 0 failed, 0 cancelled, in \S+ s\]\n", done.stderr)
    quiet = cli("run", graph_file, "--quiet")
    assert (quiet.stdout, quiet.stderr) == ("2\n4\n6\n", "")


def test_run_stats_json_goes_to_stderr(graph_file: str) -> None:
    done = cli("run", graph_file, "-i", "xy", "--stats", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "4\n"
    stats = json.loads(done.stderr)
    assert stats["requests"]["succeeded"] == 1
    assert stats["nodes"]["slow"]["items_in"] == 1


def test_run_loads_a_module_level_graph_and_named_attributes(plain_file: str) -> None:
    assert cli("run", plain_file, "-i", "abc", "-q").stdout == "ABC\n"
    assert cli("run", f"{plain_file}:other", "-i", "ABC", "-q").stdout == "abc\n"
    done = cli("run", f"{plain_file}:make", "-o", "suffix=?", "-i", "abc", "-q")
    assert done.stdout == "abc?\n", done.stderr


def test_run_streams_each_input(graph_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", graph_file, "-o", "stream=true", "-i", "ab", "-q"]) == 0
    assert capsys.readouterr().out == "0\n1\n2\n3\n\n"


def test_concurrency_exits_nonzero_when_a_stream_fails(graph_file: str) -> None:
    argv = ("run", graph_file, "-o", "stream=true", "-o", "fail_on=x", "--prompt", "x")
    done = cli(*argv, "--concurrency", "3")
    assert done.returncode == 1, done.stderr
    assert "3 streams (0 ok, 3 failed)" in done.stderr
    assert "stream 0:" in done.stderr and "bad input" in done.stderr
    assert "Traceback" not in done.stderr
    single = cli(*argv)
    assert single.returncode == 1 and "bad input" in single.stderr


def _tokens_in(summary: str) -> int:
    match = re.search(r"(\d+) tokens", summary)
    assert match, summary
    return int(match.group(1))


@pytest.mark.slow
def test_tiny_lm_same_seed_same_stdout_and_tokens_are_tokens() -> None:
    argv = ("run", "graphs/tiny_lm.py", "--prompt", "def ", "--max-tokens", "40")
    first = cli(*argv, "--seed", "1", "--temperature", "1.5")
    again = cli(*argv, "--seed", "1", "--temperature", "1.5")
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout and first.stdout.strip()
    assert "tokens/s" not in first.stdout and not first.stdout.startswith("def ")
    # Hot sampling makes invalid UTF-8 (replacement characters): still at most 40 tokens.
    assert 0 < _tokens_in(first.stderr) <= 40
    many = cli(*argv, "--seed", "7", "--temperature", "2", "--concurrency", "3")
    assert many.returncode == 0, many.stderr
    assert 0 < _tokens_in(many.stderr) <= 120
    assert len(many.stdout.split("\n")) >= 3


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


def test_show_a_named_graph(plain_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", f"{plain_file}:other", "--format", "dot"]) == 0
    assert capsys.readouterr().out.startswith('digraph "other"')


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
    assert report["limited_by"]["what"] == "node"
    assert report["nodes"]["slow"]["busy"] > 0.5


def test_bench_names_no_bottleneck_when_every_node_is_idle(
    plain_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _bench_json(capsys, plain_file, "-i", "abc", "-n", "30", "-c", "1")
    assert all(n["busy"] < 0.5 for n in report["nodes"].values()), report["nodes"]
    assert report["bottleneck"] is None
    assert report["limited_by"]["what"] == "clients"
    assert "client concurrency" in report["limited_by"]["reason"]
    report = _bench_json(capsys, plain_file, "-i", "abc", "-n", "2", "-c", "8")
    assert report["bottleneck"] is None and report["limited_by"]["what"] == "input"
    assert main(["bench", plain_file, "-i", "abc", "-n", "10", "-c", "1"]) == 0
    out = capsys.readouterr().out
    assert "no bottleneck: every node is mostly idle" in out and "bottleneck: " not in out.replace(
        "no bottleneck: ", ""
    )


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
