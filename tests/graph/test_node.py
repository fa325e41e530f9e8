"""Node constructors: decorator forms, body kinds, introspection, defaults, combiners."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
import torch

import dataflow as df
from dataflow.graph._combine import combiner
from dataflow.graph._node import DEFAULT_CAPACITY

CONSTRUCTORS = [df.encode, df.shard, df.infer, df.merge, df.map]
KINDS = ["encode", "shard", "infer", "merge", "map"]


def double(x: int) -> int:
    return 2 * x


# -- the three ways to make a node ---------------------------------------------------


@pytest.mark.parametrize(("make", "kind"), list(zip(CONSTRUCTORS, KINDS, strict=True)))
def test_bare_decorator_makes_a_node_named_after_the_function(make: Any, kind: str) -> None:
    @make
    def step(x: int) -> int:
        return x

    assert isinstance(step, df.Node)
    assert step.kind == kind
    assert step.name == "step"
    assert step.replicas == 1


@pytest.mark.parametrize(("make", "kind"), list(zip(CONSTRUCTORS, KINDS, strict=True)))
def test_decorator_with_options_applies_them(make: Any, kind: str) -> None:
    @make(name="renamed", placement="thread", replicas=3, capacity=5, ordered=False, timeout=2)
    def step(x: int) -> int:
        return x

    assert isinstance(step, df.Node)
    assert (step.kind, step.name, step.placement) == (kind, "renamed", "thread")
    assert (step.replicas, step.capacity, step.ordered, step.timeout) == (3, 5, False, 2)


@pytest.mark.parametrize("make", CONSTRUCTORS)
def test_called_on_a_function(make: Any) -> None:
    node = make(double)
    assert isinstance(node, df.Node)
    assert node.body is double
    assert node.name == "double"


def test_a_lambda_is_named_lambda_unless_given_a_name() -> None:
    assert df.map(lambda x: x).name == "lambda"
    assert df.map(lambda x: x, name="identity").name == "identity"


def test_calling_a_decorated_function_still_calls_it() -> None:
    @df.encode
    def tokenize(text: str) -> list[str]:
        return text.split()

    assert tokenize("a b c") == ["a", "b", "c"]
    assert df.infer(placement="thread")(double)(21) == 42


async def _async_double(x: int) -> int:
    return 2 * x


@pytest.mark.anyio
async def test_calling_an_async_node_returns_its_coroutine() -> None:
    assert await df.map(_async_double)(4) == 8


def test_calling_a_node_that_wraps_a_class_says_to_call_an_instance() -> None:
    with pytest.raises(TypeError, match="instantiated per replica"):
        df.infer(Model)(1)


def test_a_partial_is_named_after_its_function() -> None:
    assert df.map(functools.partial(double)).name == "double"


# -- body kinds ------------------------------------------------------------------


class Model:
    """A class with setup()/teardown(): instantiated once per replica."""

    def setup(self) -> None:
        self.scale = 3

    def teardown(self) -> None:
        del self.scale

    def __call__(self, x: int, *, scale: int = 1) -> int:
        return x * self.scale * scale


class Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor, *, factor: float = 1.0) -> torch.Tensor:
        return x * self.weight * factor


class CallableThing:
    def __call__(self, x: str, *, upper: bool = False) -> str:
        return x.upper() if upper else x


def test_an_nn_module_instance_is_a_module_body_named_after_its_class() -> None:
    module = Scale()
    node = df.infer(module)
    assert node.body is module
    assert node.name == "Scale"
    assert node.info.is_module
    assert not node.info.per_replica
    assert node.info.params == {"factor"}
    assert node.info.in_type is torch.Tensor
    assert node.info.out_type is torch.Tensor


def test_an_nn_module_class_is_built_per_replica() -> None:
    node = df.infer(Scale)
    assert node.info.is_module
    assert node.info.per_replica
    assert node.info.params == {"factor"}  # ``self`` and the input are not parameters


def test_a_class_with_setup_is_built_per_replica() -> None:
    node = df.infer(Model)
    assert node.name == "Model"
    assert node.info.per_replica
    assert not node.info.is_module
    assert node.info.mode == "function"
    assert node.info.params == {"scale"}
    assert node.info.in_type is int


@dataclasses.dataclass
class Point:
    x: int
    y: int = 0


def test_a_class_without_call_is_a_converter_called_per_item() -> None:
    node = df.map(Point)
    assert not node.info.per_replica
    assert node.info.mode == "function"
    assert node.info.in_type is int
    assert node.info.out_type is Point
    assert node(3) == Point(3)  # called like a function, not refused as a per-replica class


def test_a_builtin_class_is_a_converter_producing_its_type() -> None:
    node = df.map(int)
    assert node.name == "int"
    assert node.info.out_type is int
    assert node("42") == 42


def test_a_callable_instance_is_described_by_its_call() -> None:
    node = df.map(CallableThing())
    assert node.name == "CallableThing"
    assert not node.info.per_replica
    assert node.info.params == {"upper"}
    assert node.info.in_type is str


def test_a_bound_method_is_described_without_self() -> None:
    node = df.map(CallableThing().__call__, name="method")
    assert node.info.params == {"upper"}
    assert node.info.in_type is str


def sync_body(x: int) -> int:
    return x


def gen_body(x: int) -> Iterator[int]:
    yield x


async def async_body(x: int) -> int:
    return x


async def agen_body(x: int) -> AsyncIterator[int]:
    yield x


class GenClass:
    def __call__(self, x: int) -> Iterator[int]:
        yield x


class AsyncClass:
    async def __call__(self, x: int) -> int:
        return x


@pytest.mark.parametrize(
    ("body", "mode"),
    [
        (sync_body, "function"),
        (gen_body, "generator"),
        (async_body, "async"),
        (agen_body, "async_generator"),
        (GenClass, "generator"),
        (GenClass(), "generator"),
        (AsyncClass, "async"),
        (AsyncClass(), "async"),
        (functools.partial(async_body), "async"),
        (functools.partial(agen_body), "async_generator"),
        (functools.partial(gen_body), "generator"),
    ],
)
def test_body_mode_is_detected(body: Any, mode: str) -> None:
    assert df.map(body, name="n").info.mode == mode


def test_a_partial_exposes_the_parameters_it_leaves_open() -> None:
    async def scale(x: int, *, factor: int, bias: int = 0) -> int:
        return x * factor + bias

    node = df.map(functools.partial(scale, factor=2))
    assert node.info.mode == "async"
    assert node.info.params == {"factor", "bias"}
    assert not node.info.accepts_any_param


# -- per-request parameters ------------------------------------------------------


def test_declared_parameters_exclude_the_input() -> None:
    def generate(prompt: str, max_new_tokens: int = 16, *, temperature: float = 1.0) -> str:
        return prompt

    info = df.infer(generate).info
    assert info.params == {"max_new_tokens", "temperature"}
    assert not info.accepts_any_param


def test_var_keyword_accepts_any_parameter() -> None:
    def anything(x: int, *, seed: int = 0, **rest: Any) -> int:
        return x

    info = df.map(anything).info
    assert info.params == {"seed"}
    assert info.accepts_any_param


def test_a_body_with_only_its_input_declares_no_parameters() -> None:
    info = df.map(double).info
    assert info.params == frozenset()
    assert not info.accepts_any_param


# -- defaults --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "placement"),
    [
        (df.infer, "auto"),
        (df.encode, "loop"),
        (df.shard, "loop"),
        (df.merge, "loop"),
        (df.map, "loop"),
    ],
)
def test_default_placement(make: Any, placement: str) -> None:
    assert make(double).placement == placement
    assert make()(double).placement == placement


def test_explicit_placement_overrides_the_default() -> None:
    assert df.infer(double, placement="loop").placement == "loop"
    assert df.map(double, placement="thread").placement == "thread"


def test_input_capacity_defaults() -> None:
    assert DEFAULT_CAPACITY == 16
    assert df.map(double).input_capacity == 16
    # A batched node holds two batches so one can fill while the other runs.
    assert df.infer(double, batch=df.Batch(max_size=32)).input_capacity == 64
    assert df.infer(double, batch=df.Batch(max_size=4)).input_capacity == 16
    assert df.infer(double, batch=df.Batch(max_size=32), capacity=3).input_capacity == 3
    assert df.map(double, capacity=1).input_capacity == 1


def test_batch_defaults() -> None:
    batch = df.Batch()
    assert (batch.max_size, batch.max_wait, batch.collate) == (32, 0.005, "stack")
    assert batch.split is None


def test_options_are_copied_not_shared() -> None:
    settings = {"num_cpus": 1}
    node = df.map(double, options=settings)
    settings["num_cpus"] = 8
    assert node.options == {"num_cpus": 1}


# -- merge combiners -------------------------------------------------------------


@pytest.mark.parametrize("name", ["concat", "sum", "stack", "mean", "list"])
def test_merge_with_a_combiner_name(name: str) -> None:
    node = df.merge(name)
    assert node.kind == "merge"
    assert node.combine == name
    assert node.name == f"merge_{name}"
    assert df.merge(combine=name, name="m").combine == name


def test_merge_with_a_body_has_no_combiner() -> None:
    @df.merge
    def gather(parts: list[int]) -> int:
        return sum(parts)

    assert gather.combine is None
    assert gather([1, 2]) == 3


def test_merge_rejects_an_unknown_combiner() -> None:
    with pytest.raises(df.GraphError, match="unknown merge combiner 'median'"):
        df.merge("median")


def _combine(name: str, parts: Sequence[Any], dim: int = 0) -> Any:
    return df.merge(name, dim=dim).body(parts)


def test_concat_tensors_along_dim() -> None:
    a, b = torch.tensor([[1, 2]]), torch.tensor([[3, 4]])
    assert torch.equal(_combine("concat", [a, b]), torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(_combine("concat", [a, b], dim=1), torch.tensor([[1, 2, 3, 4]]))


def test_concat_lists_tuples_and_strings() -> None:
    assert _combine("concat", [[1, 2], [3], []]) == [1, 2, 3]
    assert _combine("concat", [(1,), (2, 3)]) == (1, 2, 3)
    assert _combine("concat", ["ab", "c"]) == "abc"


def test_sum_and_mean_of_tensors_and_numbers() -> None:
    parts = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 0.0])]
    assert torch.equal(_combine("sum", parts), torch.tensor([9.0, 6.0]))
    assert torch.equal(_combine("mean", parts), torch.tensor([3.0, 2.0]))
    assert _combine("sum", [1, 2, 3]) == 6
    assert _combine("mean", [1, 2, 3, 6]) == 3
    assert _combine("sum", [[1], [2]]) == [1, 2]


def test_stack_tensors_along_dim() -> None:
    a, b = torch.tensor([1, 2]), torch.tensor([3, 4])
    assert torch.equal(_combine("stack", [a, b]), torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(_combine("stack", [a, b], dim=1), torch.tensor([[1, 3], [2, 4]]))


def test_list_keeps_the_parts_in_order() -> None:
    parts = (3, "x", [1])
    assert _combine("list", parts) == [3, "x", [1]]
    assert isinstance(_combine("list", parts), list)


def test_combiner_functions_are_named_for_pictures_and_errors() -> None:
    assert combiner("sum").__name__ == "merge_sum"


@pytest.mark.anyio
async def test_combiners_run_inside_an_engine() -> None:
    """shard -> merge("concat") gathers every part of a request, in index order."""

    @df.shard
    def split(x: torch.Tensor) -> list[torch.Tensor]:
        return list(x.chunk(3))

    graph = df.Graph("concat", split >> df.merge("concat"))
    async with df.Engine(graph) as engine:
        x = torch.arange(6.0)
        assert torch.equal(await engine.run(x, timeout=10), x)
