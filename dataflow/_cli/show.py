"""`dataflow show`: not built yet."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "main"]


def add_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", help="graph module or file")


def main(args: argparse.Namespace) -> int:
    print("dataflow show: not available in this version")
    return 2
