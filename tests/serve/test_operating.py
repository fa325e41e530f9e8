"""Operating the server: API key, CORS, Retry-After from the drain rate, per-model
metrics, and graceful shutdown (in-process uvicorn and the ``dataflow serve`` command)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

from dataflow.serve import create_app
from dataflow.serve._auth import authorized
from dataflow.serve._limits import DrainRate, ceiling
from dataflow.serve._shutdown import server as graceful_server

openai = pytest.importorskip("openai")

SLOW = str(Path(__file__).with_name("slow_graph.py"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn runs on asyncio


@pytest.mark.anyio
async def test_api_key(serve: Any, alpha: ModuleType) -> None:
    app = create_app(alpha.build(), api_key="s3cret")
    async with serve(app) as server, httpx.AsyncClient() as http:
        url = server.url
        assert (await http.get(url + "/healthz")).status_code == 200  # stays open
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "s3cret"}):
            resp = await http.get(url + "/v1/models", headers=headers)
            assert resp.status_code == 401, resp.text
            assert resp.json()["error"]["type"] == "authentication_error"
            assert resp.headers["www-authenticate"] == "Bearer"
        for path in ("/metrics", "/v1/models/alpha"):
            assert (await http.get(url + path)).status_code == 401
        resp = await http.post(url + "/v1/completions", json={"model": "alpha", "prompt": "a"})
        assert resp.status_code == 401
        ok = {"authorization": "Bearer s3cret"}
        assert (await http.get(url + "/metrics", headers=ok)).status_code == 200
        good = openai.AsyncOpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        async with good:
            done = await good.completions.create(model="alpha", prompt="w", temperature=0)
            assert done.choices[0].text == "xyz"
        bad = openai.AsyncOpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        async with bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.completions.create(model="alpha", prompt="w")


def test_authorized_check() -> None:
    key = "k" * 32
    assert authorized([], None)
    assert authorized([(b"authorization", b"Bearer " + key.encode())], key)
    assert authorized([(b"authorization", b"bearer " + key.encode())], key)
    assert not authorized([(b"authorization", b"Bearer " + b"k" * 31)], key)
    assert not authorized([(b"authorization", b"Basic " + key.encode())], key)
    assert not authorized([], key)
    with pytest.raises(ValueError, match="api_key"):
        create_app(_graph(), api_key="")


def _graph() -> Any:
    from dataflow._cli._load import load_module

    return load_module(str(Path(__file__).with_name("lm_graph.py"))).build()


@pytest.mark.anyio
async def test_cors_off_unless_asked(serve: Any, alpha: ModuleType) -> None:
    preflight = {
        "origin": "http://ui.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    async with serve(create_app(alpha.build())) as server, httpx.AsyncClient() as http:
        resp = await http.options(server.url + "/v1/completions", headers=preflight)
        assert "access-control-allow-origin" not in resp.headers
        resp = await http.get(server.url + "/v1/models", headers={"origin": "http://ui.example"})
        assert "access-control-allow-origin" not in resp.headers
    app = create_app(alpha.build(), cors_origins=["http://ui.example"], api_key="k")
    async with serve(app) as server, httpx.AsyncClient() as http:
        resp = await http.options(server.url + "/v1/completions", headers=preflight)
        assert resp.status_code == 200
        assert resp.headers["access-control-allow-origin"] == "http://ui.example"
        headers = {"origin": "http://ui.example", "authorization": "Bearer k"}
        resp = await http.get(server.url + "/v1/models", headers=headers)
        assert resp.headers["access-control-allow-origin"] == "http://ui.example"


class _Counters:
    def __init__(self) -> None:
        self.succeeded = self.failed = self.cancelled = 0


class _Engine:
    def __init__(self) -> None:
        self.counters = _Counters()


def test_retry_after_follows_the_drain_rate() -> None:
    engine = _Engine()
    drain = DrainRate(engine, fallback=1.5)  # type: ignore[arg-type]
    assert drain.retry_after(now=100.0) == 1.5  # nothing ended yet: the fallback
    for i in range(1, 11):  # 20 requests end per second
        engine.counters.succeeded += 10
        drain.sample(now=100.0 + i * 0.5)
    assert drain.rate(now=105.0) == pytest.approx(20.0, rel=0.05)
    assert drain.retry_after(now=105.0) == pytest.approx(1 / 20, rel=0.05)
    # a second rejection in the same second waits for two places
    assert drain.retry_after(now=105.1) == pytest.approx(2 / 20, rel=0.05)
    engine.counters.succeeded += 1  # then it slows down to a trickle
    drain.sample(now=116.0)
    assert drain.retry_after(now=117.0) == pytest.approx(1 / (1 / 1.5), rel=0.2)
    assert ceiling(0.2, 1e9) == 0.2 and ceiling(None, 3.0) == 3.0 and ceiling(5.0, None) == 5


@pytest.mark.anyio
async def test_per_model_metrics(serve: Any, alpha: ModuleType) -> None:
    async with serve(create_app(alpha.build())) as server, httpx.AsyncClient() as http:
        body = {"model": "alpha", "prompt": "a", "temperature": 0, "max_tokens": 4}
        resp = await http.post(server.url + "/v1/completions", json=body)
        usage = resp.json()["usage"]
        resp = await http.post(server.url + "/v1/completions", json={**body, "stream": True})
        assert resp.status_code == 200
        await http.post(server.url + "/v1/completions", json={**body, "max_tokens": 0})
        text = (await http.get(server.url + "/metrics")).text
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert lines['dataflow_serve_requests_total{model="alpha",status="200"}'] == "2.0"
    assert lines['dataflow_serve_requests_total{model="alpha",status="400"}'] == "1.0"
    completion = float(lines['dataflow_serve_completion_tokens_total{model="alpha"}'])
    assert completion == 2 * usage["completion_tokens"] == 8
    assert float(lines['dataflow_serve_prompt_tokens_total{model="alpha"}']) == 2
    for name in (
        "time_to_first_token_seconds",
        "request_seconds",
        "queue_seconds",
    ):
        assert lines[f'dataflow_serve_{name}_count{{model="alpha"}}'] == "2.0", name
    itl = float(lines['dataflow_serve_inter_token_latency_seconds_count{model="alpha"}'])
    assert itl >= 2  # a few gaps per request (tokens already waiting share one)


@pytest.mark.anyio
async def test_shutdown_grace_lets_short_streams_finish_then_ends_the_rest(
    echo: ModuleType,
) -> None:
    import socket

    import uvicorn

    from dataflow._cli._load import load_module

    slow = load_module(SLOW)
    gate = echo.Gate()  # the echo stream never gets past its first token
    app = create_app([echo.build(gate=gate), slow.build(step_s=0.02)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(app, lifespan="on", log_config=None, log_level="critical")
    server = graceful_server(config, app.state.serve.requests, grace=0.5)
    results: dict[str, str] = {}
    first = {"long": anyio.Event(), "short": anyio.Event()}

    async def read(http: httpx.AsyncClient, name: str, body: dict[str, Any]) -> None:
        text = ""
        async with http.stream("POST", url + "/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                text += line + "\n"
                first[name].set()
        results[name] = text

    long = {"model": "echo", "prompt": "x" * 500, "stream": True}
    short = {"model": "slow", "prompt": "go", "stream": True, "max_tokens": 10}  # ~0.2 s
    with sock:
        async with anyio.create_task_group() as tg, httpx.AsyncClient(timeout=30) as http:
            tg.start_soon(server.serve, [sock])
            while not server.started:
                await anyio.sleep(0.01)  # allowed: uvicorn has no started event
            gate.release(1)
            async with anyio.create_task_group() as clients:
                clients.start_soon(read, http, "long", long)
                clients.start_soon(read, http, "short", short)
                await first["long"].wait()
                await first["short"].wait()
                server.should_exit = True  # what SIGTERM does
                start = time.perf_counter()
            elapsed = time.perf_counter() - start
    assert "data: [DONE]" in results["short"] and "shutting_down" not in results["short"]
    assert results["short"].count('"text":') >= 2
    # ended when the grace ran out: an error event, then [DONE]
    assert '"code":"shutting_down"' in results["long"], results["long"]
    assert results["long"].rstrip().endswith("data: [DONE]")
    assert 0.4 <= elapsed < 5, elapsed


def _serve(*args: str, key: str = "") -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "dataflow.cli", "serve", SLOW, "--port", "0", *args]
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DATAFLOW_API_KEY": key},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("serving slow on "), line
    return proc, line.split()[-1]


def _first_token(http: httpx.Client, url: str) -> Any:
    body = {"model": "slow", "prompt": "go", "stream": True, "max_tokens": 1000}
    cm = http.stream("POST", url + "/v1/completions", json=body)
    resp = cm.__enter__()
    lines = resp.iter_lines()
    while not next(lines).startswith("data: {"):
        pass
    return cm, lines


def test_sigterm_cancels_streams_after_grace() -> None:
    proc, url = _serve("--grace", "0.5")
    try:
        with httpx.Client(timeout=30) as http:
            cm, lines = _first_token(http, url)
            start = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            rest = []
            try:
                rest = list(lines)
            except httpx.HTTPError:
                pass
            cm.__exit__(None, None, None)
        _, err = proc.communicate(timeout=30)
        elapsed = time.perf_counter() - start
    finally:
        proc.kill()
    assert any('"code":"shutting_down"' in line for line in rest), rest[-3:]
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]", rest[-3:]
    assert len(rest) < 900
    assert proc.returncode == 0, err
    assert elapsed < 10 and "Traceback" not in err


def test_second_ctrl_c_exits_at_once() -> None:
    proc, url = _serve("--grace", "60")
    try:
        with httpx.Client(timeout=30) as http:
            cm, _ = _first_token(http, url)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)  # allowed: let the first Ctrl-C start the graceful shutdown
            assert proc.poll() is None  # waiting for the open stream (grace 60 s)
            start = time.perf_counter()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
            elapsed = time.perf_counter() - start
            cm.__exit__(None, None, None)
    finally:
        proc.kill()
    assert proc.returncode == 130 and elapsed < 5, err
    assert "Traceback" not in err


def test_api_key_from_the_environment() -> None:
    proc, url = _serve(key="from-env")
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/healthz").status_code == 200
            assert http.get("/v1/models").status_code == 401
            ok = http.get("/v1/models", headers={"authorization": "Bearer from-env"})
            assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "slow"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err, err
