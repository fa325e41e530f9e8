"""The ASGI app: OpenAI-compatible completions, chat completions and embeddings, a generic
run route, models, health and metrics, over one or more engines started in the app's
lifespan."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Scope, Send

from .._errors import Overloaded
from ..engine import Engine, EngineState
from ..graph import Graph
from ..metrics import render
from ._asgi import SSEWriter, WatchedResponse, send_error, send_json
from ._auth import ApiKeyAuth
from ._completions import generation_route
from ._dashboard import dashboard_routes
from ._errors import ApiError, error_body, from_exception, log
from ._fields import find_lone_surrogate, has_surrogate_escape
from ._limits import ceiling
from ._metrics import HttpMetrics, ModelMetrics, new_registry, set_model
from ._models import Model
from ._openai import EmbeddingRequest, ModelInfo, RunRequest, parse_embedding, parse_run
from ._sequences import run_all
from ._shapes import embedding_response, to_jsonable
from ._shutdown import Cancellable

__all__ = ["Model", "ServeApp", "create_app"]

Served = Engine | Graph


def utf8_tokens(text: str) -> int:
    """Usage counting by default: UTF-8 bytes, the tokens of byte-level models."""
    return len(text.encode("utf-8"))


class ServeApp:
    """The state behind the routes (see :func:`create_app` for the options)."""

    def __init__(
        self,
        models: dict[str, Model],
        *,
        max_body_bytes: int,
        timeout: float | None,
        api_key: str | None,
    ) -> None:
        self.models = models
        self.max_body_bytes = max_body_bytes
        self.timeout = timeout
        self.api_key = api_key
        self.registry = new_registry([m.engine for m in models.values()])
        self.metrics = ModelMetrics(self.registry, models)
        self.requests = Cancellable()  # what a graceful shutdown ends after its grace

    # -- plumbing ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for model in self.models.values():
                if model.owned:
                    await stack.enter_async_context(model.engine)
            yield

    def model(self, name: str, endpoint: str) -> Model:
        """The model named ``name``, checked to serve ``endpoint``.

        Raises:
            ApiError: 404 no such model; 400 a model of another kind.
        """
        model = self.models.get(name)
        if model is None:
            served = ", ".join(sorted(self.models)) or "none"
            raise ApiError(
                404,
                f"model {name!r} does not exist; served: {served}",
                param="model",
                code="model_not_found",
            )
        model.check_endpoint(endpoint)
        return model

    def lookup(self, scope: Scope) -> Callable[[str, str], ModelInfo]:
        """``model(name, endpoint)`` that also labels the exchange's metrics."""

        def find(name: str, endpoint: str) -> ModelInfo:
            model = self.model(name, endpoint)
            set_model(scope, model.name)
            return model

        return find

    def admit(self, model: Model) -> None:
        """A request of several inputs is admitted as a whole: 429 at once if the engine
        is full, else all its inputs run (a few at a time), however many there are."""
        limit = model.engine.max_in_flight
        if limit is not None and model.engine.counters.in_flight >= limit:
            raise self.fail(Overloaded(f"model {model.name!r} is full"), model)

    def window(self, model: Model) -> int:
        """How many of one request's inputs run at once."""
        limit = model.engine.max_in_flight
        return 64 if limit is None else max(1, min(64, limit // 2))

    def log_user(self, model: str, endpoint: str, user: str) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("model %r /v1/%s for user %r", model, endpoint, user[:256])

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, refusing bodies over the limit before reading them whole.

        Raises:
            ApiError: 413 body too large, 400 empty or malformed JSON, or a string with a
                lone surrogate.
        """
        limit = self.max_body_bytes
        too_large = ApiError(
            413, f"request body is larger than {limit} bytes", code="body_too_large"
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        data = bytearray()
        receive = request.receive  # the ASGI messages themselves: cheaper than .stream()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ApiError(400, "the client went away before sending its body", code="empty")
            data += message.get("body", b"")
            if len(data) > limit:
                raise too_large
            if not message.get("more_body", False):
                break
        if not data:
            raise ApiError(400, "the request body is empty; send a JSON object", code="empty")
        try:
            body = json.loads(data)
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not UTF-8", code="invalid_json") from None
        except json.JSONDecodeError as exc:
            raise ApiError(
                400,
                f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                code="invalid_json",
            ) from None
        except RecursionError:
            raise ApiError(400, "the JSON is nested too deeply", code="invalid_json") from None
        if has_surrogate_escape(bytes(data)):
            where = find_lone_surrogate(body)
            if where is not None:
                param = where.removeprefix("body").lstrip(".") or None
                raise ApiError(
                    400,
                    f"{param or 'the body'!s} holds a lone UTF-16 surrogate; send valid Unicode",
                    param=param,
                    code="invalid_text",
                )
        return body

    def fail(self, exc: BaseException, model: Model) -> ApiError:
        return from_exception(exc, model=model.name, retry_after=model.drain.retry_after())

    @staticmethod
    def cut() -> ApiError:
        """The answer to a request ended by a shutdown's grace running out."""
        return ApiError(
            503,
            "the server is shutting down; the request was ended after its grace period",
            code="shutting_down",
        )

    def error_response(self, err: ApiError) -> Response:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    # -- /v1/completions, /v1/chat/completions -------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await generation_route(self, request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await generation_route(self, request, chat=True)

    # -- /v1/embeddings ------------------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        try:
            req = parse_embedding(await self.read_json(request), self.lookup(request.scope))
            model = self.models[req.model]
        except ApiError as err:
            return self.error_response(err)
        return WatchedResponse(lambda send: self._embed(model, req, send))

    async def _embed(self, model: Model, req: EmbeddingRequest, send: Send) -> None:
        vectors: list[Any] = [None] * len(req.inputs)
        many = len(req.inputs) > 1
        if many:
            try:
                self.admit(model)
            except ApiError as err:
                await send_error(send, err)
                return

        async def one(index: int) -> None:
            vectors[index] = await model.engine.run(
                req.inputs[index], timeout=self.timeout, wait=many, params=req.params
            )

        # One request per input: dynamic batching inside the graph joins them with other
        # clients' inputs.
        with self.requests.scope() as scope:
            error = await run_all(len(req.inputs), one, self.window(model))
        if scope.cancelled_caught:
            error = self.cut()
        if error is not None:
            await send_error(send, self.fail(error, model))
            return
        tokens = sum(model.count_tokens(t) for t in req.inputs)
        try:
            body = embedding_response(model.name, vectors, req.base64, tokens)
        except TypeError as exc:
            await send_error(send, ApiError(500, f"model {model.name!r}: {exc}", code="output"))
            return
        self.metrics.prompt_tokens.labels(model.name).inc(tokens)
        await send_json(send, 200, body)

    # -- /v1/graphs/{name}/run -----------------------------------------------------------
    async def run(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            model = self.lookup(request.scope)(name, "run")
            assert isinstance(model, Model)
            req = parse_run(await self.read_json(request), model)
        except ApiError as err:
            return self.error_response(err)
        timeout = ceiling(self.timeout, req.timeout)  # the server's limit is a ceiling
        if req.stream:
            return WatchedResponse(lambda send: self._run_stream(model, req, timeout, send))
        return WatchedResponse(lambda send: self._run_once(model, req, timeout, send))

    async def _run_once(
        self, model: Model, req: RunRequest, timeout: float | None, send: Send
    ) -> None:
        try:
            with self.requests.scope() as scope:
                result = await model.engine.run(
                    req.input, timeout=timeout, wait=False, params=req.params
                )
            if scope.cancelled_caught:
                await send_error(send, self.cut())
                return
            body = {"output": to_jsonable(result)}
        except TypeError as exc:
            err = ApiError(500, f"model {model.name!r}: output {exc}", code="output")
            await send_error(send, err)
            return
        except Exception as exc:
            await send_error(send, self.fail(exc, model))
            return
        await send_json(send, 200, body)

    async def _run_stream(
        self, model: Model, req: RunRequest, timeout: float | None, send: Send
    ) -> None:
        sse = SSEWriter(send)
        try:
            stream = model.engine.stream(req.input, timeout=timeout, wait=False, params=req.params)
            with self.requests.scope() as scope:
                async with stream:
                    async for out in stream:
                        await sse.event({"output": to_jsonable(out)})
            if scope.cancelled_caught:
                await sse.fail(self.cut())
                return
        except TypeError as exc:
            await sse.fail(ApiError(500, f"model {model.name!r}: output {exc}", code="output"))
            return
        except Exception as exc:
            await sse.fail(self.fail(exc, model))
            return
        await sse.done()

    # -- the rest ------------------------------------------------------------------------
    @staticmethod
    def _card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "dataflow"}

    async def list_models(self, request: Request) -> Response:
        data = [self._card(name) for name in self.models]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["id"]
        try:
            model = self.lookup(request.scope)(name, "run")
        except ApiError as err:
            return self.error_response(err)
        return JSONResponse(self._card(model.name))

    async def healthz(self, request: Request) -> Response:
        states = {name: m.engine.state.value for name, m in self.models.items()}
        ok = all(m.engine.state is EngineState.OPEN for m in self.models.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "models": states},
            status_code=200 if ok else 503,
        )

    async def metrics_route(self, request: Request) -> Response:
        for model in self.models.values():
            model.drain.sample()
        body, content_type = render(self.registry)
        return Response(body, media_type=content_type)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        error_body(exc.status_code, str(exc.detail)),
        status_code=exc.status_code,
        headers=dict(exc.headers or {}),
    )


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return JSONResponse(error_body(500, "internal error"), status_code=500)


def _models(
    served: Served | Mapping[str, Served] | Sequence[Served],
    max_in_flight: int | None,
    count_tokens: Callable[[str], int],
    retry_after: float,
) -> dict[str, Model]:
    if isinstance(served, Engine | Graph):
        items: list[tuple[str, Served]] = [(_name(served), served)]
    elif isinstance(served, Mapping):
        items = list(served.items())
    elif isinstance(served, Sequence) and not isinstance(served, str):
        items = [(_name(s), s) for s in served]
    else:
        raise TypeError(
            "create_app needs an Engine, a Graph, or a mapping or list of them, "
            f"got {type(served).__name__}"
        )
    models: dict[str, Model] = {}
    for name, what in items:
        if name in models:
            raise ValueError(f"two served graphs are named {name!r}; pass a mapping of names")
        if isinstance(what, Graph):
            engine, owned = Engine(what, max_in_flight=max_in_flight), True
        elif isinstance(what, Engine):
            if what.state in (EngineState.CLOSING, EngineState.CLOSED):
                raise ValueError(f"engine of {name!r} is {what.state.value}; pass a new one")
            engine, owned = what, what.state is EngineState.UNOPENED
        else:
            raise TypeError(f"{name!r}: expected an Engine or a Graph, got {type(what).__name__}")
        models[name] = Model(
            name, engine, owned, count_tokens=count_tokens, retry_after=retry_after
        )
    if not models:
        raise ValueError("create_app needs at least one graph to serve")
    return models


def _name(what: Served) -> str:
    return what.graph.name if isinstance(what, Engine) else what.name


def create_app(
    served: Served | Mapping[str, Served] | Sequence[Served],
    *,
    max_in_flight: int | None = 256,
    max_body_bytes: int = 1 << 20,
    timeout: float | None = None,
    retry_after: float = 1.0,
    count_tokens: Callable[[str], int] = utf8_tokens,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
) -> Starlette:
    """An ASGI app serving graphs over HTTP, OpenAI-compatible.

    Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming with
    ``stream: true``), ``POST /v1/embeddings``, ``POST /v1/graphs/{name}/run``, ``GET
    /v1/models``, ``GET /v1/models/{id}``, ``GET /healthz`` and ``GET /metrics`` (see
    ``docs/serve.md``). The OpenAI ``model`` field names the graph.

    Args:
        served: what to serve: a Graph or Engine, a list of them (named by their graph's
            name), or a mapping ``model name -> Graph | Engine``. Graphs and unopened
            engines start and stop with the app's lifespan; an engine already open is used
            as is and left to its owner.
        max_in_flight: admission limit of the engines built here from graphs; a request
            beyond it is answered 429 with ``Retry-After``. (An Engine passed in keeps its
            own ``max_in_flight``.)
        max_body_bytes: larger request bodies are answered 413.
        timeout: per-request deadline in seconds (504 when it passes); a client's own
            ``timeout`` (run route) may only shorten it. ``None``: none.
        retry_after: seconds a 429 suggests while no recent drain rate is known (else
            it is computed from how fast requests have been ending).
        count_tokens: counts a prompt's tokens for ``usage`` of graphs that do not report
            their own (default: UTF-8 bytes). Generate graphs report exact counts.
        api_key: when set, every route but ``/healthz`` (and the dashboard page) needs
            ``Authorization: Bearer <api_key>`` (401 otherwise).
        cors_origins: origins allowed to call the API from a browser (CORS is off when
            empty); ``["*"]`` allows any.

    Raises:
        TypeError, ValueError: nothing to serve, a duplicate name, a closed engine, or a
            bad limit.
    """
    if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
        raise ValueError(f"max_in_flight must be an int >= 1 or None, got {max_in_flight!r}")
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an int >= 1, got {max_body_bytes!r}")
    if timeout is not None and (not timeout > 0 or math.isinf(timeout)):
        raise ValueError(f"timeout must be seconds > 0 or None, got {timeout!r}")
    if not retry_after > 0:
        raise ValueError(f"retry_after must be seconds > 0, got {retry_after!r}")
    if api_key is not None and not (isinstance(api_key, str) and api_key):
        raise ValueError("api_key must be a non-empty string or None")
    if isinstance(cors_origins, str):
        raise TypeError("cors_origins must be a list of origins, not a string")
    models = _models(served, max_in_flight, count_tokens, retry_after)
    state = ServeApp(models, max_body_bytes=max_body_bytes, timeout=timeout, api_key=api_key)
    routes = [
        Route("/v1/completions", state.completions, methods=["POST"]),
        Route("/v1/chat/completions", state.chat_completions, methods=["POST"]),
        Route("/v1/embeddings", state.embeddings, methods=["POST"]),
        Route("/v1/graphs/{name}/run", state.run, methods=["POST"]),
        Route("/v1/models", state.list_models, methods=["GET"]),
        Route("/v1/models/{id:path}", state.get_model, methods=["GET"]),
        Route("/healthz", state.healthz, methods=["GET"]),
        Route("/metrics", state.metrics_route, methods=["GET"]),
    ]
    routes += dashboard_routes(state)  # the page, /v1/stats, /v1/graphs (web helper)
    middleware = [Middleware(HttpMetrics, registry=state.registry, models=state.metrics)]
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["authorization", "content-type"],
            )
        )
    if api_key is not None:
        middleware.append(Middleware(ApiKeyAuth, api_key=api_key))
    app = Starlette(
        routes=routes,
        lifespan=state.lifespan,
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.serve = state
    return app
