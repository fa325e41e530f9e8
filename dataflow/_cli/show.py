"""``dataflow show GRAPH``: draw a graph as Mermaid (default), DOT, SVG or PNG.

SVG and PNG need Graphviz: the ``graphviz`` Python package (extra ``dataflow-engine[viz]``)
and its ``dot`` program (``apt-get install graphviz``, ``brew install graphviz``). Without
them the command says how to install them and exits with status 3; Mermaid and DOT need
nothing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["GraphvizMissing", "add_parser", "main", "render_image"]

FORMATS = ("mermaid", "dot", "svg", "png")
INSTALL_HINT = (
    "rendering {fmt} needs Graphviz: pip install 'dataflow-engine[viz]' and the 'dot' "
    "program (apt-get install graphviz, or brew install graphviz); "
    "--format mermaid or --format dot need nothing"
)


class GraphvizMissing(RuntimeError):
    """Neither the graphviz package with its ``dot`` program nor ``dot`` alone is here."""


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "graph", help="graph file (graphs/x.py), module (graphs.x), or FILE.py:attribute"
    )
    parser.add_argument("--format", "-f", choices=FORMATS, default="mermaid", help="output format")
    parser.add_argument("--output", "-O", help="write to this file instead of stdout")
    parser.add_argument(
        "--option", "-o", action="append", default=[], help="build option KEY=VALUE"
    )


def render_image(dot_source: str, fmt: str) -> bytes:
    """``dot_source`` rendered as ``fmt`` ("svg", "png") by Graphviz.

    Raises:
        GraphvizMissing: Graphviz is not installed (the message says how to install it).
    """
    try:
        import graphviz
    except ImportError:
        graphviz = None
    if graphviz is not None:
        try:
            data: bytes = graphviz.Source(dot_source).pipe(format=fmt)
            return data
        except graphviz.ExecutableNotFound as exc:
            raise GraphvizMissing(INSTALL_HINT.format(fmt=fmt)) from exc
    # The package is only a wrapper around ``dot``: use the program directly if present.
    dot = shutil.which("dot")
    if dot is None:
        raise GraphvizMissing(INSTALL_HINT.format(fmt=fmt))
    done = subprocess.run(
        [dot, f"-T{fmt}"], input=dot_source.encode(), capture_output=True, check=True
    )
    return done.stdout


def main(args: argparse.Namespace) -> int:
    from ._load import load_graph, parse_options

    graph = load_graph(args.graph, **parse_options(args.option))
    fmt: str = args.format
    if fmt == "mermaid":
        data = graph.to_mermaid().encode()
    elif fmt == "dot":
        data = graph.to_dot().encode()
    else:
        try:
            data = render_image(graph.to_dot(), fmt)
        except GraphvizMissing as exc:
            print(f"dataflow show: {exc}", file=sys.stderr)
            return 3
    if args.output:
        Path(args.output).write_bytes(data)
        print(f"wrote {args.output} ({len(data)} bytes)", file=sys.stderr)
    elif fmt in ("mermaid", "dot", "svg"):
        sys.stdout.write(data.decode())
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0
