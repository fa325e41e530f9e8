"""The app in-process on every backend (httpx's ASGI transport), its checks, and the
``dataflow serve`` command as a real process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from types import ModuleType

import httpx
import pytest

import dataflow as df
from dataflow.serve import create_app

pytestmark = pytest.mark.anyio


async def test_app_runs_on_asyncio_and_trio(echo: ModuleType) -> None:
    engine = df.Engine(echo.build())
    app = create_app(engine)
    # httpx's ASGI transport does not run the lifespan: run it as a server would.
    async with app.router.lifespan_context(app):
        assert engine.state is df.EngineState.OPEN
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            resp = await http.post("/v1/completions", json={"model": "echo", "prompt": "trio"})
            assert resp.json()["choices"][0]["text"] == "trio"
            body = {"model": "echo", "prompt": "ab", "stream": True}
            resp = await http.post("/v1/completions", json=body)
            assert resp.headers["content-type"].startswith("text/event-stream")
            lines = [ln for ln in resp.text.split("\n\n") if ln]
            texts = [json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1]]
            # tokens already waiting share a frame; the last frame says why it ended
            assert "".join(texts) == "ab" and texts[-1] == "" and lines[-1] == "data: [DONE]"
            assert (await http.get("/healthz")).status_code == 200
    assert engine.state is df.EngineState.CLOSED


def test_create_app_checks_its_arguments(echo: ModuleType) -> None:
    graph = echo.build()
    with pytest.raises(ValueError, match="two served graphs"):
        create_app([graph, echo.build()])
    with pytest.raises(TypeError, match="Engine, a Graph"):
        create_app("graphs/tiny_lm.py")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        create_app({})
    with pytest.raises(ValueError, match="max_in_flight"):
        create_app(graph, max_in_flight=0)
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(graph, max_body_bytes=0)
    app = create_app({"a": graph, "b": df.Engine(echo.build())})
    assert sorted(app.state.serve.models) == ["a", "b"]


def test_dataflow_serve_command(echo: ModuleType) -> None:
    path = echo.__file__
    assert path is not None
    cmd = [sys.executable, "-m", "dataflow.cli", "serve", path, "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the socket is bound
        assert line.startswith("serving echo on http://127.0.0.1:"), line
        url = line.split()[-1]
        with httpx.Client(base_url=url, timeout=30) as http:
            resp = http.post("/v1/completions", json={"model": "echo", "prompt": "cli"})
            assert resp.json()["choices"][0]["text"] == "cli"
            assert http.get("/healthz").json()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err  # Ctrl-C: stopped gracefully, exit code says so
    assert "Traceback" not in err


def test_serve_only_binds_loopback_by_default() -> None:
    import argparse

    from dataflow._cli import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser)
    assert parser.parse_args(["g.py"]).host == "127.0.0.1"


async def test_chat_on_asyncio_and_trio(alpha: ModuleType) -> None:
    app = create_app(alpha.build())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            body = {
                "model": "alpha",
                "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0,
                "max_tokens": 3,
                "n": 2,
            }
            resp = await http.post("/v1/chat/completions", json=body)
            answer = resp.json()
            assert [c["message"]["content"] for c in answer["choices"]] == ["abc", "abc"]
            assert answer["usage"]["completion_tokens"] == 6
            resp = await http.post("/v1/chat/completions", json={**body, "stream": True})
            chunks = [json.loads(b[6:]) for b in resp.text.split("\n\n") if b[6:7] == "{"]
            texts = ["", ""]
            for chunk in chunks:
                for choice in chunk["choices"]:
                    texts[choice["index"]] += choice["delta"].get("content", "")
            assert texts == ["abc", "abc"] and resp.text.endswith("data: [DONE]\n\n")
