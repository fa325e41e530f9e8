"""Pictures of a graph: Mermaid flowchart text and Graphviz DOT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._node import Node

if TYPE_CHECKING:
    from ._graph import Graph

__all__ = ["describe", "to_dot", "to_mermaid"]

_MERMAID_SHAPES = {
    "encode": ("[/", "/]"),
    "shard": ("{{", "}}"),
    "infer": ("[[", "]]"),
    "merge": ("[\\", "/]"),
    "map": ("(", ")"),
}


def describe(node: Node) -> str:
    """A one-line summary: kind, placement, replicas, batching."""
    parts = [node.kind, node.placement]
    if node.replicas > 1:
        parts.append(f"x{node.replicas}")
    if node.batch is not None:
        parts.append(f"batch {node.batch.max_size}/{node.batch.max_wait * 1000:g}ms")
    if node.info.mode in ("generator", "async_generator"):
        parts.append("stream")
    return " · ".join(parts)


def _node_ids(order: tuple[str, ...]) -> dict[str, str]:
    # Mermaid ids allow only letters, digits and '_', and names may also hold '.' and
    # '-': replacing those would draw "a-b" and "a_b" as one box, so number the nodes.
    return {name: f"n{i}" for i, name in enumerate(order)}


def to_mermaid(graph: Graph) -> str:
    lines = ["flowchart LR"]
    nodes = graph.nodes
    plan = graph.plan()
    ids = _node_ids(plan.order)
    lines.append(f"  in(((input))) --> {ids[plan.source]}")
    for name in plan.order:
        node = nodes[name]
        left, right = _MERMAID_SHAPES[node.kind]
        label = f"{name}<br/>{describe(node)}".replace('"', "'")
        lines.append(f'  {ids[name]}{left}"{label}"{right}')
    for src, dst in graph.edges:
        lines.append(f"  {ids[src]} -->|cap {nodes[dst].input_capacity}| {ids[dst]}")
    lines.append(f"  {ids[plan.sink]} --> out(((output)))")
    return "\n".join(lines) + "\n"


_DOT_SHAPES = {
    "encode": "parallelogram",
    "shard": "trapezium",
    "infer": "box3d",
    "merge": "invtrapezium",
    "map": "box",
}


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: Graph) -> str:
    nodes = graph.nodes
    plan = graph.plan()
    lines = [
        f"digraph {_dot_quote(graph.name)} {{",
        "  rankdir=LR;",
        '  node [fontname="Helvetica"];',
        # Parentheses cannot occur in a node name, so a node called "input" stays apart
        # from the graph's input.
        '  "(input)" [shape=circle, label="input"];',
        '  "(output)" [shape=doublecircle, label="output"];',
    ]
    for name in plan.order:
        node = nodes[name]
        label = f"{name}\\n{describe(node)}"
        lines.append(
            f"  {_dot_quote(name)} [shape={_DOT_SHAPES[node.kind]}, "
            f'label="{label.replace(chr(34), chr(39))}"];'
        )
    lines.append(f'  "(input)" -> {_dot_quote(plan.source)};')
    for src, dst in graph.edges:
        cap = nodes[dst].input_capacity
        lines.append(f'  {_dot_quote(src)} -> {_dot_quote(dst)} [label="cap {cap}"];')
    lines.append(f'  {_dot_quote(plan.sink)} -> "(output)";')
    lines.append("}")
    return "\n".join(lines) + "\n"
