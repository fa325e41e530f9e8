"""Graphs: nodes joined by edges, validated before anything runs.

``a >> b >> c`` builds a :class:`Chain`; :class:`Graph` takes a chain or is built node by
node with :meth:`Graph.add` for DAGs (fan-out to several nodes, fan-in to a merge).
"""

from __future__ import annotations

import heapq
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import GraphError
from ._node import Node, _element_type

__all__ = ["Chain", "Graph", "Plan"]


class Chain:
    """A linear sequence of nodes, built with ``>>``."""

    __slots__ = ("nodes",)

    def __init__(self, nodes: tuple[Node, ...]) -> None:
        self.nodes = nodes

    def __rshift__(self, other: Node | Chain) -> Chain:
        if isinstance(other, Node):
            return Chain((*self.nodes, other))
        if isinstance(other, Chain):
            return Chain(self.nodes + other.nodes)
        return NotImplemented

    def __rrshift__(self, other: Node) -> Chain:
        if isinstance(other, Node):
            return Chain((other, *self.nodes))
        return NotImplemented

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return " >> ".join(n.name for n in self.nodes)


@dataclass(frozen=True)
class Plan:
    """A validated graph, ready to execute: topological order and item multiplicity.

    ``marks[name]`` describes how many items a node emits per request: one entry per
    open shard (``"S"``) or generator (``"G"``) upstream of it and not yet merged. A graph
    whose sink has marks *streams*: one request yields several outputs.
    """

    order: tuple[str, ...]
    source: str
    sink: str
    upstream: Mapping[str, tuple[str, ...]]
    downstream: Mapping[str, tuple[str, ...]]
    marks: Mapping[str, tuple[str, ...]]

    @property
    def streaming(self) -> bool:
        return bool(self.marks[self.sink])


class Graph:
    """A named dataflow graph.

    Args:
        name: the graph's name (used in stats, metrics and pictures).
        root: a node or a ``>>`` chain to start from; more nodes can be added with
            :meth:`add`.

    Raises:
        GraphError: when the nodes or edges are invalid (duplicate names, cycles, ...).
    """

    def __init__(self, name: str, root: Node | Chain | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise GraphError(f"graph name must be a non-empty string, got {name!r}")
        self.name = name
        self._nodes: dict[str, Node] = {}
        self._edges: list[tuple[str, str]] = []
        self._plan: Plan | None = None
        if root is not None:
            if isinstance(root, Node):
                root = Chain((root,))
            if not isinstance(root, Chain):
                raise GraphError(
                    f"graph {name!r}: expected a node or a chain (a >> b), got {root!r}"
                )
            prev: Node | None = None
            for node in root:
                self.add(node, *(() if prev is None else (prev,)))
                prev = node
            self.plan()

    # -- building ----------------------------------------------------------------
    def add(self, node: Node, *upstream: Node | str) -> Node:
        """Add ``node`` fed by ``upstream`` nodes (none for the entry node).

        Several upstream nodes make a fan-in, which only a merge node may do; adding
        several nodes with the same upstream makes a fan-out.

        Returns:
            The node, so it can be named as the upstream of later nodes.
        """
        if not isinstance(node, Node):
            raise GraphError(
                f"graph {self.name!r}: {node!r} is not a node; wrap it with df.map, "
                "df.infer, df.encode, df.shard or df.merge"
            )
        existing = self._nodes.get(node.name)
        if existing is not None and existing is not node and node.auto_named:
            # Nodes named after their bodies (two lambdas) get distinct names, in the
            # order they are added, so a given construction always names them alike.
            node.name = self._free_name(node.name)
            existing = None
        if existing is not None:
            what = "added twice" if existing is node else "used by two nodes"
            raise GraphError(
                f"graph {self.name!r}: duplicate node name {node.name!r} ({what}); "
                "give each node a distinct name=",
                nodes=(node.name,),
            )
        ups = [self._resolve(u, node) for u in upstream]
        self._nodes[node.name] = node
        for u in ups:
            self._edges.append((u, node.name))
        self._plan = None
        return node

    def _free_name(self, base: str) -> str:
        k = 2
        while f"{base}_{k}" in self._nodes:
            k += 1
        return f"{base}_{k}"

    def connect(self, src: Node | str, dst: Node | str) -> None:
        """Add an edge between two nodes already in the graph."""
        s = self._resolve(src, None)
        d = self._resolve(dst, None)
        self._edges.append((s, d))
        self._plan = None

    def _resolve(self, ref: Node | str, for_node: Node | None) -> str:
        name = ref if isinstance(ref, str) else getattr(ref, "name", None)
        if (
            not isinstance(name, str)
            or name not in self._nodes
            or (isinstance(ref, Node) and self._nodes[name] is not ref)
        ):
            target = f" for {for_node.name!r}" if for_node is not None else ""
            raise GraphError(
                f"graph {self.name!r}: upstream {ref!r}{target} is not in the graph; "
                "add nodes before naming them as upstream",
                nodes=tuple(n for n in (name, for_node and for_node.name) if n),
            )
        return name

    # -- reading -----------------------------------------------------------------
    @property
    def nodes(self) -> Mapping[str, Node]:
        return dict(self._nodes)

    @property
    def edges(self) -> list[tuple[str, str]]:
        return list(self._edges)

    def __getitem__(self, name: str) -> Node:
        return self._nodes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, nodes={list(self._nodes)})"

    # -- validation --------------------------------------------------------------
    def plan(self) -> Plan:
        """Validate the structure and return the execution plan.

        Raises:
            GraphError: naming the nodes concerned, for an empty graph, a cycle, nodes not
                connected to the rest, several entry or exit nodes, a fan-in into a
                node that is not a merge, a merge with nothing to gather, or connected
                nodes whose type annotations do not match.
        """
        if self._plan is None:
            self._plan = _build_plan(self)
        return self._plan

    def validate(self) -> None:
        """Check structure and that every placement is available on this machine.

        Raises:
            GraphError: as :meth:`plan`, or for a placement this machine cannot run
                (``"cuda"`` without a GPU, ``"ray"`` without the ray extra).
        """
        self.plan()
        from ._placement import check_available

        for node in self._nodes.values():
            check_available(node)

    def to_mermaid(self) -> str:
        """The graph as a Mermaid flowchart (``flowchart LR``)."""
        from ._render import to_mermaid

        return to_mermaid(self)

    def to_dot(self) -> str:
        """The graph in Graphviz DOT."""
        from ._render import to_dot

        return to_dot(self)


def _build_plan(g: Graph) -> Plan:
    nodes = g._nodes
    if not nodes:
        raise GraphError(f"graph {g.name!r} has no nodes")
    up: dict[str, list[str]] = {n: [] for n in nodes}
    down: dict[str, list[str]] = {n: [] for n in nodes}
    seen_edges: set[tuple[str, str]] = set()
    for s, d in g._edges:
        if (s, d) in seen_edges:
            raise GraphError(f"graph {g.name!r}: edge {s!r} -> {d!r} given twice", nodes=(s, d))
        if s == d:
            raise GraphError(f"graph {g.name!r}: node {s!r} feeds itself (a cycle)", nodes=(s,))
        seen_edges.add((s, d))
        up[d].append(s)
        down[s].append(d)

    order = _topological(g.name, nodes, up, down)
    if len(nodes) > 1:
        lonely = [n for n in nodes if not up[n] and not down[n]]
        if lonely:
            raise GraphError(
                f"graph {g.name!r}: node(s) {', '.join(map(repr, lonely))} are not "
                "connected to the rest of the graph",
                nodes=tuple(lonely),
            )
    sources = [n for n in order if not up[n]]
    sinks = [n for n in order if not down[n]]
    if len(sources) != 1:
        raise GraphError(
            f"graph {g.name!r} has several entry nodes ({', '.join(map(repr, sources))}); "
            "a graph takes one input: feed them from one common node",
            nodes=tuple(sources),
        )
    if len(sinks) != 1:
        raise GraphError(
            f"graph {g.name!r} has several exit nodes ({', '.join(map(repr, sinks))}); "
            "a graph gives one output per item: gather them with a merge node",
            nodes=tuple(sinks),
        )

    marks: dict[str, tuple[str, ...]] = {}
    # The node behind each mark. Two branches from *different* shards or generators emit
    # unrelated numbers of items even when their marks read the same, and a fan-in merge
    # would wait forever for parts that never come.
    origins: dict[str, tuple[str, ...]] = {}
    for name in order:
        node = nodes[name]
        ups = up[name]
        if not ups:
            incoming: tuple[str, ...] = ()
            came_from: tuple[str, ...] = ()
        elif len(ups) == 1:
            incoming = marks[ups[0]]
            came_from = origins[ups[0]]
        else:
            if node.kind != "merge":
                raise GraphError(
                    f"graph {g.name!r}: node {name!r} has several upstream nodes "
                    f"({', '.join(map(repr, ups))}); only a merge node can gather them",
                    nodes=(name, *ups),
                )
            distinct = {(marks[u], origins[u]) for u in ups}
            if len(distinct) > 1:
                raise GraphError(
                    f"graph {g.name!r}: merge {name!r} joins branches "
                    f"({', '.join(map(repr, ups))}) that emit different numbers of items "
                    "per request (a shard or generator on one branch only, or a different "
                    "one on each); merge inside the branch first",
                    nodes=(name, *ups),
                )
            incoming = marks[ups[0]]
            came_from = origins[ups[0]]
        if node.kind == "merge":
            if len(ups) <= 1:  # an entry merge has nothing to gather either
                if not incoming:
                    raise GraphError(
                        f"graph {g.name!r}: merge {name!r} has no shard (or fan-out) "
                        "upstream, so there is nothing to gather",
                        nodes=(name,),
                    )
                if incoming[-1] != "S":
                    raise GraphError(
                        f"graph {g.name!r}: merge {name!r} follows a generator node, whose "
                        "number of outputs is not known in advance; merge gathers shards",
                        nodes=(name,),
                    )
                out = incoming[:-1]
                came_from = came_from[:-1]
            else:
                out = incoming
        elif node.kind == "shard":
            out = (*incoming, "S")
            came_from = (*came_from, name)
        elif node.info.mode in ("generator", "async_generator"):
            out = (*incoming, "G")
            came_from = (*came_from, name)
        else:
            out = incoming
        marks[name] = out
        origins[name] = came_from

    for s, d in g._edges:
        _check_types(g.name, nodes[s], nodes[d], fan_in=len(up[d]) > 1)

    return Plan(
        order=tuple(order),
        source=sources[0],
        sink=sinks[0],
        upstream={n: tuple(v) for n, v in up.items()},
        downstream={n: tuple(v) for n, v in down.items()},
        marks=marks,
    )


def _topological(
    name: str, nodes: Mapping[str, Node], up: dict[str, list[str]], down: dict[str, list[str]]
) -> list[str]:
    index = {n: i for i, n in enumerate(nodes)}
    indegree = {n: len(up[n]) for n in nodes}
    ready = [(index[n], n) for n in nodes if indegree[n] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for d in down[n]:
            indegree[d] -= 1
            if indegree[d] == 0:
                heapq.heappush(ready, (index[d], d))
    if len(order) != len(nodes):
        cyclic = [n for n in nodes if indegree[n] > 0]
        raise GraphError(
            f"graph {name!r} has a cycle through {', '.join(map(repr, cyclic))}",
            nodes=tuple(cyclic),
        )
    return order


# -- annotations ---------------------------------------------------------------------


def _check_types(graph: str, src: Node, dst: Node, *, fan_in: bool) -> None:
    produced = src.info.out_type
    if src.kind == "shard":
        produced = _element_type(produced)
    if src.batch is not None or dst.batch is not None:
        return  # bodies see batches; per-item types are not annotated
    expected = dst.info.in_type
    if dst.kind == "merge":
        expected = _element_type(expected)
        if fan_in:
            return  # parts from different branches may differ in type
    if not _compatible(produced, expected):
        raise GraphError(
            f"graph {graph!r}: {src.name!r} produces {_fmt(produced)} but {dst.name!r} "
            f"expects {_fmt(expected)}",
            nodes=(src.name, dst.name),
        )


def _fmt(tp: Any) -> str:
    # ``list[int].__name__`` is "list" and ``Optional[int].__name__`` is "Optional": only
    # a plain class is named by its ``__qualname__``; the repr of anything else keeps
    # its arguments.
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__qualname__
    return repr(tp).replace("typing.", "").replace("collections.abc.", "")


_NUMERIC = {int: (float, complex), float: (complex,), bool: (int, float, complex)}


def _compatible(produced: Any, expected: Any) -> bool:
    """Whether a value annotated ``produced`` may flow into a parameter ``expected``.

    Lenient where annotations cannot be compared (type variables, strings, ``Any``);
    strict on plain classes, unions and generic origins.
    """
    if produced is Any or expected is Any or expected is object:
        return True
    if isinstance(produced, typing.TypeVar | str) or isinstance(expected, typing.TypeVar | str):
        return True
    if produced is None:
        produced = type(None)
    if expected is None:
        expected = type(None)
    # Split what is produced before what is expected: ``int | None`` fits ``int | None``
    # because each of its members fits the whole union, not one member of it.
    prod_origin = typing.get_origin(produced)
    if prod_origin in (typing.Union, _UnionType):
        return all(_compatible(p, expected) for p in typing.get_args(produced))
    if prod_origin is typing.Literal:
        return all(_compatible(type(v), expected) for v in typing.get_args(produced))
    exp_origin = typing.get_origin(expected)
    if exp_origin in (typing.Union, _UnionType):
        return any(_compatible(produced, e) for e in typing.get_args(expected))
    p_cls = prod_origin or produced
    e_cls = exp_origin or expected
    if not isinstance(p_cls, type) or not isinstance(e_cls, type):
        return True
    if p_cls in _NUMERIC and e_cls in _NUMERIC[p_cls]:
        return True
    try:
        return issubclass(p_cls, e_cls)
    except TypeError:
        return True


_UnionType = type(int | str)
