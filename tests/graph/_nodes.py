"""Small nodes the graph tests build graphs from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import dataflow as df


def node(name: str, **options: Any) -> df.Node:
    """A pass-through map node."""
    return df.map(lambda x: x, name=name, **options)


def shard(name: str) -> df.Node:
    """A shard node splitting each item into two parts."""
    return df.shard(lambda x: [x, x], name=name)


def gen(name: str) -> df.Node:
    """A generator node (one output per input, but a stream as far as plans go)."""

    def body(x: Any) -> Iterator[Any]:
        yield x

    return df.map(body, name=name)
