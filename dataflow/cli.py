"""The ``dataflow`` command: ``run``, ``serve``, ``show`` and ``bench``.

Each subcommand lives in its own module under ``dataflow/_cli/`` and is imported only
when used, so ``dataflow show`` does not pay for torch or uvicorn.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main"]

_COMMANDS = {
    "run": "run a graph on inputs and print what it produces",
    "serve": "serve graphs over HTTP (OpenAI-compatible)",
    "show": "draw a graph (Mermaid, DOT, SVG, PNG)",
    "bench": "load-test a graph and report throughput, latency and the bottleneck",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dataflow`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dataflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in _COMMANDS.items():
        module = importlib.import_module(f"dataflow._cli.{name}")
        module.add_parser(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    module = importlib.import_module(f"dataflow._cli.{args.command}")
    status: int = module.main(args)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
