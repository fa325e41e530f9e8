"""Pictures of a graph: Mermaid text and Graphviz DOT."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest

import dataflow as df

DOT = shutil.which("dot")


def identity(x: Any) -> Any:
    return x


def tokens(x: Any) -> Any:
    yield x


def sample_graph() -> df.Graph:
    """One node of each kind, replicas, batching, a stream and a custom capacity."""
    g = df.Graph("sample")
    enc = g.add(df.encode(identity, name="tokenize"))
    split = g.add(df.shard(lambda x: [x, x], name="split", capacity=4), enc)
    model = g.add(
        df.infer(
            identity,
            name="model",
            placement="thread",
            replicas=2,
            batch=df.Batch(max_size=8, max_wait=0.002),
        ),
        split,
    )
    merged = g.add(df.merge("concat"), model)
    g.add(df.map(tokens, name="stream"), merged)
    return g


# -- Mermaid -----------------------------------------------------------------------


def mermaid_nodes(text: str) -> dict[str, str]:
    """Mermaid node id -> label, for the nodes declared with a quoted label."""
    return dict(re.findall(r'^  (n\d+)\W+"([^"]*)"', text, flags=re.MULTILINE))


def mermaid_edges(text: str) -> list[tuple[str, str, str]]:
    return re.findall(r"^  (\w+) -->\|([^|]*)\| (\w+)$", text, flags=re.MULTILINE)


def test_mermaid_is_a_left_to_right_flowchart() -> None:
    text = sample_graph().to_mermaid()
    assert text.startswith("flowchart LR\n")
    assert text.endswith("\n")


def test_mermaid_labels_every_node_with_kind_placement_replicas_and_batch() -> None:
    labels = sorted(mermaid_nodes(sample_graph().to_mermaid()).values())
    assert labels == sorted(
        [
            "tokenize<br/>encode · loop",
            "split<br/>shard · loop",
            "model<br/>infer · thread · x2 · batch 8/2ms",
            "merge_concat<br/>merge · loop",
            "stream<br/>map · loop · stream",
        ]
    )


def test_mermaid_shapes_follow_the_kind() -> None:
    text = sample_graph().to_mermaid()
    assert re.search(r'n\d+\[/"tokenize', text)
    assert re.search(r'n\d+\{\{"split', text)
    assert re.search(r'n\d+\[\["model', text)
    assert re.search(r'n\d+\[\\"merge_concat', text)
    assert re.search(r'n\d+\("stream', text)


def test_mermaid_edges_carry_the_capacity_of_their_target() -> None:
    text = sample_graph().to_mermaid()
    ids = {label.split("<br/>")[0]: node_id for node_id, label in mermaid_nodes(text).items()}
    names = {node_id: name for name, node_id in ids.items()}
    edges = {(names[s], names[d]): label for s, label, d in mermaid_edges(text)}
    assert edges == {
        ("tokenize", "split"): "cap 4",
        ("split", "model"): "cap 16",  # max(16, 2 * batch size 8)
        ("model", "merge_concat"): "cap 16",
        ("merge_concat", "stream"): "cap 16",
    }
    assert f"in(((input))) --> {ids['tokenize']}\n" in text
    assert f"{ids['stream']} --> out(((output)))\n" in text


def test_mermaid_keeps_names_that_differ_only_in_punctuation_apart() -> None:
    """Regression: ids made by replacing '-' and '.' with '_' drew these as one box."""
    text = df.Graph(
        "g",
        df.map(identity, name="a-b")
        >> df.map(identity, name="a_b")
        >> df.map(identity, name="a.b"),
    ).to_mermaid()
    nodes = mermaid_nodes(text)
    assert len(nodes) == 3
    assert len(mermaid_edges(text)) == 2
    assert all(s != d for s, _, d in mermaid_edges(text))


# -- DOT ---------------------------------------------------------------------------


def run_dot(text: str) -> dict[str, Any]:
    """Lay ``text`` out with Graphviz and return its JSON description."""
    if DOT is None:
        pytest.skip("Graphviz 'dot' is not installed")
    result = subprocess.run(
        [DOT, "-Tjson"], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # no syntax warnings either
    layout: dict[str, Any] = json.loads(result.stdout)
    return layout


def dot_structure(layout: dict[str, Any]) -> tuple[set[str], set[tuple[str, str]]]:
    names = {obj["_gvid"]: obj["name"] for obj in layout.get("objects", [])}
    edges = {(names[e["tail"]], names[e["head"]]) for e in layout.get("edges", [])}
    return set(names.values()), edges


def test_dot_describes_every_node_and_edge() -> None:
    text = sample_graph().to_dot()
    assert text.startswith('digraph "sample" {\n')
    assert text.rstrip().endswith("}")
    assert '"model" [shape=box3d, label="model\\ninfer · thread · x2 · batch 8/2ms"];' in text
    assert '"tokenize" -> "split" [label="cap 4"];' in text
    assert '"split" -> "model" [label="cap 16"];' in text


def test_dot_is_valid_for_graphviz() -> None:
    layout = run_dot(sample_graph().to_dot())
    nodes, edges = dot_structure(layout)
    assert nodes == {"(input)", "(output)", "tokenize", "split", "model", "merge_concat", "stream"}
    assert edges == {
        ("(input)", "tokenize"),
        ("tokenize", "split"),
        ("split", "model"),
        ("model", "merge_concat"),
        ("merge_concat", "stream"),
        ("stream", "(output)"),
    }


@pytest.mark.parametrize(
    "graph_name",
    ['q"uote', "back\\slash", "ends\\", "br{ace}; -> x", "two\nlines", "ü", 'x" -> "y'],
)
def test_dot_quotes_odd_graph_names(graph_name: str) -> None:
    text = df.Graph(graph_name, df.map(identity, name="a") >> df.map(identity, name="b")).to_dot()
    assert text.startswith('digraph "')
    nodes, edges = dot_structure(run_dot(text))
    # A name that escaped its quotes would add nodes or edges of its own.
    assert nodes == {"(input)", "(output)", "a", "b"}
    assert edges == {("(input)", "a"), ("a", "b"), ("b", "(output)")}


@pytest.mark.parametrize("name", ["node", "edge", "graph", "digraph", "strict", "a-b.c", "_1"])
def test_dot_quotes_node_names_that_are_keywords_or_punctuated(name: str) -> None:
    text = df.Graph("g", df.map(identity, name=name) >> df.map(identity, name="after")).to_dot()
    assert f'"{name}" -> "after"' in text
    nodes, edges = dot_structure(run_dot(text))
    assert nodes == {"(input)", "(output)", name, "after"}
    assert (name, "after") in edges


@pytest.mark.parametrize("name", ["input", "output"])
def test_a_node_named_input_or_output_stays_apart_from_the_terminals(name: str) -> None:
    """Regression: the terminals were the DOT nodes "input" and "output", so a node of that
    name merged with them."""
    text = df.Graph("g", df.map(identity, name=name) >> df.map(identity, name="x")).to_dot()
    assert text.count(f'"{name}" [') == 1
    nodes, edges = dot_structure(run_dot(text))
    assert nodes == {"(input)", "(output)", name, "x"}
    assert ("(input)", name) in edges


def test_pictures_of_an_invalid_graph_raise_graph_error() -> None:
    g = df.Graph("g")
    g.add(df.map(identity, name="a"))
    g.add(df.map(identity, name="b"))
    with pytest.raises(df.GraphError):
        g.to_mermaid()
    with pytest.raises(df.GraphError):
        g.to_dot()
