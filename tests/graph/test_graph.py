"""Building graphs (``>>`` chains, the ``add`` builder) and the Plan they validate into."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import dataflow as df

from ._nodes import gen, node, shard

# -- chains ------------------------------------------------------------------------


def test_rshift_builds_a_chain_in_order() -> None:
    a, b, c, d = (node(n) for n in "abcd")
    assert (a >> b).nodes == (a, b)
    assert (a >> b >> c).nodes == (a, b, c)
    assert (a >> (b >> c)).nodes == (a, b, c)
    assert ((a >> b) >> (c >> d)).nodes == (a, b, c, d)
    assert list(a >> b >> c) == [a, b, c]
    assert len(a >> b >> c) == 3
    assert repr(a >> b >> c) == "a >> b >> c"


def test_rshift_with_something_else_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        node("a") >> 3  # type: ignore[operator]
    with pytest.raises(TypeError):
        (node("a") >> node("b")) >> "c"  # type: ignore[operator]


def test_a_graph_from_a_chain_connects_each_node_to_the_next() -> None:
    a, b, c = node("a"), node("b"), node("c")
    g = df.Graph("g", a >> b >> c)
    assert g.edges == [("a", "b"), ("b", "c")]
    assert list(g.nodes) == ["a", "b", "c"]
    assert g["b"] is b
    assert "c" in g and "z" not in g
    assert repr(g) == "Graph('g', nodes=['a', 'b', 'c'])"


def test_a_graph_of_one_node() -> None:
    plan = df.Graph("g", node("only")).plan()
    assert (plan.order, plan.source, plan.sink) == (("only",), "only", "only")
    assert not plan.streaming


def test_nodes_and_edges_are_copies() -> None:
    g = df.Graph("g", node("a") >> node("b"))
    g.nodes.clear()  # type: ignore[attr-defined]
    g.edges.clear()
    assert list(g.nodes) == ["a", "b"]
    assert g.edges == [("a", "b")]


def test_add_returns_the_node_and_accepts_upstream_names() -> None:
    g = df.Graph("g")
    a = node("a")
    assert g.add(a) is a
    b = g.add(node("b"), "a")
    g.add(node("c"), b)
    assert g.edges == [("a", "b"), ("b", "c")]


# -- plans -------------------------------------------------------------------------


def test_plan_of_a_chain() -> None:
    plan = df.Graph("g", node("a") >> node("b") >> node("c")).plan()
    assert plan.order == ("a", "b", "c")
    assert (plan.source, plan.sink) == ("a", "c")
    assert plan.upstream == {"a": (), "b": ("a",), "c": ("b",)}
    assert plan.downstream == {"a": ("b",), "b": ("c",), "c": ()}
    assert plan.marks == {"a": (), "b": (), "c": ()}
    assert not plan.streaming


def test_plan_of_shard_then_merge() -> None:
    plan = df.Graph("g", node("a") >> shard("split") >> node("part") >> df.merge("sum")).plan()
    assert plan.order == ("a", "split", "part", "merge_sum")
    assert plan.marks == {"a": (), "split": ("S",), "part": ("S",), "merge_sum": ()}
    assert not plan.streaming


def test_plan_of_nested_shards() -> None:
    plan = df.Graph(
        "g",
        shard("outer")
        >> shard("inner")
        >> df.merge("sum", name="m_inner")
        >> df.merge("sum", name="m_outer"),
    ).plan()
    assert plan.marks == {
        "outer": ("S",),
        "inner": ("S", "S"),
        "m_inner": ("S",),
        "m_outer": (),
    }


def test_plan_of_a_generator_graph_streams() -> None:
    plan = df.Graph("g", node("prompt") >> gen("tokens") >> node("detok")).plan()
    assert plan.marks == {"prompt": (), "tokens": ("G",), "detok": ("G",)}
    assert plan.streaming


def test_plan_of_a_shard_left_open_streams_its_parts() -> None:
    assert df.Graph("g", shard("split") >> node("part")).plan().streaming


def test_plan_of_a_generator_inside_a_shard() -> None:
    plan = df.Graph("g", shard("split") >> gen("tokens")).plan()
    assert plan.marks["tokens"] == ("S", "G")
    assert plan.streaming


def test_an_async_generator_also_streams() -> None:
    async def tokens(x: Any) -> Any:
        yield x

    assert df.Graph("g", node("a") >> df.map(tokens)).plan().streaming


def test_plan_of_a_fan_out_fan_in_dag() -> None:
    g = df.Graph("dag")
    src = g.add(node("src"))
    left = g.add(node("left"), src)
    right = g.add(node("right"), src)
    deep = g.add(node("deep"), right)
    g.add(df.merge("list", name="join"), left, deep)
    g.add(node("out"), "join")
    plan = g.plan()
    # Ties broken by insertion order, so the order is stable run to run.
    assert plan.order == ("src", "left", "right", "deep", "join", "out")
    assert (plan.source, plan.sink) == ("src", "out")
    assert plan.upstream["join"] == ("left", "deep")  # the order the parts are combined in
    assert plan.downstream["src"] == ("left", "right")
    assert all(marks == () for marks in plan.marks.values())
    assert not plan.streaming


def test_topological_order_does_not_follow_insertion_when_edges_say_otherwise() -> None:
    g = df.Graph("g")
    a = g.add(node("a"))
    c = g.add(node("c"), a)
    b = g.add(node("b"), a)
    g.add(df.merge("list"), c, b)
    g.add(node("late"), a)
    g.connect("late", "merge_list")
    plan = g.plan()
    assert plan.order == ("a", "c", "b", "late", "merge_list")
    for dst, ups in plan.upstream.items():
        for up in ups:
            assert plan.order.index(up) < plan.order.index(dst)


def test_fan_out_inside_a_shard_then_merged_twice() -> None:
    g = df.Graph("g")
    s = g.add(shard("split"))
    a, b = g.add(node("a"), s), g.add(node("b"), s)
    g.add(df.merge("list", name="pair"), a, b)
    g.add(df.merge("concat", name="whole"), "pair")
    plan = g.plan()
    assert plan.marks == {
        "split": ("S",),
        "a": ("S",),
        "b": ("S",),
        "pair": ("S",),
        "whole": (),
    }


def test_fan_in_of_branches_from_one_generator_streams() -> None:
    g = df.Graph("g")
    tokens = g.add(gen("tokens"))
    a, b = g.add(node("a"), tokens), g.add(node("b"), tokens)
    g.add(df.merge("list"), a, b)
    plan = g.plan()
    assert plan.marks["merge_list"] == ("G",)
    assert plan.streaming


def test_plan_is_cached_until_the_graph_changes() -> None:
    g = df.Graph("g", node("a") >> node("b"))
    first = g.plan()
    assert g.plan() is first
    g.add(node("c"), "b")
    second = g.plan()
    assert second is not first
    assert second.sink == "c"
    g.connect("a", "c")  # a fan-in into a non-merge: the new plan must notice
    with pytest.raises(df.GraphError, match="only a merge node"):
        g.plan()


def test_a_plan_is_frozen() -> None:
    plan = df.Graph("g", node("a") >> node("b")).plan()
    with pytest.raises(AttributeError):
        plan.sink = "a"  # type: ignore[misc]


def test_validate_accepts_available_placements() -> None:
    g = df.Graph(
        "g",
        df.map(lambda x: x, name="a")
        >> df.map(lambda x: x, name="b", placement="thread")
        >> df.infer(lambda x: x, name="c", placement="auto"),
    )
    g.validate()


@pytest.mark.anyio
async def test_fan_in_of_one_generator_runs_pairing_each_output() -> None:
    """The fan-in the validator accepts really runs: each output of the generator reaches
    the merge once through each branch, and the pairs stream out in order."""

    def count(n: int) -> Iterator[int]:
        yield from range(n)

    g = df.Graph("g")
    tokens = g.add(df.map(count))
    tens = g.add(df.map(lambda v: v * 10, name="tens"), tokens)
    neg = g.add(df.map(lambda v: -v, name="neg"), tokens)
    g.add(df.merge("list"), tens, neg)
    async with df.Engine(g) as engine:
        outputs = [out async for out in engine.stream(3, timeout=10)]
    assert outputs == [[0, 0], [10, -1], [20, -2]]
