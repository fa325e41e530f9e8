"""``dataflow serve GRAPH [GRAPH ...]``: serve graphs over HTTP (OpenAI-compatible) with
uvicorn. Needs the ``serve`` extra: ``pip install 'dataflow-engine[serve]'``.

Shutdown: SIGTERM or Ctrl-C stops accepting connections, lets open streams run for up to
``--grace`` seconds, then cancels them and stops the engines; a second Ctrl-C exits at
once."""

from __future__ import annotations

import argparse
import socket
import sys

__all__ = ["add_parser", "main"]


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "graph",
        nargs="+",
        help="graph file (graphs/x.py), module (graphs.x), or FILE.py:attribute",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument(
        "--option", "-o", action="append", default=[], help="build option KEY=VALUE"
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=256, help="requests in flight before 429"
    )
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger is 413")
    parser.add_argument("--timeout", type=float, default=None, help="per-request seconds (504)")
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: $DATAFLOW_API_KEY; none if unset)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser calls from ORIGIN (repeatable; '*' for any; default: CORS off)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="on SIGTERM/Ctrl-C, seconds open streams may run before they are cancelled; "
        "a second Ctrl-C exits at once",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level")


def main(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import create_app
    except ImportError as exc:
        print(
            f"dataflow serve needs the serve extra ({exc.name} is missing): "
            "pip install 'dataflow-engine[serve]'",
            file=sys.stderr,
        )
        return 2
    from ..serve._auth import key_from_env
    from ..serve._shutdown import server
    from ._load import CommandFailed, load_graph, parse_options

    if not args.grace >= 0:
        raise CommandFailed(f"--grace must be seconds >= 0, got {args.grace}")
    options = parse_options(args.option)
    graphs = [load_graph(spec, **options) for spec in args.graph]
    try:
        app = create_app(
            graphs,
            max_in_flight=args.max_in_flight,
            max_body_bytes=args.max_body_bytes,
            timeout=args.timeout,
            api_key=args.api_key or key_from_env(),
            cors_origins=args.cors_origin,
        )
    except (TypeError, ValueError) as exc:
        raise CommandFailed(str(exc)) from exc
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        raise CommandFailed(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        ) from exc
    # Listening before the line below is printed: a client that connects at once waits
    # in the backlog until the app has started, instead of being refused.
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    names = ", ".join(g.name for g in graphs)
    print(f"serving {names} on http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="on")
    served = server(config, app.state.serve.requests, args.grace)
    with sock:
        try:
            served.run(sockets=[sock])
        except KeyboardInterrupt:  # a Ctrl-C before the server started
            return 130
    # A graceful stop after Ctrl-C still says "interrupted", as every other command
    # does; SIGTERM (how a supervisor stops a server) is a clean exit.
    return 130 if getattr(served, "interrupted", False) else 0
