"""Streaming over HTTP vs in-process: tokens/s and time to first token, 64 clients; and
the round trip of one small request vs a bare Starlette handler.

The same graph and load run twice in one go: 64 concurrent ``engine.stream`` consumers in
this process, then 64 concurrent HTTP clients (SSE, ``/v1/completions``, each on its own
keep-alive connection, opened and used once before the timed run) against ``dataflow
serve`` in a child process. The clients are a minimal asyncio HTTP/1.1 reader: httpx
spends more CPU per token than the server, which on a small machine measures the client.
The graph is a synthetic decoder (``build`` below): each token costs one ``step_ms``
decode step on the event loop, so the numbers measure the serving path, not a model.
HTTP tokens are counted from ``usage`` (tokens already
waiting for a slow client share one SSE frame).

Then one client sends ``--roundtrips`` non-streaming requests, one at a time, to a
loop-only graph (``POST /v1/graphs/echo/run``) and to a bare Starlette handler answering
the same JSON under uvicorn (another child process, up at the same time), alternating
between the two so both meet the same machine: the p50 ratio is the app's overhead per
request.

Targets (issue 11), in ``benchmarks/results/serve.json``: ``http_vs_in_process_tokens_per_s``
>= 0.8, ``http_ttft_p50_ms`` <= 20, ``roundtrip_vs_bare_starlette`` <= 1.5.

    python benchmarks/serve.py [--clients 64] [--tokens 64] [--step-ms 2] [--roundtrips 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

import anyio

import dataflow as df

HERE = Path(__file__).resolve()


def build(step_ms: float = 2.0, replicas: int = 64) -> df.Graph:
    """A synthetic decoder: one token per ``step_ms``, ``max_new_tokens`` tokens."""

    @df.infer(placement="loop", replicas=replicas, ordered=False)
    async def decode(prompt: str, max_new_tokens: int = 64) -> AsyncIterator[str]:
        for i in range(max_new_tokens):
            await anyio.sleep(step_ms / 1000)
            yield f"t{i} "

    return df.Graph("synthetic", decode)


def build_echo(**_: Any) -> df.Graph:
    """A loop-only graph: the input back, no thread, no batching (ignores options)."""

    @df.map(placement="loop")
    def echo(x: Any) -> Any:
        return x

    return df.Graph("echo", echo)


def bare_app() -> Any:
    """The baseline: a bare Starlette handler that answers what the echo route answers."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def run(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"output": body["input"]})

    return Starlette(routes=[Route("/v1/graphs/echo/run", run, methods=["POST"])])


def serve_bare() -> None:
    """Child process: the bare app on a free loopback port (the URL on stdout)."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    print(f"serving bare on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(bare_app(), log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


def summarise(label: str, wall: float, ttfts: list[float], tokens: int) -> dict[str, Any]:
    ttfts.sort()
    return {
        "mode": label,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * ttfts[len(ttfts) // 2],
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
    }


async def run_clients(clients: int, one: Callable[[int], Coroutine[Any, Any, None]]) -> float:
    """Runs ``one(0) .. one(clients - 1)`` concurrently; returns the wall time in seconds."""
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(clients):
            tg.start_soon(one, i)
    return time.perf_counter() - start


async def in_process(clients: int, tokens: int, step_ms: float) -> dict[str, Any]:
    ttfts: list[float] = []
    counts: list[int] = []

    async def one(engine: df.Engine, i: int) -> None:
        start, n = time.perf_counter(), 0
        async for _ in engine.stream(f"prompt {i}", max_new_tokens=tokens):
            if n == 0:
                ttfts.append(time.perf_counter() - start)
            n += 1
        counts.append(n)

    async with df.Engine(build(step_ms, clients)) as engine:
        wall = await run_clients(clients, partial(one, engine))
    assert counts == [tokens] * clients, counts
    return summarise("in-process", wall, ttfts, sum(counts))


class Connection:
    """A minimal keep-alive HTTP/1.1 client connection (asyncio streams), so the client's
    own parsing does not dominate what is measured on a small machine (httpx spends more
    CPU per token than the server does)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    def post(self, path: str, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        self.writer.write(f"{head}content-length: {len(data)}\r\n\r\n".encode() + data)

    async def head(self) -> dict[bytes, bytes]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status, *lines = raw.split(b"\r\n")
        assert b" 200 " in status, raw
        return {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines)}

    async def json_response(self) -> Any:
        headers = await self.head()
        return json.loads(await self.reader.readexactly(int(headers[b"content-length"])))

    async def sse(self, on_first: Callable[[], None]) -> bytes:
        """Read a chunked event stream to its end; ``on_first()`` at the first token."""
        await self.head()
        body, first = b"", True
        while not body.endswith(b"\r\n0\r\n\r\n"):
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("the server closed the stream")
            if first and b'"text":"t' in data:
                on_first()
                first = False
            body += data
        return body

    def close(self) -> None:
        self.writer.close()


async def over_http(url: str, clients: int, tokens: int) -> dict[str, Any]:
    ttfts: list[float] = []
    counts: list[int] = []
    conns = [await Connection.open(url) for _ in range(clients)]

    async def warm(conn: Connection) -> None:  # every connection used once
        conn.post("/v1/completions", {"model": "synthetic", "prompt": "w", "max_tokens": 1})
        await conn.json_response()

    async def one(i: int) -> None:
        body = {
            "model": "synthetic",
            "prompt": f"prompt {i}",
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        conns[i].post("/v1/completions", body)
        raw = await conns[i].sse(lambda: ttfts.append(time.perf_counter() - start))
        found = re.search(rb'"completion_tokens":(\d+)', raw)
        counts.append(int(found.group(1)) if found else 0)

    await asyncio.gather(*(warm(c) for c in conns))
    wall = await run_clients(clients, one)
    for conn in conns:
        conn.close()
    assert counts == [tokens] * clients, counts
    return summarise("http", wall, ttfts, sum(counts))


async def roundtrips(urls: list[str], count: int) -> list[dict[str, float]]:
    """p50/p99 of ``count`` sequential small requests to each of ``urls``, one keep-alive
    connection each, interleaved (the order alternates every round) so that every server
    meets the same machine: load from elsewhere hits them alike."""
    times: list[list[float]] = [[] for _ in urls]
    conns = [await Connection.open(url) for url in urls]
    body = {"input": {"text": "hello", "n": 1}}
    for i in range(count + 20):
        order = range(len(urls)) if i % 2 else reversed(range(len(urls)))
        for k in order:
            start = time.perf_counter()
            conns[k].post("/v1/graphs/echo/run", body)
            out = await conns[k].json_response()
            elapsed = time.perf_counter() - start
            assert out == {"output": body["input"]}, out
            if i >= 20:  # warm-up
                times[k].append(elapsed)
    for conn in conns:
        conn.close()
    results = []
    for samples in times:
        samples.sort()
        results.append(
            {
                "p50_ms": 1000 * samples[len(samples) // 2],
                "p99_ms": 1000 * samples[min(len(samples) - 1, int(0.99 * len(samples)))],
            }
        )
    return results


def child(cmd: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert proc.stdout is not None
    return proc, proc.stdout.readline().split()[-1]


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def main() -> None:
    sys.path.insert(0, str(HERE.parent))
    from _common import table, write_result

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=2.0)
    parser.add_argument("--roundtrips", type=int, default=500)
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        serve_bare()
        return

    local = anyio.run(in_process, args.clients, args.tokens, args.step_ms)
    cmd = [sys.executable, "-m", "dataflow.cli", "serve", str(HERE), f"{HERE}:build_echo"]
    cmd += ["--port", "0", "--log-level", "warning", "-o", f"step_ms={args.step_ms}"]
    cmd += ["-o", f"replicas={args.clients}"]
    server, url = child(cmd)
    try:
        remote = asyncio.run(over_http(url, args.clients, args.tokens))
        bare_server, bare_url = child([sys.executable, str(HERE), "--bare-server"])
        try:
            ours, bare = asyncio.run(roundtrips([url, bare_url], args.roundtrips))
        finally:
            stop(bare_server)
    finally:
        stop(server)
    tokens_ratio = remote["tokens_per_s"] / local["tokens_per_s"]
    rt_ratio = ours["p50_ms"] / bare["p50_ms"]
    rows = [
        [
            r["mode"],
            f"{r['tokens_per_s']:.0f}",
            f"{r['ttft_p50_ms']:.1f}",
            f"{r['ttft_p99_ms']:.1f}",
            f"{r['wall_s']:.2f}",
        ]
        for r in (local, remote)
    ]
    print(
        f"{args.clients} streaming clients x {args.tokens} tokens, "
        f"{args.step_ms} ms decode step (synthetic)"
    )
    print(table(["mode", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "wall s"], rows))
    print(f"HTTP / in-process tokens/s: {tokens_ratio:.2f}x (target >= 0.8)")
    print(
        f"round trip p50: dataflow {ours['p50_ms']:.2f} ms, bare Starlette "
        f"{bare['p50_ms']:.2f} ms: {rt_ratio:.2f}x (target <= 1.5)"
    )
    result = {
        "http_vs_in_process_tokens_per_s": tokens_ratio,
        "http_ttft_p50_ms": remote["ttft_p50_ms"],
        "roundtrip_vs_bare_starlette": rt_ratio,
        "targets": {
            "http_vs_in_process_tokens_per_s": ">= 0.8",
            "http_ttft_p50_ms": "<= 20",
            "roundtrip_vs_bare_starlette": "<= 1.5",
        },
    }
    write_result(
        "serve",
        {
            "config": {k: v for k, v in vars(args).items() if k != "bare_server"},
            "in_process": local,
            "http": remote,
            "roundtrip": {"dataflow": ours, "bare_starlette": bare},
            **result,
        },
    )
    print(json.dumps({k: round(v, 3) for k, v in result.items() if isinstance(v, float)}))


if __name__ == "__main__":
    main()
