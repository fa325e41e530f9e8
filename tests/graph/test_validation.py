"""Every invalid graph or node raises GraphError before anything runs, naming the nodes."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import dataflow as df
from dataflow.graph import _placement

from ._nodes import gen, node, shard


@contextmanager
def graph_error(*names: str, match: str | None = None) -> Iterator[None]:
    """Expect a GraphError whose message and ``nodes`` name exactly ``names``."""
    with pytest.raises(df.GraphError, match=match) as info:
        yield
    err = info.value
    assert isinstance(err, df.DataflowError)
    assert set(err.nodes) == set(names), (err.nodes, names)
    for name in names:
        assert repr(name) in str(err), (name, str(err))


# -- structure ---------------------------------------------------------------------


def test_a_cycle_made_with_connect_names_the_nodes_on_it() -> None:
    g = df.Graph("g")
    a, b, c, d = g.add(node("a")), node("b"), node("c"), node("d")
    g.add(b, a)
    g.add(c, b)
    g.add(d, c)
    g.connect(d, b)
    with graph_error("b", "c", "d", match="cycle"):
        g.plan()


def test_a_cycle_through_the_entry_node() -> None:
    g = df.Graph("g", node("a") >> node("b"))
    g.connect("b", "a")
    with graph_error("a", "b", match="cycle"):
        g.plan()


def test_a_node_feeding_itself() -> None:
    g = df.Graph("g", node("a") >> node("b"))
    g.connect("b", "b")
    with graph_error("b", match="feeds itself"):
        g.plan()


def test_the_same_edge_twice() -> None:
    g = df.Graph("g", node("a") >> node("b"))
    g.connect("a", "b")
    with graph_error("a", "b", match="given twice"):
        g.plan()


def test_an_unconnected_node() -> None:
    g = df.Graph("g", node("a") >> node("b"))
    g.add(node("lonely"))
    with graph_error("lonely", match="not connected"):
        g.plan()


def test_an_empty_graph() -> None:
    with pytest.raises(df.GraphError, match="no nodes"):
        df.Graph("g").plan()


def test_two_nodes_with_the_same_name() -> None:
    g = df.Graph("g")
    g.add(node("a"))
    with graph_error("a", match="used by two nodes"):
        g.add(node("a"), "a")


def test_the_same_node_added_twice() -> None:
    a = node("a")
    with graph_error("a", match="added twice"):
        df.Graph("g", a >> node("b") >> a)


def test_an_upstream_that_is_not_in_the_graph() -> None:
    g = df.Graph("g")
    outside, b = node("outside"), node("b")
    with graph_error("outside", "b", match="not in the graph"):
        g.add(b, outside)
    assert "b" not in g  # a refused add leaves the graph as it was


def test_an_upstream_name_that_is_not_in_the_graph() -> None:
    g = df.Graph("g")
    g.add(node("a"))
    with graph_error("missing", "b", match="not in the graph"):
        g.add(node("b"), "missing")


def test_an_upstream_that_only_shares_a_name_with_a_graph_node() -> None:
    g = df.Graph("g")
    g.add(node("a"))
    with graph_error("a", "b", match="not in the graph"):
        g.add(node("b"), node("a"))


def test_connect_to_a_node_not_in_the_graph() -> None:
    g = df.Graph("g", node("a"))
    with graph_error("ghost", match="not in the graph"):
        g.connect("a", "ghost")


def test_several_entry_nodes() -> None:
    g = df.Graph("g")
    a, b = g.add(node("a")), g.add(node("b"))
    g.add(df.merge("list"), a, b)
    with graph_error("a", "b", match="several entry nodes"):
        g.plan()


def test_several_exit_nodes() -> None:
    g = df.Graph("g")
    a = g.add(node("a"))
    g.add(node("b"), a)
    g.add(node("c"), a)
    with graph_error("b", "c", match="several exit nodes"):
        g.plan()


def test_fan_in_into_a_node_that_is_not_a_merge() -> None:
    g = df.Graph("g")
    a = g.add(node("a"))
    b, c = g.add(node("b"), a), g.add(node("c"), a)
    g.add(node("join"), b, c)
    with graph_error("join", "b", "c", match="only a merge node"):
        g.plan()


def test_a_merge_with_nothing_to_gather() -> None:
    with graph_error("merge_list", match="no shard"):
        df.Graph("g", node("a") >> df.merge("list"))


def test_a_merge_as_the_entry_node() -> None:
    with graph_error("merge_sum", match="no shard"):
        df.Graph("g", df.merge("sum"))


def test_a_merge_right_after_a_generator() -> None:
    with graph_error("merge_list", match="follows a generator"):
        df.Graph("g", gen("tokens") >> df.merge("list"))


def test_a_merge_after_a_generator_inside_a_shard() -> None:
    with graph_error("merge_list", match="follows a generator"):
        df.Graph("g", shard("split") >> gen("tokens") >> df.merge("list"))


def test_fan_in_of_a_sharded_branch_and_a_plain_branch() -> None:
    g = df.Graph("g")
    a = g.add(node("a"))
    s = g.add(shard("split"), a)
    b = g.add(node("b"), s)
    c = g.add(node("c"), a)
    g.add(df.merge("list"), b, c)
    with graph_error("merge_list", "b", "c", match="different numbers of items"):
        g.plan()


def test_fan_in_of_branches_from_two_different_generators() -> None:
    """Regression: both branches read ("G",) but the generators emit unrelated counts, and
    the merge waited forever for the longer one's partners."""
    g = df.Graph("g")
    a = g.add(node("a"))
    g1, g2 = g.add(gen("g1"), a), g.add(gen("g2"), a)
    g.add(df.merge("list"), g1, g2)
    with graph_error("merge_list", "g1", "g2", match="different numbers of items"):
        g.plan()


def test_fan_in_of_branches_from_two_different_shards() -> None:
    g = df.Graph("g")
    a = g.add(node("a"))
    s1, s2 = g.add(shard("s1"), a), g.add(shard("s2"), a)
    g.add(df.merge("list"), s1, s2)
    with graph_error("merge_list", "s1", "s2", match="different numbers of items"):
        g.plan()


def test_fan_in_of_branches_from_one_generator_is_valid() -> None:
    g = df.Graph("g")
    tokens = g.add(gen("tokens"))
    b, c = g.add(node("b"), tokens), g.add(node("c"), tokens)
    g.add(df.merge("list"), b, c)
    assert g.plan().marks["merge_list"] == ("G",)


def test_a_non_node_passed_to_add() -> None:
    g = df.Graph("g")
    with pytest.raises(df.GraphError, match=r"is not a node; wrap it with df\.map"):
        g.add(lambda x: x)  # type: ignore[arg-type]


def test_a_non_node_root() -> None:
    with pytest.raises(df.GraphError, match="expected a node or a chain"):
        df.Graph("g", [node("a")])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", None, 3])
def test_a_bad_graph_name(name: Any) -> None:
    with pytest.raises(df.GraphError, match="graph name must be a non-empty string"):
        df.Graph(name)


# -- placement ---------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["gpu", "cuda:", "cuda:x", "Thread", "", "loop "])
def test_an_unknown_placement(placement: str) -> None:
    with graph_error("a", match="unknown placement"):
        node("a", placement=placement)


@pytest.mark.parametrize("placement", [None, 0])
def test_a_placement_that_is_not_a_string(placement: Any) -> None:
    with graph_error("a", match="unknown placement"):
        node("a", placement=placement)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("placement", ["cuda", "cuda:0"])
def test_cuda_on_a_machine_without_a_gpu(placement: str) -> None:
    graph = df.Graph("g", node("a") >> df.infer(lambda x: x, name="gpu", placement=placement))
    with graph_error("gpu", match="needs a CUDA GPU"):
        graph.validate()
    with graph_error("gpu", match="needs a CUDA GPU"):
        df.Engine(graph)


def test_cuda_without_a_gpu_whatever_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_placement, "cuda_device_count", lambda: 0)
    graph = df.Graph("g", df.infer(lambda x: x, name="gpu", placement="cuda"))
    graph.plan()  # the structure is fine; only the machine lacks the device
    with graph_error("gpu", match="needs a CUDA GPU"):
        graph.validate()
    with graph_error("gpu", match="needs a CUDA GPU"):
        df.Engine(graph)


def test_a_cuda_index_beyond_the_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_placement, "cuda_device_count", lambda: 2)
    df.Graph("g", df.infer(lambda x: x, name="ok", placement="cuda:1")).validate()
    graph = df.Graph("g", df.infer(lambda x: x, name="gpu", placement="cuda:2"))
    with graph_error("gpu", match=r"only 2 CUDA device\(s\)"):
        graph.validate()


def test_auto_falls_back_to_a_thread_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_placement, "cuda_device_count", lambda: 0)
    graph = df.Graph("g", df.infer(lambda x: x, name="model"))
    graph.validate()
    assert _placement.resolve(graph["model"]) == "thread"


def test_ray_without_ray_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "ray" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    graph = df.Graph("g", node("a") >> df.infer(lambda x: x, name="actor", placement="ray"))
    with graph_error("actor", match=r"needs Ray; install the extra"):
        graph.validate()
    with graph_error("actor", match=r"needs Ray"):
        df.Engine(graph)


# -- bodies ------------------------------------------------------------------------


@pytest.mark.parametrize("body", [3, "text", [1, 2]])
def test_a_non_callable_body(body: Any) -> None:
    with graph_error("n", match="is not callable"):
        df.map(body, name="n")


def test_a_non_callable_body_without_a_name_is_named_by_its_type() -> None:
    with graph_error("int", match="is not callable"):
        df.infer(3)


class SetupNoCall:
    def setup(self) -> None:
        pass


def test_a_class_with_setup_but_no_call() -> None:
    """Regression: a class without ``__call__`` is taken as a converter (called once per
    item), so its ``setup()`` would silently never run."""
    with graph_error("SetupNoCall", match=r"has setup\(\)/teardown\(\) but no __call__"):
        df.infer(SetupNoCall)


async def _coroutine(x: int) -> int:
    return x


async def _async_gen(x: int) -> Any:
    yield x


@pytest.mark.parametrize("body", [_coroutine, _async_gen])
@pytest.mark.parametrize("placement", ["thread", "cuda", "ray"])
def test_an_async_body_off_the_loop(body: Any, placement: str) -> None:
    with graph_error("n", match="an async body runs on the event loop"):
        df.infer(body, name="n", placement=placement)


@pytest.mark.parametrize("placement", ["loop", "auto"])
def test_an_async_body_on_the_loop_is_valid(placement: str) -> None:
    assert df.infer(_coroutine, placement=placement).info.mode == "async"


@pytest.mark.parametrize("body", [_async_gen, lambda x: (yield x)])
def test_a_batched_generator(body: Any) -> None:
    with graph_error("n", match="generator body cannot be batched"):
        df.infer(body, name="n", batch=df.Batch(max_size=4))


@pytest.mark.parametrize("make", [df.shard, df.merge, df.encode])
def test_batch_on_a_node_kind_that_is_not_infer_or_map(make: Any) -> None:
    with graph_error("n", match="batch= is for infer and map nodes"):
        make(lambda x: x, name="n", batch=df.Batch())


def test_batch_must_be_a_batch() -> None:
    with graph_error("n", match="batch must be a df.Batch"):
        df.infer(lambda x: x, name="n", batch=32)


@pytest.mark.parametrize("make", [df.shard, df.merge])
def test_a_shard_or_merge_that_yields(make: Any) -> None:
    def parts(x: Any) -> Iterator[Any]:
        yield x

    with graph_error("n", match=f"a {make.__name__} body must return its result"):
        make(parts, name="n")


# -- options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("replicas", 0, "replicas must be >= 1"),
        ("replicas", -2, "replicas must be >= 1"),
        ("replicas", 1.5, "replicas must be an int"),
        ("replicas", "2", "replicas must be an int"),
        ("replicas", True, "replicas must be an int"),
        ("capacity", 0, "capacity must be an int >= 1"),
        ("capacity", 2.0, "capacity must be an int >= 1"),
        ("capacity", True, "capacity must be an int >= 1"),
        ("timeout", 0, "timeout must be seconds > 0"),
        ("timeout", -1.0, "timeout must be seconds > 0"),
        ("timeout", "1", "timeout must be seconds > 0"),
        ("timeout", math.nan, "timeout must be seconds > 0"),
        ("timeout", True, "timeout must be seconds > 0"),
        ("threads", 0, "threads must be an int >= 1"),
        ("threads", 1.0, "threads must be an int >= 1"),
        ("threads", False, "threads must be an int >= 1"),
        ("ordered", "yes", "ordered must be True or False"),
        ("ordered", None, "ordered must be True or False"),
    ],
)
def test_a_bad_option(option: str, value: Any, message: str) -> None:
    with graph_error("n", match=message):
        node("n", **{option: value})


@pytest.mark.parametrize("name", ["", "has space", "1st", "a/b", 'q"uote', "é", 7])
def test_a_bad_node_name(name: Any) -> None:
    with pytest.raises(df.GraphError, match="invalid node name") as info:
        node(name)
    assert info.value.nodes == (str(name),)


@pytest.mark.parametrize("name", ["a", "_x", "stage-1", "model.encoder", "A_9"])
def test_good_node_names(name: str) -> None:
    assert node(name).name == name


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_size": 0}, "max_size must be an int >= 1"),
        ({"max_size": 2.0}, "max_size must be an int >= 1"),
        ({"max_size": True}, "max_size must be an int >= 1"),
        ({"max_wait": -0.1}, "max_wait must be seconds >= 0"),
        ({"max_wait": "1ms"}, "max_wait must be seconds >= 0"),
        ({"max_wait": math.nan}, "max_wait must be seconds >= 0"),
        ({"max_wait": math.inf}, "max_wait must be seconds >= 0"),
        ({"collate": "concat"}, "collate must be 'stack', 'pad', 'list' or a callable"),
        ({"collate": 3}, "collate must be 'stack', 'pad', 'list' or a callable"),
        ({"split": "dim0"}, "split must be a callable or None"),
    ],
)
def test_a_bad_batch(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(df.GraphError, match=message):
        df.Batch(**fields)


def test_good_batches() -> None:
    df.Batch(max_size=1, max_wait=0)
    df.Batch(collate="pad", pad_value=-1)
    df.Batch(collate=list, split=lambda out, n: list(out))


def test_errors_raised_by_the_graph_layer_are_graph_errors() -> None:
    """One root for everything: ``except df.DataflowError`` catches validation too."""
    assert issubclass(df.GraphError, df.DataflowError)
    with pytest.raises(df.DataflowError):
        node("n", replicas=0)


def test_unknown_node_option_is_a_graph_error_at_once() -> None:
    with pytest.raises(df.GraphError, match="replica"):
        df.map(replica=2)
    with pytest.raises(df.GraphError, match="foo"):
        df.infer(lambda x: x, foo=1)
