"""The web playground and live dashboard: ``GET /`` (the page), its static assets, and
the JSON it reads: ``GET /v1/stats``, ``GET /v1/stats/stream`` (server-sent events) and
``GET /v1/graphs`` (see ``docs/dashboard.md`` for the shapes).

The page streams completions through the server's own ``POST /v1/completions`` and holds
no secret: it asks the user for an API key when the server answers 401.

Busy fractions here are *windowed*: each stats answer differences the engine's cumulative
per-replica busy seconds against a snapshot taken a few seconds earlier (kept per model
in :class:`Sampler`), so the figure moves while a request runs and falls back to zero
when the graph is idle, unlike the since-start figure of ``engine.stats()``.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Send

from ..graph import Graph, generation_config
from ..graph._render import describe
from ..runtime._stats import bottleneck
from ._asgi import SSEWriter, WatchedResponse
from ._errors import ApiError

if TYPE_CHECKING:
    from ._app import ServeApp
    from ._models import Model

__all__ = ["Sampler", "dashboard_routes", "graph_description", "windowed"]

Handler = Callable[[Request], Awaitable[Response]]

DEFAULT_WINDOW_S = 5.0
MAX_WINDOW_S = 60.0
# Samples closer together than this are not kept (a burst of callers shares them).
_MIN_SPACING_S = 0.1

_ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_SCRIPT_TAG = '<script src="static/dashboard.js"></script>'
_STYLE_TAG = '<link rel="stylesheet" href="static/dashboard.css">'


def _page(html: str, script: str, style: str) -> tuple[bytes, str]:
    """The page as one document (its script and style inlined, so loading it needs no
    other route: the API key check leaves only ``/`` open) and its Content-Security-Policy,
    which allows exactly that script and style (by hash) and talks only to this origin."""
    if _SCRIPT_TAG not in html or _STYLE_TAG not in html:
        raise RuntimeError("dataflow/serve/static/index.html lost its script or style tag")
    if "</script" in script or "</style" in style:
        raise RuntimeError("an inlined dashboard asset would end its own tag")

    def digest(text: str) -> str:
        raw = hashlib.sha256(text.encode("utf-8")).digest()
        return "'sha256-" + base64.b64encode(raw).decode("ascii") + "'"

    body = html.replace(_SCRIPT_TAG, f"<script>{script}</script>").replace(
        _STYLE_TAG, f"<style>{style}</style>"
    )
    csp = (
        f"default-src 'none'; script-src {digest(script)}; style-src {digest(style)}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return body.encode("utf-8"), csp


# -- windowed figures (pure) -------------------------------------------------------------
def windowed(now: Mapping[str, Any], before: Mapping[str, Any] | None) -> dict[str, Any]:
    """``now`` (an ``engine.stats()`` snapshot) with windowed figures added.

    Each node gains ``busy_window`` (per replica: busy seconds over wall seconds between
    ``before`` and ``now``; since the engine started when ``before`` is None) and
    ``queue`` (``{"depth", "capacity"}`` summed over its input edges); the snapshot gains
    ``window_s`` (the window's length) and ``bottleneck_window`` (the runtime's
    bottleneck rule over the same window).
    """
    out = dict(now)
    nodes: dict[str, Any] = {}
    window = 0.0
    queues: dict[str, dict[str, int]] = {}
    for edge, figures in now.get("edges", {}).items():
        down = edge.rsplit("->", 1)[1]
        q = queues.setdefault(down, {"depth": 0, "capacity": 0})
        q["depth"] += figures["depth"]
        q["capacity"] += figures["capacity"]
    for name, node in now.get("nodes", {}).items():
        prev = before["nodes"].get(name) if before is not None else None
        busy = list(node["busy_s"])
        span = node["uptime_s"]
        if prev is not None and len(prev["busy_s"]) == len(busy):
            busy = [b - a for a, b in zip(prev["busy_s"], busy, strict=True)]
            span -= prev["uptime_s"]
        window = max(window, span)
        fractions = [min(1.0, max(0.0, b / span)) if span > 0 else 0.0 for b in busy]
        nodes[name] = {
            **node,
            "busy_window": fractions,
            "queue": queues.get(name, {"depth": 0, "capacity": 0}),
        }
    out["nodes"] = nodes
    out["window_s"] = window
    # The runtime's bottleneck rule differences whole snapshots: only when both have the
    # same nodes with the same replicas (else it is taken since the engine started).
    comparable = before is not None and {
        name: len(node["busy_s"]) for name, node in before.get("nodes", {}).items()
    } == {name: len(node["busy_s"]) for name, node in nodes.items()}
    if nodes:
        since = dict(before) if comparable and before is not None else None
        out["bottleneck_window"] = bottleneck(dict(now), since)
    else:
        out["bottleneck_window"] = None
    return out


class Sampler:
    """Recent ``engine.stats()`` snapshots of one model, to difference against.

    Snapshots are taken on demand (by each stats answer), at most one per 0.1 s, and
    kept for :data:`MAX_WINDOW_S`.
    """

    def __init__(self, stats: Callable[[], dict[str, Any]], clock: Callable[[], float]) -> None:
        self._stats = stats
        self._clock = clock
        self._samples: deque[tuple[float, dict[str, Any]]] = deque()

    def read(self, window: float) -> dict[str, Any]:
        """The snapshot now, with figures over the last ``window`` seconds (or over as
        much history as there is, since the engine started on the first call)."""
        t = self._clock()
        snap = self._stats()
        if "nodes" not in snap:  # the engine is not running (yet, or any more)
            self._samples.clear()
            return {**snap, "nodes": {}, "edges": {}, "window_s": 0.0, "bottleneck_window": None}
        while self._samples and t - self._samples[0][0] > MAX_WINDOW_S:
            self._samples.popleft()
        base = None
        for ts, old in self._samples:  # the oldest sample inside the window
            if t - ts <= window:
                base = old
                break
        if base is None and self._samples:
            base = self._samples[-1][1]
        if not self._samples or t - self._samples[-1][0] >= _MIN_SPACING_S:
            self._samples.append((t, snap))
        return windowed(snap, base)


# -- graphs ------------------------------------------------------------------------------
def graph_description(name: str, graph: Graph, resolved: Mapping[str, str]) -> dict[str, Any]:
    """One served graph as JSON: nodes (in topological order, with their layer for a
    left-to-right drawing), edges with their capacities, and its Mermaid text.

    ``resolved`` maps node names to where the running engine placed them (``"auto"``
    resolved); nodes missing from it keep their declared placement.
    """
    plan = graph.plan()
    layer: dict[str, int] = {}
    for node_name in plan.order:
        ups = plan.upstream[node_name]
        layer[node_name] = 1 + max((layer[u] for u in ups), default=-1)
    nodes = []
    for node_name in plan.order:
        node = graph.nodes[node_name]
        batch = node.batch
        nodes.append(
            {
                "name": node_name,
                "kind": node.kind,
                "placement": node.placement,
                "runs_on": resolved.get(node_name, node.placement),
                "replicas": node.replicas,
                "capacity": node.input_capacity,
                "batch": (
                    None
                    if batch is None
                    else {"max_size": batch.max_size, "max_wait_s": batch.max_wait}
                ),
                "layer": layer[node_name],
                "label": describe(node),
            }
        )
    edges = [
        {"from": src, "to": dst, "capacity": graph.nodes[dst].input_capacity}
        for src, dst in graph.edges
    ]
    found = generation_config(graph)
    return {
        "name": name,
        "graph": graph.name,
        "streaming": plan.streaming,
        "generate": found[0] if found is not None else None,
        "source": plan.source,
        "sink": plan.sink,
        "input_capacity": graph.nodes[plan.source].input_capacity,
        "nodes": nodes,
        "edges": edges,
        "mermaid": graph.to_mermaid(),
    }


# -- routes ------------------------------------------------------------------------------
class Dashboard:
    """The dashboard's routes over the app's served models."""

    def __init__(self, models: Mapping[str, Model], clock: Callable[[], float]) -> None:
        self.models = models
        self.samplers = {name: Sampler(m.engine.stats, clock) for name, m in models.items()}
        self.clock = clock
        files = resources.files("dataflow.serve") / "static"
        self.assets = {name: (files / name).read_bytes() for name in _ASSETS}
        self.page, self.csp = _page(
            (files / "index.html").read_text("utf-8"),
            self.assets["dashboard.js"].decode("utf-8"),
            self.assets["dashboard.css"].decode("utf-8"),
        )

    # The page holds no secret and no data: it is open, like /healthz.
    async def index(self, request: Request) -> Response:
        headers = {"content-security-policy": self.csp, "cache-control": "no-cache"}
        return Response(self.page, media_type="text/html; charset=utf-8", headers=headers)

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = self.assets.get(name)
        if body is None:
            err = ApiError(404, f"no asset {name!r}", code="not_found")
            return JSONResponse(err.body(), status_code=404)
        return Response(body, media_type=_ASSETS[name], headers={"cache-control": "no-cache"})

    def _query(self, request: Request) -> tuple[list[str], float]:
        """``?model=`` (repeatable; default: every model) and ``?window=`` seconds."""
        names = request.query_params.getlist("model") or list(self.models)
        for name in names:
            if name not in self.models:
                served = ", ".join(sorted(self.models))
                raise ApiError(
                    404,
                    f"model {name!r} does not exist; served: {served}",
                    param="model",
                    code="model_not_found",
                )
        window = _number(request, "window", DEFAULT_WINDOW_S, 0.1, MAX_WINDOW_S)
        return names, window

    def stats_body(self, names: list[str], window: float) -> dict[str, Any]:
        data = []
        for name in names:
            snap = self.samplers[name].read(window)
            data.append({"model": name, "state": self.models[name].engine.state.value, **snap})
        return {"object": "stats", "time": time.time(), "window": window, "data": data}

    async def stats(self, request: Request) -> Response:
        try:
            names, window = self._query(request)
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)
        return JSONResponse(self.stats_body(names, window))

    async def stats_stream(self, request: Request) -> Response:
        try:
            names, window = self._query(request)
            interval = _number(request, "interval", 1.0, 0.1, 60.0)
            count = int(_number(request, "count", 0, 0, 1e9, integer=True))
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status)

        async def write(send: Send) -> None:
            sse = SSEWriter(send)
            sent = 0
            while True:
                await sse.event(self.stats_body(names, window))
                sent += 1
                if count and sent >= count:
                    break
                await anyio.sleep(interval)  # allowed: the stream's own refresh period
            await sse.done()

        return WatchedResponse(write)

    async def graphs(self, request: Request) -> Response:
        data = []
        for name, model in self.models.items():
            snap = model.engine.stats()
            resolved = {n: v["placement"] for n, v in snap.get("nodes", {}).items()}
            data.append(graph_description(name, model.engine.graph, resolved))
        return JSONResponse({"object": "list", "data": data})


def _number(
    request: Request,
    key: str,
    default: float,
    low: float,
    high: float,
    *,
    integer: bool = False,
) -> float:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(
            400,
            f"query parameter {key!r} must be {kind} in {low:g}..{high:g}, got {raw!r}",
            param=key,
            code="invalid_query",
        )
    return value


def _guard(state: ServeApp, handler: Handler) -> Handler:
    """``handler`` behind the server's API key check. The app's ``ApiKeyAuth`` middleware
    (``_auth.py``) already checks every path but ``/`` and ``/healthz``, so there is
    nothing to add here; a per-route check would wrap ``handler`` in this one place."""
    return handler


def dashboard_routes(
    state: ServeApp, *, clock: Callable[[], float] = time.monotonic
) -> list[Route]:
    """The page, its assets and the stats/graphs JSON, for ``create_app`` to mount."""
    dash = Dashboard(state.models, clock)
    return [
        Route("/", dash.index, methods=["GET"]),
        Route("/static/{name}", dash.asset, methods=["GET"]),
        Route("/v1/stats", _guard(state, dash.stats), methods=["GET"]),
        Route("/v1/stats/stream", _guard(state, dash.stats_stream), methods=["GET"]),
        Route("/v1/graphs", _guard(state, dash.graphs), methods=["GET"]),
    ]
