"""The dashboard's routes: the page at ``/``, ``/v1/stats`` (windowed busy fractions),
``/v1/stats/stream`` and ``/v1/graphs``; the windowing itself on synthetic snapshots."""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette

import dataflow as df
from dataflow.serve import create_app
from dataflow.serve._dashboard import (
    MAX_WINDOW_S,
    Sampler,
    dashboard_routes,
    graph_description,
    windowed,
)
from graphs import tiny_lm

IDS = ["model", "prompt", "send", "stop", "output", "graph", "stats"]
IDS += ["max_tokens", "temperature", "seed", "output_stats", "requests", "api_key"]


# -- windowed figures on synthetic snapshots ---------------------------------------------
def snap(uptime: float, busy: list[float], depth: int = 0) -> dict[str, Any]:
    node = {"uptime_s": uptime, "busy_s": busy, "busy": [b / uptime for b in busy]}
    node |= {"items_in": 0, "items_out": 0, "failed": 0, "cancelled": 0}
    edge = {"capacity": 8, "depth": depth, "blocked_s": 0.0}
    return {
        "graph": "g",
        "requests": {"submitted": 0},
        "nodes": {"work": node},
        "edges": {"input->work": edge, "other->work": dict(edge, depth=1)},
    }


def test_windowed_busy_is_the_difference_per_replica() -> None:
    before = snap(10.0, [4.0, 1.0])
    now = snap(12.0, [5.5, 1.0], depth=3)
    out = windowed(now, before)
    node = out["nodes"]["work"]
    assert node["busy_window"] == pytest.approx([0.75, 0.0])  # 1.5 s of 2 s; idle
    assert node["busy"] == pytest.approx([5.5 / 12, 1 / 12])  # since start, untouched
    assert node["queue"] == {"depth": 4, "capacity": 16}  # summed over its input edges
    assert out["window_s"] == pytest.approx(2.0)
    assert out["bottleneck_window"]["node"] == "work"
    assert out["bottleneck_window"]["busy"] == pytest.approx(0.375)  # mean of replicas
    assert "busy_window" not in now["nodes"]["work"]  # the input is not modified


def test_windowed_without_a_baseline_is_since_start_and_clamped() -> None:
    out = windowed(snap(4.0, [1.0, 9.0]), None)
    assert out["nodes"]["work"]["busy_window"] == [0.25, 1.0]
    assert out["window_s"] == 4.0
    # a replica set that changed size: since start, not a wrong difference
    out = windowed(snap(4.0, [1.0, 2.0]), snap(2.0, [1.0]))
    assert out["nodes"]["work"]["busy_window"] == [0.25, 0.5]


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_sampler_differences_against_the_oldest_snapshot_inside_the_window() -> None:
    clock = FakeClock()
    snaps = iter([snap(1.0, [0.5]), snap(2.0, [1.5]), snap(3.0, [1.5]), snap(90.0, [1.5])])
    sampler = Sampler(lambda: next(snaps), clock)
    assert sampler.read(5.0)["nodes"]["work"]["busy_window"] == [0.5]  # since start
    clock.t += 1
    assert sampler.read(5.0)["nodes"]["work"]["busy_window"] == [1.0]  # 1 s of 1 s
    clock.t += 1
    # both older samples are inside 5 s: the oldest is the baseline (1 s busy of 2 s)
    assert sampler.read(5.0)["nodes"]["work"]["busy_window"] == [0.5]
    clock.t += MAX_WINDOW_S + 1  # everything kept has aged out
    out = sampler.read(5.0)
    assert out["nodes"]["work"]["busy_window"] == [pytest.approx(1.5 / 90)]


def test_sampler_of_an_engine_not_running() -> None:
    sampler = Sampler(lambda: {"graph": "g", "requests": {"submitted": 0}}, FakeClock())
    out = sampler.read(5.0)
    assert out["nodes"] == {} and out["edges"] == {} and out["bottleneck_window"] is None


# -- graphs ------------------------------------------------------------------------------
def _node(name: str) -> df.Node:
    def body(x: Any) -> Any:
        return x

    return df.map(body, name=name)


def test_graph_description_layers_a_dag() -> None:
    g = df.Graph("dag")
    src = g.add(_node("src"))
    left = g.add(_node("left"), src)
    deep = g.add(_node("deep"), g.add(_node("right"), src))
    g.add(df.merge("list", name="join"), left, deep)
    out = graph_description("m", g, {"src": "thread"})
    layers = {n["name"]: n["layer"] for n in out["nodes"]}
    assert layers == {"src": 0, "left": 1, "right": 1, "deep": 2, "join": 3}
    assert [n["name"] for n in out["nodes"]] == list(g.plan().order)
    src_node = out["nodes"][0]
    assert (src_node["placement"], src_node["runs_on"]) == ("loop", "thread")
    assert src_node["kind"] == "map" and src_node["label"].startswith("map")
    assert {(e["from"], e["to"]) for e in out["edges"]} == set(g.edges)
    assert all(e["capacity"] == g.nodes[e["to"]].input_capacity for e in out["edges"])
    assert (out["source"], out["sink"], out["generate"]) == ("src", "join", None)
    assert out["mermaid"] == g.to_mermaid()


def test_graph_description_of_tiny_lm_names_its_generate_node() -> None:
    out = graph_description("tiny_lm", tiny_lm.build(), {})
    assert out["generate"] == "tiny_lm" and out["streaming"]
    assert [(n["name"], n["kind"]) for n in out["nodes"]] == [
        ("prompt", "encode"),
        ("tiny_lm", "infer"),
    ]
    json.dumps(out)  # JSON-able as it is


# -- the routes in-process (asyncio and trio) --------------------------------------------
pytestmark = pytest.mark.anyio


def work_graph() -> df.Graph:
    @df.map(placement="thread")
    def work(x: str) -> str:
        time.sleep(0.05)  # allowed: the work whose busy time is measured
        return x

    return df.Graph("work", work)


async def test_stats_busy_moves_with_work_and_falls_back_when_idle() -> None:
    engine = df.Engine(work_graph())
    state = create_app(engine).state.serve
    clock = FakeClock()
    app = Starlette(routes=dashboard_routes(state, clock=clock), lifespan=state.lifespan)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            await engine.run("a")
            first = (await http.get("/v1/stats")).json()
            assert first["object"] == "stats" and first["window"] == 5.0
            [entry] = first["data"]
            assert entry["model"] == "work" and entry["state"] == "open"
            assert entry["requests"]["succeeded"] == 1
            clock.t += 1
            await engine.run("b")
            node = (await http.get("/v1/stats")).json()["data"][0]["nodes"]["work"]
            assert node["busy_window"][0] > 0  # the second request's work, in the window
            assert node["queue"] == {"depth": 0, "capacity": node["queue"]["capacity"]}
            clock.t += 1
            idle = (await http.get("/v1/stats?window=0.5")).json()["data"][0]
            assert idle["nodes"]["work"]["busy_window"] == [0.0]  # nothing ran since
            assert idle["nodes"]["work"]["busy"][0] > 0  # the since-start figure did not fall
            assert idle["bottleneck_window"]["busy"] == 0.0
            assert idle["bottleneck"]["busy"] > 0


async def test_stats_graphs_page_and_errors(echo: ModuleType) -> None:
    app = create_app({"a": echo.build(), "b": work_graph()})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            body = (await http.get("/v1/stats?model=b")).json()
            assert [d["model"] for d in body["data"]] == ["b"]
            both = (await http.get("/v1/stats")).json()
            assert [d["model"] for d in both["data"]] == ["a", "b"]
            for entry in both["data"]:
                for node in entry["nodes"].values():
                    assert len(node["busy_window"]) == node["replicas"]
            graphs = (await http.get("/v1/graphs")).json()
            assert graphs["object"] == "list"
            assert [g["name"] for g in graphs["data"]] == ["a", "b"]
            [node] = graphs["data"][1]["nodes"]
            assert (node["name"], node["kind"], node["placement"]) == ("work", "map", "thread")

            for query, param in [
                ("model=nope", "model"),
                ("window=0", "window"),
                ("window=abc", "window"),
                ("window=1e9", "window"),
            ]:
                resp = await http.get(f"/v1/stats?{query}")
                assert resp.status_code in (400, 404), query
                assert resp.json()["error"]["param"] == param
                assert "Traceback" not in resp.text
            resp = await http.get("/v1/stats/stream?interval=0")
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "interval"
            resp = await http.get("/v1/stats/stream?count=-1")
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "count"

            resp = await http.get("/v1/stats/stream?count=2&interval=0.1&model=a")
            assert resp.headers["content-type"].startswith("text/event-stream")
            blocks = [b for b in resp.text.split("\n\n") if b]
            assert len(blocks) == 3 and blocks[-1] == "data: [DONE]"
            events = [json.loads(b.removeprefix("data: ")) for b in blocks[:2]]
            assert all(e["object"] == "stats" and e["data"][0]["model"] == "a" for e in events)

            page = await http.get("/")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            html = page.text
            for element_id in IDS:
                assert f'id="{element_id}"' in html, element_id
            assert (await http.get("/static/dashboard.js")).status_code == 200
            assert (await http.get("/static/nope.js")).status_code == 404


async def test_page_is_self_contained_under_its_csp() -> None:
    app = create_app(work_graph())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        page = await http.get("/")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "http" not in csp  # no other origin
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        [inline] = re.findall(f"<{tag}>(.*?)</{tag}>", page.text, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in csp
    # nothing loaded from anywhere: no src/href to another origin, no external asset
    assert not re.search(r'(src|href)="(https?:)?//', page.text)
    assert 'src="' not in page.text


async def test_api_key_guards_the_data_not_the_page() -> None:
    if "api_key" not in inspect.signature(create_app).parameters:
        pytest.skip("create_app has no api_key option in this tree")
    secret = "sekret-123"
    app = create_app(work_graph(), api_key=secret)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            page = await http.get("/")
            assert page.status_code == 200 and secret not in page.text
            for path in ("/v1/stats", "/v1/stats/stream?count=1", "/v1/graphs"):
                resp = await http.get(path)
                assert resp.status_code == 401, path
                assert "error" in resp.json()
                auth = {"Authorization": f"Bearer {secret}"}
                assert (await http.get(path, headers=auth)).status_code == 200, path


# -- a real server: the stats stream ends when its client goes away ---------------------
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn runs on asyncio
async def test_stats_stream_over_uvicorn_ends_on_disconnect(serve: Any, echo: ModuleType) -> None:
    async with serve(create_app(echo.build())) as server, httpx.AsyncClient() as http:
        url = server.url + "/v1/stats/stream?interval=0.1"
        async with http.stream("GET", url) as resp:
            assert resp.status_code == 200
            lines = resp.aiter_lines()
            seen = 0
            while seen < 2:
                line = await anext(lines)
                if line.startswith("data: {"):
                    assert json.loads(line[6:])["data"][0]["model"] == "echo"
                    seen += 1
        with anyio.fail_after(10):
            await server.probe.wait_finished(1)  # the endless stream ended server-side
        assert server.probe.finished == ["/v1/stats/stream"]


def test_static_assets_ship_as_package_data() -> None:
    import tomllib
    from importlib import resources

    root = Path(__file__).resolve().parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    assert "serve/static/*" in config["tool"]["setuptools"]["package-data"]["dataflow"]
    static = resources.files("dataflow.serve") / "static"
    assert {p.name for p in static.iterdir()} >= {"index.html", "dashboard.js", "dashboard.css"}
