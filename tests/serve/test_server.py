"""The app behind a real uvicorn server, driven by httpx and the official openai client."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

import dataflow as df
from dataflow.serve import create_app

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn runs on asyncio (the trio path is in test_app.py)


def embed_graph() -> df.Graph:
    @df.map
    def features(text: str) -> list[float]:
        return [float(len(text)), float(text.count("a")), 0.5]

    return df.Graph("features", features)


def events(body: str) -> list[Any]:
    """The ``data:`` payloads of a server-sent-event body (``[DONE]`` kept as a string)."""
    out: list[Any] = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def client(server: Any) -> Any:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def assert_error(resp: httpx.Response, status: int, kind: str, param: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["type"] == kind
    assert err["param"] == param
    assert err["message"] and "Traceback" not in resp.text and 'File "' not in resp.text


async def test_openai_client_completions_stream_and_not(serve: Any, echo: ModuleType) -> None:
    async with serve(create_app(echo.build())) as server:
        oai = client(server)
        done = await oai.completions.create(model="echo", prompt="hello world", max_tokens=5)
        assert done.choices[0].text == "hello"
        assert done.choices[0].finish_reason == "length"
        assert done.usage is not None
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (11, 5)

        full = await oai.completions.create(model="echo", prompt="abc", max_tokens=10)
        assert (full.choices[0].text, full.choices[0].finish_reason) == ("abc", "stop")

        chunks = []
        stream = await oai.completions.create(
            model="echo",
            prompt="streaming!",
            stream=True,
            stream_options={"include_usage": True},
            seed=3,
            temperature=0.5,
        )
        async for chunk in stream:
            chunks.append(chunk)
        texts = [c.choices[0].text for c in chunks if c.choices]
        assert "".join(texts) == "streaming!"
        assert len([t for t in texts if t]) == len("streaming!")  # one event per token
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10

        # a stop sequence the graph applies
        stopped = await oai.completions.create(model="echo", prompt="one two", stop=" ")
        assert stopped.choices[0].text == "one"
        await oai.close()


async def test_several_prompts_in_one_request(serve: Any, echo: ModuleType) -> None:
    async with serve(create_app(echo.build())) as server, httpx.AsyncClient() as http:
        body = {"model": "echo", "prompt": ["abc", "wxyz"]}
        resp = await http.post(server.url + "/v1/completions", json=body)
        assert [c["text"] for c in resp.json()["choices"]] == ["abc", "wxyz"]
        resp = await http.post(server.url + "/v1/completions", json={**body, "stream": True})
        got: dict[int, str] = {0: "", 1: ""}
        for ev in events(resp.text)[:-1]:
            got[ev["choices"][0]["index"]] += ev["choices"][0]["text"]
        assert got == {0: "abc", 1: "wxyz"}


async def test_embeddings_float_and_base64(serve: Any) -> None:
    async with serve(create_app(embed_graph())) as server:
        oai = client(server)
        # The openai client asks for base64 unless told otherwise, then decodes it.
        out = await oai.embeddings.create(model="features", input=["banana", "kiwi"])
        assert [d.embedding for d in out.data] == [[6.0, 3.0, 0.5], [4.0, 0.0, 0.5]]
        flt = await oai.embeddings.create(model="features", input="aa", encoding_format="float")
        assert flt.data[0].embedding == [2.0, 2.0, 0.5]
        assert out.usage.prompt_tokens == len("banana") + len("kiwi")
        await oai.close()


async def test_64_concurrent_streaming_clients(serve: Any, echo: ModuleType) -> None:
    engine = df.Engine(echo.build(replicas=64))
    results: dict[int, str] = {}

    async def one(http: httpx.AsyncClient, url: str, i: int) -> None:
        prompt = f"client {i:02d} says " + "xyz" * (i % 5 + 1)
        body = {"model": "echo", "prompt": prompt, "stream": True}
        text = ""
        async with http.stream("POST", url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    ev = json.loads(line[6:])
                    text += ev["choices"][0]["text"]
                elif line == "data: [DONE]":
                    results[i] = text if text == prompt else f"WRONG: {text!r} != {prompt!r}"

    limits = httpx.Limits(max_connections=64)
    async with serve(create_app(engine)) as server:
        async with (
            httpx.AsyncClient(limits=limits, timeout=30) as http,
            anyio.create_task_group() as tg,
        ):
            for i in range(64):
                tg.start_soon(one, http, server.url, i)
        stats = engine.stats()["requests"]
    assert len(results) == 64
    assert all(not r.startswith("WRONG") for r in results.values()), results
    assert stats["succeeded"] == 64 and stats["in_flight"] == 0


async def test_disconnect_cancels_within_one_step(serve: Any, echo: ModuleType) -> None:
    gate, probe = echo.Gate(), echo.Probe()
    engine = df.Engine(echo.build(gate=gate, probe=probe))
    prompt = "x" * 200
    async with serve(create_app(engine)) as server, httpx.AsyncClient() as http:
        body = {"model": "echo", "prompt": prompt, "stream": True}
        received = 0
        gate.release(1)  # the 200 goes out with the first token
        async with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
            lines = resp.aiter_lines()
            while True:
                while not (await anext(lines)).startswith("data: {"):
                    pass
                received += 1
                if received == 3:
                    break
                gate.release(1)
            # leaving the block closes the connection mid-stream
        with anyio.fail_after(10):
            await server.probe.wait_finished(1)  # the server saw the disconnect
        requests = engine.stats()["requests"]
        assert requests["cancelled"] == 1 and requests["in_flight"] == 0
        gate.open()  # the step the generator was waiting for may now run; no other
        with anyio.fail_after(10):
            await probe.closed_event.wait()
        assert received == 3
        # at most the step it was waiting for (cancelled there or run), not len(prompt)
        assert received <= probe.steps <= received + 1, probe.steps
        assert engine.stats()["nodes"]["echo"]["failed"] == 0


async def test_overloaded_is_429_with_retry_after(serve: Any, echo: ModuleType) -> None:
    gate = echo.Gate()
    app = create_app(echo.build(gate=gate), max_in_flight=1, retry_after=2.5)
    async with serve(app) as server, httpx.AsyncClient() as http:
        url = server.url + "/v1/completions"
        first: dict[str, Any] = {}

        async def hold() -> None:
            resp = await http.post(url, json={"model": "echo", "prompt": "held"})
            first["text"] = resp.json()["choices"][0]["text"]

        async with anyio.create_task_group() as tg:
            tg.start_soon(hold)
            await gate.arrived.wait()  # the first request is in flight, blocked
            resp = await http.post(url, json={"model": "echo", "prompt": "more"})
            assert_error(resp, 429, "rate_limit_error")
            assert resp.headers["retry-after"] == "3"
            assert resp.json()["error"]["code"] == "overloaded"
            async with client(server) as oai:
                with pytest.raises(openai.RateLimitError):
                    await oai.completions.create(model="echo", prompt="x", stream=True)
            gate.open()
        assert first["text"] == "held"


async def test_deadline_is_504(serve: Any, echo: ModuleType) -> None:
    gate = echo.Gate()  # never opened: every request runs into its deadline
    app = create_app(echo.build(gate=gate), timeout=0.2)
    async with serve(app) as server, httpx.AsyncClient() as http:
        resp = await http.post(
            server.url + "/v1/completions", json={"model": "echo", "prompt": "a"}
        )
        assert_error(resp, 504, "timeout_error")
        body = {"model": "echo", "prompt": "a", "stream": True}
        resp = await http.post(server.url + "/v1/completions", json=body)
        assert_error(resp, 504, "timeout_error")  # before the first token: a real status
        resp = await http.post(
            server.url + "/v1/graphs/echo/run", json={"input": "a", "timeout": 0.05}
        )
        assert_error(resp, 504, "timeout_error")
        gate.open()


async def test_node_failure_is_500_without_traceback(serve: Any, echo: ModuleType) -> None:
    async with serve(create_app(echo.build())) as server, httpx.AsyncClient() as http:
        url = server.url + "/v1/completions"
        resp = await http.post(url, json={"model": "echo", "prompt": "fail: now"})
        assert_error(resp, 500, "server_error")
        assert "'echo'" in resp.json()["error"]["message"]
        resp = await http.post(url, json={"model": "echo", "prompt": "fail: now", "stream": True})
        assert_error(resp, 500, "server_error")
        # mid-stream: the tokens so far, then an error event, then [DONE]
        resp = await http.post(url, json={"model": "echo", "prompt": "ab#cd", "stream": True})
        evs = events(resp.text)
        # (tokens already waiting may share one frame)
        assert "".join(e["choices"][0]["text"] for e in evs[:-2]) == "ab"
        assert evs[-2]["error"]["type"] == "server_error" and evs[-1] == "[DONE]"
        assert "Traceback" not in resp.text
        async with client(server) as oai:
            with pytest.raises(openai.APIError):
                stream = await oai.completions.create(model="echo", prompt="ab#cd", stream=True)
                async for _ in stream:
                    pass
        # the engine keeps serving
        resp = await http.post(url, json={"model": "echo", "prompt": "ok"})
        assert resp.json()["choices"][0]["text"] == "ok"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "echo"}, "prompt"),
        ({"model": "echo", "prompt": 3}, "prompt"),
        ({"model": "echo", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"model": "echo", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "echo", "prompt": "x", "temperature": 9}, "temperature"),
        ({"model": "echo", "prompt": "x", "top_k": 4}, "top_k"),  # the graph has no top_k
        ({"model": "echo", "prompt": "x", "n": 2}, "n"),
        ({"model": "echo", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "echo", "prompt": "x", "frobnicate": 1}, "frobnicate"),
        ({"model": "echo", "prompt": "x", "stop": ["a"] * 5}, "stop"),
    ],
)
async def test_bad_fields_are_400_naming_the_field(
    serve: Any, echo: ModuleType, body: dict[str, Any], param: str
) -> None:
    async with serve(create_app(echo.build())) as server, httpx.AsyncClient() as http:
        resp = await http.post(server.url + "/v1/completions", json=body)
        assert_error(resp, 400, "invalid_request_error", param)
        assert repr(param) in resp.json()["error"]["message"]


async def test_malformed_requests(serve: Any, echo: ModuleType) -> None:
    app = create_app({"echo": echo.build(), "features": embed_graph()})
    async with serve(app) as server, httpx.AsyncClient() as http:
        url = server.url
        resp = await http.post(url + "/v1/completions", content=b'{"model": "echo", ')
        assert_error(resp, 400, "invalid_request_error")
        assert "malformed JSON" in resp.json()["error"]["message"]
        resp = await http.post(url + "/v1/completions", json=["not", "an", "object"])
        assert_error(resp, 400, "invalid_request_error")
        resp = await http.post(url + "/v1/completions", content=b"")
        assert_error(resp, 400, "invalid_request_error")
        resp = await http.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"})
        assert_error(resp, 404, "not_found_error", "model")
        resp = await http.post(url + "/v1/embeddings", json={"model": "echo", "input": "x"})
        assert_error(resp, 400, "invalid_request_error", "model")
        resp = await http.post(url + "/v1/embeddings", json={"model": "features", "input": [1]})
        assert_error(resp, 400, "invalid_request_error", "input")
        resp = await http.post(
            url + "/v1/graphs/echo/run", json={"input": "x", "params": {"top_k": 1}}
        )
        assert_error(resp, 400, "invalid_request_error", "params.top_k")
        resp = await http.get(url + "/v1/nowhere")
        assert_error(resp, 404, "not_found_error")
        resp = await http.get(url + "/v1/completions")
        assert_error(resp, 405, "invalid_request_error")


async def test_body_size_limit_is_413(serve: Any, echo: ModuleType) -> None:
    app = create_app(echo.build(), max_body_bytes=1000)
    async with serve(app) as server, httpx.AsyncClient() as http:
        url = server.url + "/v1/completions"
        big = {"model": "echo", "prompt": "y" * 1500}
        resp = await http.post(url, json=big)  # with Content-Length
        assert_error(resp, 413, "invalid_request_error")

        async def chunked() -> Any:
            data = json.dumps(big).encode()
            for i in range(0, len(data), 256):
                yield data[i : i + 256]

        resp = await http.post(url, content=chunked())  # no Content-Length
        assert_error(resp, 413, "invalid_request_error")
        resp = await http.post(url, json={"model": "echo", "prompt": "y" * 900})
        assert resp.status_code == 200


async def test_run_route_json_in_json_out(serve: Any, echo: ModuleType) -> None:
    @df.map
    def describe(x: dict[str, Any], scale: int = 1) -> dict[str, Any]:
        import torch

        return {"sum": torch.tensor(x["values"]).sum() * scale, "keys": sorted(x)}

    app = create_app([df.Graph("describe", describe), echo.build()])
    async with serve(app) as server, httpx.AsyncClient() as http:
        body = {"input": {"values": [1, 2, 3]}, "params": {"scale": 2}}
        resp = await http.post(server.url + "/v1/graphs/describe/run", json=body)
        assert resp.json() == {"output": {"sum": 12, "keys": ["values"]}}
        resp = await http.post(server.url + "/v1/graphs/echo/run", json={"input": "hey"})
        assert resp.json() == {"output": ["h", "e", "y"]}
        body = {"input": "hey", "stream": True, "params": {"max_new_tokens": 2}}
        resp = await http.post(server.url + "/v1/graphs/echo/run", json=body)
        assert events(resp.text) == [{"output": "h"}, {"output": "e"}, "[DONE]"]
        resp = await http.post(server.url + "/v1/graphs/missing/run", json={"input": 1})
        assert_error(resp, 404, "not_found_error", "model")
        models = (await http.get(server.url + "/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["describe", "echo"]


async def test_healthz_and_metrics(serve: Any, echo: ModuleType) -> None:
    engine = df.Engine(echo.build(), max_in_flight=4)
    async with serve(create_app(engine)) as server, httpx.AsyncClient() as http:
        health = await http.get(server.url + "/healthz")
        assert health.json() == {"status": "ok", "models": {"echo": "open"}}
        for prompt in ("abc", "fail: x"):
            await http.post(
                server.url + "/v1/completions", json={"model": "echo", "prompt": prompt}
            )
        text = (await http.get(server.url + "/metrics")).text
    assert 'dataflow_requests_total{graph="echo",outcome="succeeded"} 1.0' in text
    assert 'dataflow_requests_total{graph="echo",outcome="failed"} 1.0' in text
    assert 'dataflow_requests_in_flight{graph="echo"} 0.0' in text
    assert 'dataflow_node_service_seconds{graph="echo",node="echo",quantile="0.99"}' in text
    assert 'dataflow_edge_depth{edge="input->echo",graph="echo"} 0.0' in text
    assert 'dataflow_http_responses_total{route="/v1/completions",status="500"} 1.0' in text
    assert engine.state is df.EngineState.CLOSED  # the app's lifespan closed it
