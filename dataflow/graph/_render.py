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


def _node_id(name: str) -> str:
    return "n_" + "".join(c if c.isalnum() else "_" for c in name)


def to_mermaid(graph: Graph) -> str:
    lines = ["flowchart LR"]
    nodes = graph.nodes
    plan = graph.plan()
    lines.append(f"  in(((input))) --> {_node_id(plan.source)}")
    for name in plan.order:
        node = nodes[name]
        left, right = _MERMAID_SHAPES[node.kind]
        label = f"{name}<br/>{describe(node)}".replace('"', "'")
        lines.append(f'  {_node_id(name)}{left}"{label}"{right}')
    for src, dst in graph.edges:
        lines.append(f"  {_node_id(src)} -->|cap {nodes[dst].input_capacity}| {_node_id(dst)}")
    lines.append(f"  {_node_id(plan.sink)} --> out(((output)))")
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
        '  "input" [shape=circle];',
        '  "output" [shape=doublecircle];',
    ]
    for name in plan.order:
        node = nodes[name]
        label = f"{name}\\n{describe(node)}"
        lines.append(
            f"  {_dot_quote(name)} [shape={_DOT_SHAPES[node.kind]}, "
            f'label="{label.replace(chr(34), chr(39))}"];'
        )
    lines.append(f'  "input" -> {_dot_quote(plan.source)};')
    for src, dst in graph.edges:
        cap = nodes[dst].input_capacity
        lines.append(f'  {_dot_quote(src)} -> {_dot_quote(dst)} [label="cap {cap}"];')
    lines.append(f'  {_dot_quote(plan.sink)} -> "output";')
    lines.append("}")
    return "\n".join(lines) + "\n"
