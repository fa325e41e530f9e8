"""Annotated types of connected nodes are checked before running.

Every body is defined at module level: with ``from __future__ import annotations`` the
annotations are strings, resolved against the module's globals, and a class local to a
test would be an unresolvable forward reference, which the check deliberately skips.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from typing import Any, Literal, Optional, TypeVar, Union

import pytest
import torch

import dataflow as df

T = TypeVar("T")


class Animal:
    pass


class Dog(Animal):
    pass


def make_int(x: Any) -> int:
    return 1


def make_bool(x: Any) -> bool:
    return True


def make_float(x: Any) -> float:
    return 1.0


def make_str(x: Any) -> str:
    return ""


def make_none(x: Any) -> None:
    return None


def make_optional_int(x: Any) -> Optional[int]:  # noqa: UP045 - the typing spelling is tested
    return None


def make_int_or_none(x: Any) -> int | None:
    return None


def make_literal(x: Any) -> Literal["a", "b"]:
    return "a"


def make_dog(x: Any) -> Dog:
    return Dog()


def make_animal(x: Any) -> Animal:
    return Dog()


def make_list_int(x: Any) -> list[int]:
    return [1]


def make_tensor(x: Any) -> torch.Tensor:
    return torch.zeros(1)


def make_any(x: Any) -> Any:
    return x


def make_unannotated(x):  # type: ignore[no-untyped-def]
    return x


def make_typevar(x: T) -> T:
    return x


def make_missing(x: Any) -> MissingType:  # type: ignore[name-defined]  # noqa: F821
    return x


def gen_str(x: Any) -> Iterator[str]:
    yield ""


def gen_int_generator(x: Any) -> Generator[int, None, None]:
    yield 1


async def agen_str(x: Any) -> AsyncIterator[str]:
    yield ""


def gen_unannotated(x):  # type: ignore[no-untyped-def]
    yield x


def take_int(x: int) -> Any:
    return x


def take_float(x: float) -> Any:
    return x


def take_str(x: str) -> Any:
    return x


def take_animal(x: Animal) -> Any:
    return x


def take_dog(x: Dog) -> Any:
    return x


def take_optional_int(x: Optional[int]) -> Any:  # noqa: UP045
    return x


def take_int_or_str(x: int | str) -> Any:
    return x


def take_union_str_bytes(x: Union[str, bytes]) -> Any:  # noqa: UP007
    return x


def take_sequence(x: Sequence[int]) -> Any:
    return x


def take_tensor(x: torch.Tensor) -> Any:
    return x


def take_any(x: Any) -> Any:
    return x


def take_object(x: object) -> Any:
    return x


def take_unannotated(x):  # type: ignore[no-untyped-def]
    return x


def take_typevar(x: T) -> T:
    return x


def take_missing(x: AlsoMissing) -> Any:  # type: ignore[name-defined]  # noqa: F821
    return x


def split_list_int(x: Any) -> list[int]:
    return [1, 2]


def split_tuple(x: Any) -> tuple[str, ...]:
    return ("a", "b")


def merge_list_int(parts: list[int]) -> int:
    return sum(parts)


def merge_list_str(parts: list[str]) -> str:
    return "".join(parts)


def merge_sequence_float(parts: Sequence[float]) -> float:
    return sum(parts)


def chain(*bodies: Any) -> df.Graph:
    """``map`` nodes in a chain (a shard or merge where the body's name says so)."""
    nodes = []
    for body in bodies:
        name = body.__name__
        make = (
            df.shard
            if name.startswith("split")
            else df.merge
            if name.startswith("merge")
            else df.map
        )
        nodes.append(make(body))
    g = df.Graph("g")
    prev = None
    for node in nodes:
        prev = g.add(node, *(() if prev is None else (prev,)))
    return g


@pytest.mark.parametrize(
    ("src", "dst", "produced", "expected"),
    [
        (make_str, take_int, "str", "int"),
        (make_int, take_str, "int", "str"),
        (make_float, take_int, "float", "int"),
        (make_animal, take_dog, "Animal", "Dog"),
        (make_none, take_int, "NoneType", "int"),
        (make_optional_int, take_int, "Optional[int]", "int"),
        (make_int_or_none, take_int, "int | None", "int"),
        (make_int, take_union_str_bytes, "int", "Union[str, bytes]"),
        (make_literal, take_int, "Literal['a', 'b']", "int"),
        (make_list_int, take_tensor, "list[int]", "Tensor"),
        (make_tensor, take_sequence, "Tensor", "Sequence[int]"),
        (gen_str, take_int, "str", "int"),
        (gen_int_generator, take_str, "int", "str"),
        (agen_str, take_int, "str", "int"),
    ],
)
def test_a_type_mismatch_names_both_nodes_and_both_types(
    src: Any, dst: Any, produced: str, expected: str
) -> None:
    with pytest.raises(df.GraphError) as info:
        chain(src, dst).plan()
    message = str(info.value)
    assert info.value.nodes == (src.__name__, dst.__name__)
    assert f"{src.__name__!r} produces {produced} but {dst.__name__!r} expects {expected}" in (
        message
    ), message


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (make_int, take_int),
        (make_dog, take_animal),  # a subclass
        (make_dog, take_dog),
        (make_int, take_float),  # int -> float, as the numeric tower allows
        (make_bool, take_int),
        (make_bool, take_float),
        (make_int, take_optional_int),
        (make_none, take_optional_int),
        (make_optional_int, take_optional_int),
        (make_int_or_none, take_optional_int),
        (make_str, take_int_or_str),
        (make_literal, take_str),
        (make_literal, take_int_or_str),
        (make_list_int, take_sequence),  # a generic's origin is a subclass
        (make_tensor, take_tensor),
        (make_str, take_any),
        (make_any, take_int),
        (make_str, take_object),
        (make_str, take_unannotated),
        (make_unannotated, take_int),
        (make_typevar, take_int),
        (make_str, take_typevar),
        (make_missing, take_int),  # unresolvable forward reference: no check
        (make_int, take_missing),
        (gen_str, take_str),  # a generator's element type
        (gen_int_generator, take_float),
        (agen_str, take_union_str_bytes),
        (gen_unannotated, take_int),
    ],
)
def test_compatible_annotations_pass(src: Any, dst: Any) -> None:
    plan = chain(src, dst).plan()
    assert plan.order == (src.__name__, dst.__name__)


def test_a_shard_of_list_of_t_feeds_t() -> None:
    chain(split_list_int, take_int, merge_list_int).plan()
    chain(split_list_int, take_float, merge_list_int).plan()
    with pytest.raises(df.GraphError, match="'split_list_int' produces int but 'take_str'"):
        chain(split_list_int, take_str, merge_list_int).plan()


def test_a_shard_of_a_homogeneous_tuple_feeds_its_element() -> None:
    chain(split_tuple, take_str, merge_list_str).plan()
    with pytest.raises(df.GraphError, match="'split_tuple' produces str but 'take_int'"):
        chain(split_tuple, take_int, merge_list_int).plan()


def test_a_merge_of_list_of_t_takes_t() -> None:
    chain(split_list_int, make_int, merge_list_int).plan()
    chain(split_list_int, make_int, merge_sequence_float).plan()
    with pytest.raises(df.GraphError) as info:
        chain(split_list_int, make_int, merge_list_str).plan()
    assert info.value.nodes == ("make_int", "merge_list_str")
    assert "'make_int' produces int but 'merge_list_str' expects str" in str(info.value)


def test_a_shard_straight_into_a_merge() -> None:
    chain(split_list_int, merge_list_int).plan()
    with pytest.raises(df.GraphError, match="produces int but 'merge_list_str' expects str"):
        chain(split_list_int, merge_list_str).plan()


def test_fan_in_parts_may_differ_in_type() -> None:
    g = df.Graph("g")
    src = g.add(df.map(make_any))
    a = g.add(df.map(make_int), src)
    b = g.add(df.map(make_str), src)
    g.add(df.merge(merge_list_int), a, b)
    g.plan()


def test_fan_out_checks_every_edge() -> None:
    g = df.Graph("g")
    src = g.add(df.map(make_int))
    a = g.add(df.map(take_int), src)
    b = g.add(df.map(take_str), src)
    g.add(df.merge("list"), a, b)
    with pytest.raises(df.GraphError, match="'make_int' produces int but 'take_str' expects str"):
        g.plan()


def test_batched_nodes_are_not_checked_per_item() -> None:
    """A batched body sees a collated batch, so its annotation is not a per-item type."""
    g = df.Graph("g", df.map(make_str) >> df.infer(take_int, batch=df.Batch(max_size=4)))
    g.plan()


def test_a_mismatch_is_found_by_the_graph_constructor_too() -> None:
    with pytest.raises(df.GraphError, match="produces str but 'take_int' expects int"):
        df.Graph("g", df.map(make_str) >> df.map(take_int))


class Tokenizer:
    def setup(self) -> None:
        pass

    def __call__(self, text: str) -> list[int]:
        return [len(text)]


class Scale(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_classes_and_modules_are_checked_through_call_and_forward() -> None:
    with pytest.raises(df.GraphError, match="'Tokenizer' produces list\\[int\\] but 'Scale'"):
        df.Graph("g", df.encode(Tokenizer) >> df.infer(Scale()))
    with pytest.raises(df.GraphError, match="'make_int' produces int but 'Tokenizer' expects str"):
        df.Graph("g", df.map(make_int) >> df.encode(Tokenizer))
    df.Graph("g", df.map(make_tensor) >> df.infer(Scale) >> df.map(take_tensor))
