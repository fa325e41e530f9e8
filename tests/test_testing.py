"""dataflow.testing: collect() and check_contracts(), which passes on sound graphs and
fails, naming the contract and the seed, on deliberately broken ones."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import dataflow as df
from dataflow.testing import ContractViolation, check_contracts, collect


def _chain() -> df.Graph:
    @df.encode
    def size(text: str) -> int:
        return len(text)

    @df.infer(placement="thread", replicas=2, capacity=2)
    def double(n: int) -> int:
        return n * 2

    return df.Graph("sound_chain", size >> double)


def _stream() -> df.Graph:
    @df.map
    async def spell(text: str) -> AsyncIterator[str]:
        for ch in text:
            await anyio.sleep(0.001)  # allowed: simulated work between outputs
            yield ch

    @df.map(placement="thread")
    def upper(ch: str) -> str:
        return ch.upper()

    return df.Graph("sound_stream", spell >> upper)


# -- collect ---------------------------------------------------------------------------------
def test_collect_returns_one_result_per_input_in_order() -> None:
    assert collect(_chain(), ["a", "bb", "ccc"]) == [2, 4, 6]
    assert collect(_stream(), ["ab", "c"]) == [["A", "B"], ["C"]]


def test_collect_passes_parameters() -> None:
    @df.map
    def scale(x: int, factor: int = 1) -> int:
        return x * factor

    assert collect(df.Graph("scale", scale), [1, 2], factor=10) == [10, 20]


def test_collect_raises_the_first_failure() -> None:
    @df.map
    def picky(x: int) -> int:
        if x == 2:
            raise ValueError("two")
        return x

    with pytest.raises(df.NodeError, match="two"):
        collect(df.Graph("picky", picky), [1, 2, 3])


# -- check_contracts passes on sound graphs ---------------------------------------------------
def test_sound_graphs_pass() -> None:
    for graph, inputs in ((_chain(), ["a", "bb"]), (_stream(), ["abcdef", "xy"])):
        reports = check_contracts(graph, inputs, seed=3, requests=48)
        assert [r.backend for r in reports] == ["asyncio", "trio"]
        for r in reports:
            assert r.requests == 48
            assert r.completed + r.failed + r.early_exits + r.cancelled + r.timed_out == 48
            assert r.stats["requests"]["in_flight"] == 0


def test_the_shipped_graphs_keep_the_contracts() -> None:
    from dataflow._cli._load import load

    demo = load("graphs/pipeline_demo.py")
    check_contracts(demo.graph, demo.example_inputs, seed=1, requests=32)
    options = {"max_in_flight": 2, "inline": False}
    check_contracts(demo.graph, demo.example_inputs, seed=4, engine_options=options)


@pytest.mark.slow
def test_the_tiny_lm_keeps_the_contracts() -> None:
    lm = load_tiny_lm_graph()
    check_contracts(lm, ["def ", "import "], seed=2, requests=16, params={"max_new_tokens": 4})


def load_tiny_lm_graph() -> df.Graph:
    from graphs.tiny_lm import build

    return build()


def test_failing_requests_are_fine() -> None:
    @df.map
    def odd_only(x: int) -> int:
        if x % 2 == 0:
            raise ValueError("even")
        return x

    (report,) = check_contracts(df.Graph("odd", odd_only), [1, 2], backends=("asyncio",))
    assert report.failed > 0


# -- ... and fails, clearly, on broken ones --------------------------------------------------
def test_a_thread_never_joined_breaks_a_contract() -> None:
    stop = threading.Event()

    class Spawner:
        def setup(self) -> None:
            self.thread = threading.Thread(target=stop.wait, name="forgotten-worker")
            self.thread.start()  # never joined: there is no teardown()

        def __call__(self, x: int) -> int:
            return x

    graph = df.Graph("spawner", df.infer(Spawner, placement="thread"))
    try:
        with pytest.raises(ContractViolation) as info:
            check_contracts(graph, [1, 2], seed=5, backends=("trio",))
    finally:
        stop.set()
    message = str(info.value)
    assert "no thread outlives the engine" in message
    assert "'forgotten-worker'" in message and "seed=5" in message and "trio" in message
    assert info.value.seed == 5 and info.value.backend == "trio"


def test_a_body_that_swallows_cancellation_breaks_a_contract() -> None:
    stop = threading.Event()

    @df.map
    async def stubborn(x: int) -> AsyncIterator[int]:
        yield x
        while not stop.is_set():  # ignores every cancellation and keeps running
            try:
                await anyio.sleep(0.01)  # allowed: a body that never ends
            except anyio.get_cancelled_exc_class():
                pass

    graph = df.Graph("stubborn", stubborn)
    try:
        with pytest.raises(ContractViolation) as info:
            check_contracts(graph, [1], seed=7, requests=4, grace=0.5, time_limit=5)
    finally:
        stop.set()
    message = str(info.value)
    assert "seed=7" in message and "'stubborn'" in message
    assert "shutdown ends every body" in message and "swallow cancellation" in message


def test_setup_without_a_matching_teardown_breaks_a_contract(tmp_path: Path) -> None:
    held: list[object] = []

    class Holder:
        def setup(self) -> None:
            handle = (tmp_path / "resource").open("w")
            held.append(handle)  # acquired, and teardown() never releases it

        def teardown(self) -> None:
            pass

        def __call__(self, x: int) -> int:
            return x

    try:
        with pytest.raises(ContractViolation) as info:
            check_contracts(df.Graph("holder", df.infer(Holder)), [1], seed=11)
    finally:
        for handle in held:
            handle.close()  # type: ignore[attr-defined]
    message = str(info.value)
    assert "teardown() releases what setup() acquired" in message
    assert "seed=11" in message and "still open" in message


# -- the engine fixture of the pytest plugin -------------------------------------------------
@pytest.fixture
def graph() -> df.Graph:
    return _stream()


@pytest.mark.anyio
async def test_the_engine_fixture_runs_the_graph_fixture(engine: df.Engine) -> None:
    assert await engine.run("hi") == ["H", "I"]
    assert [out async for out in engine.stream("ok")] == ["O", "K"]


def test_no_inputs_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one input"):
        check_contracts(_chain(), [])
