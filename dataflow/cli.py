"""The ``dataflow`` command: ``run``, ``serve``, ``show`` and ``bench``.

Each subcommand lives in its own module under ``dataflow/_cli/`` and is imported only
when used, so ``dataflow show`` does not pay for torch or uvicorn.

Errors a user can cause print one line to stderr, ``dataflow CMD: what went wrong``, and
set the exit status: 2 for a usage error (a bad option, a missing file, a module with no
graph), 1 for a failure while running, 130 for Ctrl-C. ``--debug`` (or the environment
variable ``DATAFLOW_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["main"]

_COMMANDS = {
    "run": "run a graph on inputs and print what it produces",
    "serve": "serve graphs over HTTP (OpenAI-compatible)",
    "show": "draw a graph (Mermaid, DOT, SVG, PNG)",
    "bench": "load-test a graph and report throughput, latency and what limits it",
}
_USAGE, _FAILURE, _INTERRUPTED = 2, 1, 130


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dataflow-engine")
    except Exception:  # not installed as a distribution: the package's own
        from . import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataflow", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dataflow {_version()}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks (also DATAFLOW_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in _COMMANDS.items():
        module = importlib.import_module(f"dataflow._cli.{name}")
        module.add_parser(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _debug_env() -> bool:
    return os.environ.get("DATAFLOW_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dataflow`` console script; returns the exit status."""
    from ._cli._load import UsageError, describe

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = _debug_env()
    if "--debug" in argv:  # accepted anywhere on the line, not only before the command
        argv.remove("--debug")
        debug = True
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help / --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else _USAGE
    prog = f"dataflow {args.command}"
    try:
        module = importlib.import_module(f"dataflow._cli.{args.command}")
        status: int = module.main(args)
        return status
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return _INTERRUPTED
    except BrokenPipeError:  # `dataflow run ... | head`: the reader left; say nothing
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return _FAILURE
    except UsageError as exc:
        if debug:
            raise
        print(f"{prog}: {describe(exc)}", file=sys.stderr)
        return _USAGE
    except Exception as exc:
        if debug:
            raise
        print(f"{prog}: {describe(exc)}", file=sys.stderr)
        return _FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
