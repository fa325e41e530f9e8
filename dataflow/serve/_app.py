"""The ASGI app: OpenAI-compatible completions and embeddings, a generic run route,
health and metrics, over one or more engines started in the app's lifespan."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Send

from ..engine import Engine, EngineState
from ..graph import Graph
from ..metrics import render
from ._asgi import SSEWriter, WatchedResponse, send_error, send_json
from ._dashboard import dashboard_routes
from ._errors import ApiError, error_body, from_exception, log
from ._metrics import HttpMetrics, new_registry
from ._openai import (
    Accepts,
    CompletionRequest,
    EmbeddingRequest,
    RunRequest,
    as_text,
    completion_chunk,
    completion_response,
    embedding_response,
    finish_reason,
    new_id,
    parse_completion,
    parse_embedding,
    parse_run,
    to_jsonable,
    usage,
)

__all__ = ["create_app"]

Served = Engine | Graph


def utf8_tokens(text: str) -> int:
    """Usage counting by default: UTF-8 bytes, the tokens of byte-level models."""
    return len(text.encode("utf-8"))


class Model:
    """One served graph and what its requests may carry."""

    def __init__(self, name: str, engine: Engine, owned: bool) -> None:
        self.name = name
        self.engine = engine
        self.owned = owned  # the app opens and closes it in its lifespan
        nodes = engine.graph.nodes.values()
        self.params: frozenset[str] = frozenset().union(*(n.info.params for n in nodes))
        self.any_param = any(n.info.accepts_any_param for n in nodes)
        self.streaming = engine.plan.streaming

    def takes(self, param: str) -> bool:
        return self.any_param or param in self.params


class ServeApp:
    """The state behind the routes (see :func:`create_app` for the options)."""

    def __init__(
        self,
        models: dict[str, Model],
        *,
        max_body_bytes: int,
        timeout: float | None,
        retry_after: float,
        count_tokens: Callable[[str], int],
    ) -> None:
        self.models = models
        self.max_body_bytes = max_body_bytes
        self.timeout = timeout
        self.retry_after = retry_after
        self.count_tokens = count_tokens
        self.registry = new_registry([m.engine for m in models.values()])

    # -- plumbing ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for model in self.models.values():
                if model.owned:
                    await stack.enter_async_context(model.engine)
            yield

    def model(self, name: str, kind: str) -> Model:
        model = self.models.get(name)
        if model is None:
            served = ", ".join(sorted(self.models)) or "none"
            raise ApiError(
                404,
                f"model {name!r} does not exist; served: {served}",
                param="model",
                code="model_not_found",
            )
        if kind == "embeddings" and model.streaming:
            raise ApiError(
                400,
                f"model {name!r} streams its outputs; it is not an embedding model",
                param="model",
                code="wrong_model_kind",
            )
        return model

    def _accepts(self, name: str, kind: str) -> Accepts:
        return self.model(name, kind).takes

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, refusing bodies over the limit before reading them whole.

        Raises:
            ApiError: 413 body too large, 400 empty or malformed JSON.
        """
        limit = self.max_body_bytes
        too_large = ApiError(
            413, f"request body is larger than {limit} bytes", code="body_too_large"
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_large
        if not data:
            raise ApiError(400, "the request body is empty; send a JSON object", code="empty")
        try:
            return json.loads(data)
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not UTF-8", code="invalid_json") from None
        except json.JSONDecodeError as exc:
            raise ApiError(
                400,
                f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                code="invalid_json",
            ) from None

    def fail(self, exc: BaseException, model: str) -> ApiError:
        return from_exception(exc, model=model, retry_after=self.retry_after)

    # -- /v1/completions -----------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        try:
            req = parse_completion(await self.read_json(request), self._accepts)
            model = self.models[req.model]
        except ApiError as err:
            return _error_response(err)
        if req.stream:
            return WatchedResponse(lambda send: self._stream_completion(model, req, send))
        return WatchedResponse(lambda send: self._complete(model, req, send))

    async def _generate(
        self, model: Model, req: CompletionRequest, index: int, emit: Callable[[int, str], Any]
    ) -> int:
        """Stream prompt ``index`` through the model, calling ``emit(index, text)`` per
        output; returns the number of outputs."""
        stream = model.engine.stream(
            req.prompts[index], timeout=self.timeout, wait=False, **req.params
        )
        count = 0
        async with contextlib.aclosing(stream):
            async for out in stream:
                count += 1
                await emit(index, as_text(out))
        return count

    async def _complete(self, model: Model, req: CompletionRequest, send: Send) -> None:
        n = len(req.prompts)
        texts: list[list[str]] = [[] for _ in range(n)]
        counts = [0] * n

        async def collect(index: int, text: str) -> None:
            texts[index].append(text)

        async def one(index: int) -> None:
            counts[index] = await self._generate(model, req, index, collect)

        error = await _first_error(n, one)  # one failed prompt fails the request
        if error is not None:
            await send_error(send, self.fail(error, model.name))
            return
        prompt_tokens = sum(self.count_tokens(p) for p in req.prompts)
        body = completion_response(
            new_id("cmpl"),
            model.name,
            ["".join(t) for t in texts],
            counts,
            req.max_tokens,
            prompt_tokens,
        )
        await send_json(send, 200, body)

    async def _stream_completion(self, model: Model, req: CompletionRequest, send: Send) -> None:
        cid, created = new_id("cmpl"), int(time.time())
        sse = SSEWriter(send)
        n = len(req.prompts)
        counts = [0] * n

        async def emit(index: int, text: str) -> None:
            await sse.event(completion_chunk(cid, model.name, created, index, text))

        async def finish(index: int, count: int) -> None:
            counts[index] = count
            reason = finish_reason(count, req.max_tokens)
            await sse.event(completion_chunk(cid, model.name, created, index, "", reason))

        try:
            if n == 1:
                await finish(0, await self._generate(model, req, 0, emit))
            else:
                await self._stream_many(model, req, emit, finish)
        except Exception as exc:
            await sse.fail(self.fail(exc, model.name))
            return
        if req.include_usage:
            prompt_tokens = sum(self.count_tokens(p) for p in req.prompts)
            chunk = completion_chunk(
                cid, model.name, created, None, usage_counts=usage(prompt_tokens, sum(counts))
            )
            await sse.event(chunk)
        await sse.done()

    async def _stream_many(
        self,
        model: Model,
        req: CompletionRequest,
        emit: Callable[[int, str], Any],
        finish: Callable[[int, int], Any],
    ) -> None:
        """Several prompts at once: their chunks interleave, each tagged with its index.
        Producers hand chunks to the one writer through a rendezvous stream, so a slow
        client holds back every prompt's generation rather than buffering it."""
        tx, rx = anyio.create_memory_object_stream[tuple[int, str | int | BaseException]](0)

        async def produce(index: int, out: Any) -> None:
            async def put(i: int, text: str) -> None:
                await out.send((i, text))

            async with out:
                try:
                    count = await self._generate(model, req, index, put)
                except Exception as exc:
                    await out.send((index, exc))
                    return
                await out.send((index, count))

        async with anyio.create_task_group() as tg:
            async with tx:
                for i in range(len(req.prompts)):
                    tg.start_soon(produce, i, tx.clone())
            async with rx:
                async for index, what in rx:
                    if isinstance(what, str):
                        await emit(index, what)
                    elif isinstance(what, int):
                        await finish(index, what)
                    else:
                        tg.cancel_scope.cancel()
                        raise what

    # -- /v1/embeddings ------------------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        try:
            req = parse_embedding(await self.read_json(request), self._accepts)
            model = self.models[req.model]
        except ApiError as err:
            return _error_response(err)
        return WatchedResponse(lambda send: self._embed(model, req, send))

    async def _embed(self, model: Model, req: EmbeddingRequest, send: Send) -> None:
        vectors: list[Any] = [None] * len(req.inputs)

        async def one(index: int) -> None:
            vectors[index] = await model.engine.run(
                req.inputs[index], timeout=self.timeout, wait=False, **req.params
            )

        # One request per input: dynamic batching inside the graph joins them with other
        # clients' inputs.
        error = await _first_error(len(req.inputs), one)
        if error is not None:
            await send_error(send, self.fail(error, model.name))
            return
        tokens = sum(self.count_tokens(t) for t in req.inputs)
        try:
            body = embedding_response(model.name, vectors, req.base64, tokens)
        except TypeError as exc:
            await send_error(send, ApiError(500, f"model {model.name!r}: {exc}", code="output"))
            return
        await send_json(send, 200, body)

    # -- /v1/graphs/{name}/run -----------------------------------------------------------
    async def run(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            model = self.model(name, "run")
            req = parse_run(await self.read_json(request), model.takes, name)
        except ApiError as err:
            return _error_response(err)
        timeout = req.timeout if req.timeout is not None else self.timeout
        if req.stream:
            return WatchedResponse(lambda send: self._run_stream(model, req, timeout, send))
        return WatchedResponse(lambda send: self._run_once(model, req, timeout, send))

    async def _run_once(
        self, model: Model, req: RunRequest, timeout: float | None, send: Send
    ) -> None:
        try:
            result = await model.engine.run(req.input, timeout=timeout, wait=False, **req.params)
            body = {"output": to_jsonable(result)}
        except TypeError as exc:
            err = ApiError(500, f"model {model.name!r}: output {exc}", code="output")
            await send_error(send, err)
            return
        except Exception as exc:
            await send_error(send, self.fail(exc, model.name))
            return
        await send_json(send, 200, body)

    async def _run_stream(
        self, model: Model, req: RunRequest, timeout: float | None, send: Send
    ) -> None:
        sse = SSEWriter(send)
        stream = model.engine.stream(req.input, timeout=timeout, wait=False, **req.params)
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    await sse.event({"output": to_jsonable(out)})
        except TypeError as exc:
            await sse.fail(ApiError(500, f"model {model.name!r}: output {exc}", code="output"))
            return
        except Exception as exc:
            await sse.fail(self.fail(exc, model.name))
            return
        await sse.done()

    # -- the rest ------------------------------------------------------------------------
    async def list_models(self, request: Request) -> Response:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "dataflow"}
            for name in self.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def healthz(self, request: Request) -> Response:
        states = {name: m.engine.state.value for name, m in self.models.items()}
        ok = all(m.engine.state is EngineState.OPEN for m in self.models.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", "models": states},
            status_code=200 if ok else 503,
        )

    async def metrics(self, request: Request) -> Response:
        body, content_type = render(self.registry)
        return Response(body, media_type=content_type)


async def _first_error(n: int, call: Callable[[int], Awaitable[None]]) -> BaseException | None:
    """Runs ``call(0) .. call(n - 1)``, concurrently when ``n > 1``; the first to raise
    cancels the rest. Returns that exception, or None when all succeeded."""
    errors: list[BaseException] = []

    async def one(index: int, tg: anyio.abc.TaskGroup | None) -> None:
        try:
            await call(index)
        except Exception as exc:
            errors.append(exc)
            if tg is not None:
                tg.cancel_scope.cancel()

    if n == 1:
        await one(0, None)
    else:
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i, tg)
    return errors[0] if errors else None


def _error_response(err: ApiError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


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
    served: Served | Mapping[str, Served] | Sequence[Served], max_in_flight: int | None
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
            models[name] = Model(name, Engine(what, max_in_flight=max_in_flight), owned=True)
        elif isinstance(what, Engine):
            if what.state in (EngineState.CLOSING, EngineState.CLOSED):
                raise ValueError(f"engine of {name!r} is {what.state.value}; pass a new one")
            models[name] = Model(name, what, owned=what.state is EngineState.UNOPENED)
        else:
            raise TypeError(f"{name!r}: expected an Engine or a Graph, got {type(what).__name__}")
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
) -> Starlette:
    """An ASGI app serving graphs over HTTP, OpenAI-compatible.

    Routes: ``POST /v1/completions`` (streaming with ``stream: true``), ``POST
    /v1/embeddings``, ``POST /v1/graphs/{name}/run``, ``GET /v1/models``, ``GET /healthz``
    and ``GET /metrics``. The OpenAI ``model`` field names the graph.

    Args:
        served: what to serve: a Graph or Engine, a list of them (named by their graph's
            name), or a mapping ``model name -> Graph | Engine``. Graphs and unopened
            engines start and stop with the app's lifespan; an engine already open is used
            as is and left to its owner.
        max_in_flight: admission limit of the engines built here from graphs; a request
            beyond it is answered 429 with ``Retry-After``. (An Engine passed in keeps its
            own ``max_in_flight``.)
        max_body_bytes: larger request bodies are answered 413.
        timeout: per-request deadline in seconds (504 when it passes); ``None``: none.
        retry_after: seconds suggested by a 429's ``Retry-After`` (rounded up).
        count_tokens: counts a prompt's tokens for ``usage`` (default: UTF-8 bytes).

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
    models = _models(served, max_in_flight)
    state = ServeApp(
        models,
        max_body_bytes=max_body_bytes,
        timeout=timeout,
        retry_after=retry_after,
        count_tokens=count_tokens,
    )
    routes = [
        Route("/v1/completions", state.completions, methods=["POST"]),
        Route("/v1/embeddings", state.embeddings, methods=["POST"]),
        Route("/v1/graphs/{name}/run", state.run, methods=["POST"]),
        Route("/v1/models", state.list_models, methods=["GET"]),
        Route("/healthz", state.healthz, methods=["GET"]),
        Route("/metrics", state.metrics, methods=["GET"]),
    ]
    routes += dashboard_routes(state)  # the page, /v1/stats, /v1/graphs (web helper)
    app = Starlette(
        routes=routes,
        lifespan=state.lifespan,
        middleware=[Middleware(HttpMetrics, registry=state.registry)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    app.state.serve = state
    return app
