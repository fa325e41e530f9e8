"""Ray placement: ObjectRefs handed actor to actor, and leaving streams early (issue 16).

Shares the session's Ray cluster and the :class:`Probe` with test_ray.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import dataflow as df

ray = pytest.importorskip("ray", reason="Ray placement needs the ray extra")
from tests.runtime import test_ray as base  # noqa: E402  (needs ray)
from tests.runtime.test_ray import FREE, get  # noqa: E402

ray_cluster = base.ray_cluster  # the session's cluster (fixture)
probe = base.probe  # fixture

pytestmark = pytest.mark.anyio


# -- values stay in Ray between Ray nodes -----------------------------------------------
async def test_a_value_between_ray_nodes_is_not_fetched_by_the_engine(
    ray_cluster: Any, tmp_path: Path
) -> None:
    driver = os.getpid()
    # Deserialisations in this process, one line each (the class travels by value, so a
    # file is what its copies share).
    log = str(tmp_path / "loads")

    class Counted:
        def __init__(self, n: int) -> None:
            self.n = n

        def __getstate__(self) -> dict[str, int]:
            return {"n": self.n}

        def __setstate__(self, state: dict[str, int]) -> None:
            if os.getpid() == driver:
                with open(log, "a") as f:
                    f.write(f"{state['n']}\n")
            self.n = state["n"]

    def make(x: int) -> Counted:
        return Counted(x)

    def relay(c: Counted) -> Counted:
        return Counted(c.n + 1)

    def finish(c: Counted) -> Counted:
        return Counted(c.n * 10)

    opts = {**FREE, "max_in_flight": 2}
    chain = (
        df.map(make, placement="ray", options=opts)
        >> df.map(relay, placement="ray", options=opts)
        >> df.map(finish, placement="ray", options=opts)
    )
    async with df.Engine(df.Graph("refs", chain)) as engine:
        first = await engine.run(1)
        rest = [c.n async for c in engine.map(range(2, 6))]
    assert [first.n, *rest] == [20, 30, 40, 50, 60]
    # Only the last node's outputs came into this process, once each: make's and
    # relay's went from actor to actor as ObjectRefs.
    loads = sorted(int(n) for n in (tmp_path / "loads").read_text().split())
    assert loads == [20, 30, 40, 50, 60]


async def test_a_failure_in_a_ray_chain_names_the_node_that_raised(ray_cluster: Any) -> None:
    def check(x: int) -> int:
        if x < 0:
            raise ValueError(f"negative input {x}")
        return x

    def double(x: int) -> int:
        return 2 * x

    chain = df.map(check, placement="ray", options=FREE) >> df.map(
        double, placement="ray", options=FREE
    )
    errors: list[BaseException] = []

    async def failing(x: int) -> None:
        try:
            await engine.run(x)
        except df.NodeError as exc:
            errors.append(exc)

    async with df.Engine(df.Graph("refs-fail", chain)) as engine:
        # double's call is submitted before check's ends (the ref is handed on at once)
        # and fails on its failed input: either outcome may reach the engine first, and
        # every time the request fails at check, never at double.
        async with anyio.create_task_group() as tg:
            for x in range(-1, -9, -1):
                tg.start_soon(failing, x)
        assert await engine.run(4) == 8
        stats = engine.stats()
    assert len(errors) == 8
    for err in errors:
        assert isinstance(err, df.NodeError) and err.node == "check"
        assert isinstance(err.__cause__, ValueError)
    assert stats["nodes"]["check"]["failed"] == 8
    assert stats["nodes"]["double"]["failed"] == 0


async def test_deadlines_cancel_queued_calls_in_both_actors_of_a_ref_chain(probe: Any) -> None:
    def step(name: str) -> Any:
        def body(x: tuple[str, int]) -> tuple[str, int]:
            key, n = x
            ray.get(probe.add.remote(f"{name}-begun"))
            if key == f"hold-{name}":
                ray.get(probe.wait.remote(f"release-{name}"))
            ray.get(probe.add.remote(f"{name}-ran-{n}"))
            return x

        return df.map(body, name=name, placement="ray", options={**FREE, "max_in_flight": 2})

    graph = df.Graph("refs-deadline", step("a") >> step("b"))
    async with df.Engine(graph) as engine:
        for name, n in (("a", 0), ("b", 2)):
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.run, (f"hold-{name}", n))
                await get(probe.wait.remote(f"{name}-begun={n // 2 + 1}"))  # it holds the actor
                # The next item waits in that actor's queue until its deadline.
                with pytest.raises(TimeoutError):
                    await engine.run(("late", n + 1), timeout=0.3)
                await get(probe.set.remote(f"release-{name}"))
        assert await engine.run(("after", 9)) == ("after", 9)
        stats = engine.stats()
    # Item 1 was dropped in a's queue, item 3 (past a already) in b's queue.
    assert await get(probe.count.remote("a-ran-1")) == 0
    assert await get(probe.count.remote("a-ran-3")) == 1
    assert await get(probe.count.remote("b-ran-3")) == 0
    assert await get(probe.count.remote("b-ran-2")) == 1
    assert stats["requests"]["timed_out"] == 2


async def test_ray_outputs_come_back_as_values_where_a_loop_node_reads_them(
    ray_cluster: Any,
) -> None:
    def square(x: int) -> int:
        return x * x

    def plus_one(x: int) -> int:
        assert isinstance(x, int), f"got {x!r}"  # a value, never a RayRef
        return x + 1

    chain = df.map(square, placement="ray", options=FREE) >> df.map(plus_one)
    async with df.Engine(df.Graph("refs-edge", chain)) as engine:
        assert [y async for y in engine.map(range(5))] == [1, 2, 5, 10, 17]


# -- leaving a stream early, many times (issue 16) ------------------------------------------
async def test_leaving_streams_early_many_times_always_stops_the_actors_generator(
    probe: Any,
) -> None:
    def tokens(n: int) -> Iterator[int]:
        # Odd n: between tokens the body waits on a Ray call of its own (for the reader's
        # go-ahead, or for the reader to have left); even n: it runs free until
        # backpressure pauses it.
        i = 0
        error = None
        try:
            while True:
                yield i
                if n % 2:
                    ray.get(probe.wait_any.remote(f"go-{n}-{i}", f"left-{n}"))
                i += 1
        except BaseException as exc:  # what leaving the stream did to the body
            error = type(exc).__name__
            raise
        finally:
            # Cleanup that takes a moment and calls Ray.
            time.sleep(0.01)  # allowed: simulates cleanup work
            ray.get(probe.set.remote(f"closed-{n}", (i, error)))

    node = df.map(tokens, placement="ray", options={**FREE, "max_in_flight": 2})
    async with df.Engine(df.Graph("endless", node)) as engine:
        for n in range(24):
            stop_at = n % 4  # before, at and past the backpressure bound (2)
            async for token in engine.stream(n):
                if token == stop_at:
                    break
                if n % 2:
                    await get(probe.set.remote(f"go-{n}-{token}"))
            if n % 2:
                # The body is inside its own Ray call: it finishes, and the first yield
                # after the stop reached the actor ends the generator (as with thread
                # placement), never an exception raised inside the body (Ray's cancel
                # raised TaskCancelledError in that call, or KeyboardInterrupt).
                await get(probe.set.remote(f"left-{n}"))
            # Each generator stopped cleanly in the actor, its finally ran to the end.
            i, error = await get(probe.wait.remote(f"closed-{n}"), timeout=20)
            assert (i >= stop_at, error) == (True, "GeneratorExit"), n
        async for token in engine.stream(98):
            assert token == 0  # the actor is free: a new stream starts at once
            break


# -- batching over several lanes of one actor -----------------------------------------------
async def test_lanes_of_one_batched_actor_take_turns_collecting(ray_cluster: Any) -> None:
    def total(xs: list[int]) -> list[int]:
        return [x * 2 for x in xs]

    node = df.infer(
        total,
        name="total",
        placement="ray",
        batch=df.Batch(max_size=4, max_wait=5.0, collate="list"),
        options={**FREE, "max_in_flight": 2},  # one actor, two lanes
    )
    async with df.Engine(df.Graph("turns", node)) as engine, anyio.create_task_group() as tg:
        runner = engine._scheduler.runners["total"]  # type: ignore[union-attr]
        results: list[int] = []

        async def one(x: int) -> None:
            results.append(await engine.run(x))

        for i in range(4):
            tg.start_soon(one, i)
            # Items arrive one by one, each taken from the input before the next comes.
            while runner.inbox.stats.items < i + 1 or len(runner.inbox):
                await anyio.lowlevel.checkpoint()
    # One lane collected the whole batch (taking turns), so it was full at once; lanes
    # collecting side by side would each have waited max_wait for half a batch.
    assert sorted(results) == [0, 2, 4, 6]
    assert dict(runner.stats.batch_sizes) == {4: 1}


def test_a_call_failing_on_a_failed_handed_on_input_is_blamed_on_that_input(
    ray_cluster: Any,
) -> None:
    from dataflow.runtime._backend import Backend
    from dataflow.runtime.executors import UpstreamFailed
    from dataflow.runtime.executors._ray_actor import Raised
    from dataflow.runtime.executors._ray_handed import (
        Group,
        HandedCall,
        Places,
        Unreported,
        blame,
    )
    from dataflow.runtime.executors._ray_refs import RayRef

    @ray.remote(num_returns=2, num_cpus=0)
    def produce(how: str) -> tuple[list[Any], Any]:
        """A one-item call's status and output, as ``call_group`` returns them."""
        if how == "call":  # the whole call failed in Ray (as when its actor dies)
            raise ValueError("upstream call failed")
        if how == "item":  # the body raised for the item
            raised = Raised("up", ValueError("upstream body failed"))
            return [raised], raised
        if how == "skipped":  # its own input had failed: passed on, not run
            return [None], Raised("before", ValueError("earlier"))
        return [0.5], 1

    places = Places(Backend(), 4)  # (given back without waiters: the backend is unused)
    reports: list[Any] = []

    def handed(how: str) -> tuple[RayRef, HandedCall]:
        status, ref = produce.remote(how)
        ray.wait([status])
        value = RayRef(ref, "up")
        call = HandedCall(value, Group(status, places, 1), 0, Unreported(), lambda exc: exc)
        call._report = lambda outcome, at: reports.append(outcome)
        value.calls = (call,)
        return value, call

    own = RuntimeError("the call's own error")
    for how, message in (("item", "upstream body failed"), ("call", "upstream call failed")):
        reports.clear()
        bad, call = handed(how)
        with pytest.raises(UpstreamFailed, match="from node 'up'") as info:
            blame(own, [bad])
        assert info.value.__cause__ is own
        # The producer's call failed with its error, once, however often it is blamed.
        assert call.ended and len(reports) == 1 and message in str(reports[0]), how
        with pytest.raises(UpstreamFailed):
            blame(own, [5, bad])
        assert len(reports) == 1
    reports.clear()
    skipped, call = handed("skipped")
    blame(own, [skipped])  # not its failure: it did not run (blamed further upstream)
    assert call.ended and call.error is None and reports == [None]
    good, call = handed("ok")
    blame(own, [good, 5])  # good inputs: the error is the call's own
    assert call.ended and call.error is None
    blame(own, [RayRef(ref=None, node="up")])  # an input known good before it went on


# -- handed-on calls: their places, and what they report -----------------------------------
async def test_a_handed_on_node_keeps_at_most_max_in_flight_calls_in_its_actor(
    probe: Any,
) -> None:
    def ahead(x: int) -> int:
        ray.get(probe.add.remote("ahead-begun"))
        ray.get(probe.wait.remote("release"))  # the first call holds the actor
        return x

    def last(x: int) -> int:
        return x * 10

    first = df.map(ahead, name="ahead", placement="ray", options={**FREE, "max_in_flight": 2})
    graph = df.Graph("places", first >> df.map(last, name="last", placement="ray", options=FREE))
    async with df.Engine(graph) as engine:
        replica = engine._scheduler.runners["ahead"].replica_objs[0]  # type: ignore[union-attr]
        assert replica.hand_on  # its ref goes on as soon as its call is submitted
        places = replica._places
        async with anyio.create_task_group() as tg:
            results: list[int] = []

            async def one(x: int) -> None:
                results.append(await engine.run(x))

            for x in range(6):
                tg.start_soon(one, x)
            # One call runs (held), one waits in the actor's queue: both places are
            # taken, and the third item waits for one, watching the oldest call.
            await get(probe.wait.remote("ahead-begun=1"))
            with anyio.fail_after(30):
                while not places._waiters:
                    await anyio.lowlevel.checkpoint()
            assert places._free == 0
            assert sum(call.holds for call in places._held) == 2
            await get(probe.set.remote("release"))
    assert sorted(results) == [0, 10, 20, 30, 40, 50]
    assert places._free == 2  # every place given back
    assert await get(probe.count.remote("ahead-begun")) == 6


async def test_a_merge_waiting_for_more_parts_than_a_handed_on_node_has_places(
    ray_cluster: Any,
) -> None:
    def split(x: int) -> list[int]:
        return [x + i for i in range(5)]

    def relay(x: int) -> int:
        return x * 2

    def total(xs: list[int]) -> int:
        return sum(xs)

    # relay has one place and the merge needs all five of a request's parts before it
    # calls (and so sees relay's calls end): the parts it holds give their places back.
    graph = df.Graph(
        "more-parts",
        df.shard(split, placement="ray", options=FREE)
        >> df.map(relay, name="relay", placement="ray", options={**FREE, "max_in_flight": 1})
        >> df.merge(total, placement="ray", options=FREE),
    )
    async with df.Engine(graph) as engine:
        assert engine._scheduler.runners["relay"].replica_objs[0].hand_on  # type: ignore[union-attr]
        with anyio.fail_after(60):
            assert [y async for y in engine.map([0, 10])] == [20, 120]


async def test_a_handed_on_node_reports_its_bodys_time_not_the_chains(ray_cluster: Any) -> None:
    def quick(x: int) -> int:
        return x

    def slow(x: int) -> int:
        time.sleep(0.02)  # allowed: simulated work, the time being measured
        return x

    chain = df.map(quick, name="quick", placement="ray", options={**FREE, "max_in_flight": 4})
    chain = chain >> df.map(slow, name="slow", placement="ray", options=FREE)
    async with df.Engine(df.Graph("busy", chain)) as engine:
        assert [y async for y in engine.map(range(10))] == list(range(10))
        nodes = engine.stats()["nodes"]
    # quick's calls end long before the chain's end is seen; its busy time is what its
    # body took in the actor (reported in bulk, all of it by the time stats are read).
    assert nodes["slow"]["busy_s"][0] >= 10 * 0.02
    assert 0 < nodes["quick"]["busy_s"][0] < nodes["slow"]["busy_s"][0] / 10
    assert nodes["quick"]["succeeded"] == 10 and nodes["quick"]["failed"] == 0


async def test_a_handed_on_node_keeps_no_record_of_calls_that_gave_their_place_back(
    probe: Any,
) -> None:
    def then(x: int) -> int:
        if x == 0:  # the chain's end of item 0 is not seen for a long time
            ray.get(probe.wait.remote("release-then"))
        return x

    chain = df.map(lambda x: x, name="first", placement="ray", options={**FREE, "max_in_flight": 3})
    # Two actors, one lane each: item 0 holds one, the others go to the other.
    chain = chain >> df.map(
        then, name="then", placement="ray", replicas=2, options={**FREE, "max_in_flight": 1}
    )
    async with df.Engine(df.Graph("held", chain)) as engine:
        places = engine._scheduler.runners["first"].replica_objs[0]._places  # type: ignore[union-attr]
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.run, 0)
            with anyio.fail_after(30):
                while not places._held:
                    await anyio.lowlevel.checkpoint()
            # Dozens of calls behind item 0's, which keeps its place all along.
            for x in range(1, 40):
                with anyio.fail_after(30):
                    assert await engine.run(x) == x
            assert places._held[0].holds
            assert len(places._held) <= 2 * 3
            await get(probe.set.remote("release-then"))
