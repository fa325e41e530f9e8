"""Regression tests for the wrong answers of issue 11 (found at 235758a), each against a
real uvicorn: unbounded input lists, a client timeout beyond the server's, exception
groups turned into 500s, request fields reaching engine arguments, lone surrogates,
completions on an embedding graph, and 500s missing from /metrics."""

from __future__ import annotations

import functools
import json
import time
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

import dataflow as df
from dataflow.serve import create_app

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn runs on asyncio


def embed_graph() -> df.Graph:
    @df.map
    def features(text: str) -> list[float]:
        return [float(len(text)), 0.5]

    return df.Graph("features", features)


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    err: dict[str, Any] = resp.json()["error"]
    if code is not None:
        assert err["code"] == code, err
    return err


async def test_input_lists_are_capped_at_once(serve: Any, echo: ModuleType) -> None:
    app = create_app([echo.build(), embed_graph()])
    async with serve(app) as server, httpx.AsyncClient(timeout=30) as http:
        start = time.perf_counter()
        body = {"model": "echo", "prompt": ["a"] * 200_000}  # ~1 MiB
        resp = await http.post(server.url + "/v1/completions", json=body)
        err = assert_error(resp, 400, "too_many")
        assert err["param"] == "prompt" and "2048" in err["message"]
        body = {"model": "features", "input": ["a"] * 2049}
        resp = await http.post(server.url + "/v1/embeddings", json=body)
        assert assert_error(resp, 400, "too_many")["param"] == "input"
        assert time.perf_counter() - start < 10  # was 23 s of a stalled loop


async def test_more_inputs_than_max_in_flight_succeed(serve: Any) -> None:
    """A request's inputs never count against max_in_flight so that it cannot succeed."""
    app = create_app(embed_graph(), max_in_flight=16)
    async with serve(app) as server, httpx.AsyncClient(timeout=30) as http:
        body = {"model": "features", "input": [f"t{i}" for i in range(300)]}
        resp = await http.post(server.url + "/v1/embeddings", json=body)
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["data"]) == 300


async def test_client_timeout_is_capped_by_the_server(serve: Any, echo: ModuleType) -> None:
    gate = echo.Gate()  # never opened
    app = create_app(echo.build(gate=gate), timeout=0.2)
    async with serve(app) as server, httpx.AsyncClient(timeout=30) as http:
        url = server.url + "/v1/graphs/echo/run"
        with anyio.fail_after(10):
            resp = await http.post(url, json={"input": "a", "timeout": 1e9})
        assert_error(resp, 504, "timeout")
        raw = b'{"input": "a", "timeout": Infinity}'
        resp = await http.post(url, content=raw, headers={"content-type": "application/json"})
        assert assert_error(resp, 400)["param"] == "timeout"
        gate.open()


async def test_streaming_several_prompts_keeps_the_real_error(serve: Any, echo: ModuleType) -> None:
    gate = echo.Gate()
    app = create_app(echo.build(gate=gate), max_in_flight=1, retry_after=2)
    async with serve(app) as server, httpx.AsyncClient(timeout=30) as http:
        url = server.url + "/v1/completions"
        async with anyio.create_task_group() as tg:
            held = functools.partial(http.post, url, json={"model": "echo", "prompt": "held"})
            tg.start_soon(held)
            await gate.arrived.wait()  # the one place is taken
            body = {"model": "echo", "prompt": ["a", "b"], "stream": True}
            resp = await http.post(url, json=body)
            assert_error(resp, 429, "overloaded")
            assert resp.headers["retry-after"] == "2"
            gate.open()
    async with serve(create_app(echo.build())) as server, httpx.AsyncClient() as http:
        body = {"model": "echo", "prompt": ["fine", "fail: now"], "stream": True}
        resp = await http.post(server.url + "/v1/completions", json=body)
        if resp.status_code == 200:  # "fine" came first: an error event, then [DONE]
            error = json.loads(resp.text.split("data: ")[-2])["error"]
            assert error["code"] == "node_error", error
        else:
            assert_error(resp, 500, "node_error")


async def test_request_fields_never_reach_engine_arguments(serve: Any, echo: ModuleType) -> None:
    @df.map
    def clock(x: str, timeout: float = 0.0, wait: str = "") -> str:
        return f"{x} {timeout} {wait}"

    app = create_app([echo.build(), df.Graph("clock", clock)])
    async with serve(app) as server, httpx.AsyncClient() as http:
        # a node parameter named like an engine argument reaches the node
        body = {"input": "t", "params": {"timeout": 3, "wait": "yes"}}
        resp = await http.post(server.url + "/v1/graphs/clock/run", json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"output": "t 3 yes"}
        for params in ({"timeout": 1}, {"wait": True}, {"x": 1}):
            for stream in (False, True):
                body = {"input": "t", "params": params, "stream": stream}
                resp = await http.post(server.url + "/v1/graphs/echo/run", json=body)
                err = assert_error(resp, 400)
                assert err["param"] == f"params.{next(iter(params))}"
        for field in ("timeout", "wait", "x"):
            body = {"model": "echo", "prompt": "a", field: 1}
            resp = await http.post(server.url + "/v1/completions", json=body)
            assert assert_error(resp, 400, "unknown_field")["param"] == field


async def test_lone_surrogate_is_400(serve: Any, echo: ModuleType, alpha: ModuleType) -> None:
    app = create_app([echo.build(), alpha.build(), embed_graph()])
    headers = {"content-type": "application/json"}
    cases = [
        ("/v1/completions", b'{"model": "echo", "prompt": "a\\ud800"}', "prompt"),
        ("/v1/completions", b'{"model": "echo", "prompt": "\\ud800", "stream": true}', "prompt"),
        (
            "/v1/chat/completions",
            b'{"model": "alpha", "messages": [{"role": "user", "content": "\\udfff"}]}',
            "messages[0].content",
        ),
        ("/v1/embeddings", b'{"model": "features", "input": ["ok", "\\ud800"]}', "input[1]"),
        ("/v1/graphs/echo/run", b'{"input": "\\ud800"}', "input"),
    ]
    async with serve(app) as server, httpx.AsyncClient() as http:
        for path, raw, param in cases:
            resp = await http.post(server.url + path, content=raw, headers=headers)
            err = assert_error(resp, 400, "invalid_text")
            assert err["param"] == param and "surrogate" in err["message"]
        # a valid pair written as escapes is fine
        raw = b'{"model": "echo", "prompt": "\\ud83d\\ude00!"}'
        resp = await http.post(server.url + "/v1/completions", content=raw, headers=headers)
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "\U0001f600!"


async def test_generation_on_an_embedding_graph_is_400(serve: Any) -> None:
    async with serve(create_app(embed_graph())) as server, httpx.AsyncClient() as http:
        for path, body in (
            ("/v1/completions", {"model": "features", "prompt": "a"}),
            ("/v1/completions", {"model": "features", "prompt": "a", "stream": True}),
            ("/v1/chat/completions", {"model": "features", "messages": [{"role": "user",
                                                                         "content": "a"}]}),
        ):  # fmt: skip
            resp = await http.post(server.url + path, json=body)
            err = assert_error(resp, 400, "wrong_model_kind")
            assert "embedding model" in err["message"] and err["param"] == "model"


async def test_chat_without_a_template_is_400(serve: Any, alpha: ModuleType) -> None:
    app = create_app(alpha.build(chat=False))
    async with serve(app) as server, httpx.AsyncClient() as http:
        body = {"model": "alpha", "messages": [{"role": "user", "content": "a"}]}
        resp = await http.post(server.url + "/v1/chat/completions", json=body)
        err = assert_error(resp, 400, "no_chat_template")
        assert "'alpha'" in err["message"] and "chat template" in err["message"]


async def test_500s_are_in_metrics(serve: Any, echo: ModuleType) -> None:
    app = create_app(echo.build())
    state = app.state.serve

    async def broken(request: Any) -> Any:
        raise RuntimeError("a bug in the server")

    async with serve(app) as server, httpx.AsyncClient() as http:
        resp = await http.post(
            server.url + "/v1/completions", json={"model": "echo", "prompt": "fail: x"}
        )
        assert_error(resp, 500, "node_error")
        state.read_json = broken  # an unhandled error: Starlette's own handler answers
        resp = await http.post(server.url + "/v1/completions", json={})
        assert_error(resp, 500)
        text = (await http.get(server.url + "/metrics")).text
    assert 'dataflow_http_responses_total{route="/v1/completions",status="500"} 2.0' in text
    assert 'dataflow_serve_requests_total{model="echo",status="500"} 1.0' in text


async def test_no_traceback_in_any_error_body(serve: Any, echo: ModuleType) -> None:
    bodies: list[tuple[str, Any]] = [
        ("/v1/completions", b"{"),
        ("/v1/completions", b"[]"),
        ("/v1/completions", b"\xff"),
        ("/v1/completions", b"[" * 100_000),
        ("/v1/completions", {"model": "echo", "prompt": "a", "max_tokens": 1e30}),
        ("/v1/completions", {"model": "echo", "prompt": [[1, 2]]}),
        ("/v1/chat/completions", {"model": "echo", "messages": "hi"}),
        ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "x"}]}),
        ("/v1/embeddings", {"model": "echo", "input": "a"}),
        ("/v1/graphs/nope/run", {"input": 1}),
        ("/v1/nothing", {}),
    ]
    async with serve(create_app(echo.build())) as server, httpx.AsyncClient() as http:
        for path, body in bodies:
            if isinstance(body, bytes):
                resp = await http.post(server.url + path, content=body)
            else:
                resp = await http.post(server.url + path, json=body)
            assert 400 <= resp.status_code < 500, (path, body, resp.text)
            assert "Traceback" not in resp.text and 'File "' not in resp.text
            assert resp.json()["error"]["message"]
