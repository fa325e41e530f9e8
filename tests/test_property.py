"""Property: random DAGs of pure functions give what a sequential evaluation gives.

Graphs mix node kinds (map, infer on threads, sync and async generators, shard/merge,
fan-out/fan-in), replicas, capacities and placements. Every input's outputs must equal
the reference, in order, on asyncio and on trio.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dataflow as df

_names = itertools.count()


def _name(kind: str) -> str:
    return f"{kind}{next(_names)}"


@dataclass(frozen=True)
class Affine:
    a: int
    b: int

    def __call__(self, x: int) -> int:
        return self.a * x + self.b


@dataclass(frozen=True)
class Spread:
    """A generator: k outputs per input."""

    k: int
    use_async: bool

    def ref(self, x: int) -> list[int]:
        return [x + i for i in range(self.k)]


@dataclass(frozen=True)
class Options:
    placement: str
    replicas: int
    capacity: int
    ordered: bool = True


Segment = Any  # ("map", Affine, Options) | ("gen", Spread, Options) | ("shard", k, [seg]) | ...

options = st.builds(
    Options,
    placement=st.sampled_from(["loop", "loop", "thread"]),
    replicas=st.integers(1, 3),
    capacity=st.integers(1, 4),
)
affine = st.builds(Affine, a=st.integers(-3, 3), b=st.integers(-5, 5))
map_seg = st.tuples(st.just("map"), affine, options)
gen_seg = st.tuples(
    st.just("gen"), st.builds(Spread, k=st.integers(1, 3), use_async=st.booleans()), options
)
inner = st.lists(map_seg, min_size=0, max_size=2)
shard_seg = st.tuples(st.just("shard"), st.integers(1, 4), inner)
fan_seg = st.tuples(st.just("fan"), st.lists(inner, min_size=2, max_size=3))
segments = st.lists(
    st.one_of(map_seg, map_seg, gen_seg, shard_seg, fan_seg), min_size=1, max_size=5
)


def reference(segs: list[Segment], x: int) -> list[int]:
    """Sequential evaluation: the outputs for one input, in order."""
    values = [x]
    for seg in segs:
        kind = seg[0]
        if kind == "map":
            values = [seg[1](v) for v in values]
        elif kind == "gen":
            values = [out for v in values for out in seg[1].ref(v)]
        elif kind == "shard":
            k, body = seg[1], seg[2]
            values = [sum(_chain_ref(body, v + i) for i in range(k)) for v in values]
        else:
            branches = seg[1]
            values = [
                sum((w + 1) * _chain_ref(b, v) for w, b in enumerate(branches)) for v in values
            ]
    return values


def _chain_ref(body: list[Segment], v: int) -> int:
    for seg in body:
        v = seg[1](v)
    return v


def _map_node(fn: Affine, opts: Options) -> df.Node:
    maker: Callable[..., df.Node] = df.infer if opts.placement == "thread" else df.map
    return maker(
        fn,
        name=_name("m"),
        placement=opts.placement,
        replicas=opts.replicas,
        capacity=opts.capacity,
        ordered=opts.ordered,
    )


def _gen_node(spread: Spread, opts: Options) -> df.Node:
    k = spread.k
    if spread.use_async:

        async def agen(x: int) -> AsyncIterator[int]:
            for i in range(k):
                await anyio.lowlevel.checkpoint()
                yield x + i

        return df.map(agen, name=_name("ag"), replicas=opts.replicas, capacity=opts.capacity)

    def gen(x: int) -> Iterator[int]:
        for i in range(k):
            yield x + i

    return df.map(
        gen,
        name=_name("g"),
        placement=opts.placement,
        replicas=opts.replicas,
        capacity=opts.capacity,
    )


def _weighted_sum(parts: list[int]) -> int:
    return sum((w + 1) * p for w, p in enumerate(parts))


def build(segs: list[Segment]) -> df.Graph:
    graph = df.Graph("random")
    last: df.Node = graph.add(df.map(lambda x: x, name=_name("src")))
    for seg in segs:
        kind = seg[0]
        if kind == "map":
            last = graph.add(_map_node(seg[1], seg[2]), last)
        elif kind == "gen":
            last = graph.add(_gen_node(seg[1], seg[2]), last)
        elif kind == "shard":
            k = seg[1]
            last = graph.add(
                df.shard(lambda v, k=k: [v + i for i in range(k)], name=_name("s")), last
            )
            for m in seg[2]:
                last = graph.add(_map_node(m[1], m[2]), last)
            last = graph.add(df.merge("sum", name=_name("ms")), last)
        else:
            tails = []
            for branch in seg[1]:
                tail = graph.add(df.map(lambda v: v, name=_name("b")), last)
                for m in branch:
                    tail = graph.add(_map_node(m[1], m[2]), tail)
                tails.append(tail)
            last = graph.add(df.merge(_weighted_sum, name=_name("mf")), *tails)
    return graph


async def check(segs: list[Segment], inputs: list[int]) -> None:
    graph = build(segs)
    streaming = graph.plan().streaming
    async with df.Engine(graph) as engine:
        got = [r async for r in engine.map(inputs)]
        stats = engine.stats()
    expected = [reference(segs, x) for x in inputs]
    assert [r if streaming else [r] for r in got] == expected
    requests = stats["requests"]
    assert requests["succeeded"] == requests["submitted"] == len(inputs)
    assert stats["items_inside"] == 0


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(segs=segments, inputs=st.lists(st.integers(-50, 50), min_size=1, max_size=6))
def test_random_graphs_match_sequential_evaluation(
    backend: str, segs: list[Segment], inputs: list[int]
) -> None:
    anyio.run(check, segs, inputs, backend=backend)
