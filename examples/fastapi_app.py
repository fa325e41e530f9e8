"""A FastAPI app that embeds the engine: created in the app's lifespan, streaming tokens
from the app's own route.

    uvicorn examples.fastapi_app:app
    curl -N 'http://127.0.0.1:8000/generate?prompt=def%20main(&max_new_tokens=64'

The graph is ``graphs.tiny_lm`` unless ``DATAFLOW_GRAPH`` names another graph module (any
streaming graph whose input is a prompt string and whose outputs are text chunks).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse

import dataflow as df

GRAPH = os.environ.get("DATAFLOW_GRAPH", "graphs.tiny_lm")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    graph = importlib.import_module(GRAPH).build()
    # The engine lives exactly as long as the app: started before the first request,
    # drained and joined after the last.
    async with df.Engine(graph, max_in_flight=64) as engine:
        app.state.engine = engine
        yield


app = FastAPI(title="dataflow + FastAPI", lifespan=lifespan)


@app.get("/generate")
async def generate(request: Request, prompt: str, max_new_tokens: int = 64) -> StreamingResponse:
    """Stream the completion of ``prompt`` as plain text, chunk by chunk."""
    engine: df.Engine = request.app.state.engine
    try:
        # wait=False: a full engine answers 503 at once instead of queueing the client.
        stream = engine.stream(prompt, wait=False, max_new_tokens=max_new_tokens)
        first = await anext(stream, None)
    except df.Overloaded as exc:
        raise HTTPException(503, "busy, retry later", headers={"Retry-After": "1"}) from exc
    except df.InvalidRequest as exc:
        # the client's fault (an empty prompt, more tokens than the graph allows): 400
        # with the engine's one-line explanation, never a traceback
        raise HTTPException(400, str(exc)) from exc
    except df.NodeError as exc:
        raise HTTPException(500, f"generation failed in node {exc.node!r}") from exc
    except df.DataflowError as exc:
        raise HTTPException(500, f"generation failed ({type(exc).__name__})") from exc

    async def chunks() -> AsyncIterator[str]:
        # Closing the stream (the client went away, or the response ended) cancels the
        # request inside the engine.
        async with stream:
            if first is not None:
                yield first
            async for chunk in stream:
                yield chunk

    return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
