"""Ray placement: items queued at a Ray node share actor calls (runtime/_coalesce).

Shares the session's Ray cluster and the :class:`Probe` with test_ray.py.
"""

from __future__ import annotations

from collections import deque
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


def runner(engine: df.Engine, name: str) -> Any:
    return engine._scheduler.runners[name]  # type: ignore[union-attr]


async def until(done: Any) -> None:
    """Let the other tasks run until ``done()``."""
    while not done():
        await anyio.lowlevel.checkpoint()


async def warmed(engine: df.Engine, inputs: list[Any]) -> None:
    """Run ``inputs`` and report their times: a node shares calls only once it knows
    how long its body takes."""
    assert len([y async for y in engine.map(inputs)]) == len(inputs)
    engine.stats()  # fetches the busy times still to be reported


async def queue_behind_a_held_call(
    engine: df.Engine, probe: Any, first: str, inputs: list[Any], tg: Any
) -> list[Any]:
    """Start ``engine.run(x)`` for each of ``inputs`` while node ``first``'s only place
    is held by a call waiting for the probe's ``release``; returns once they all queue
    at ``first`` (or as many as its input holds), their results to come in the
    returned list (in input order)."""
    results: list[Any] = [None] * len(inputs)
    head = runner(engine, first)
    taken = head.inbox.stats.items  # the node's input counts what it took

    async def one(i: int, x: Any) -> None:
        try:
            results[i] = await engine.run(x)
        except df.NodeError as exc:
            results[i] = exc

    tg.start_soon(one, 0, inputs[0])
    await get(probe.wait.remote("held"))  # the first is in the actor, holding its place
    for i, x in enumerate(inputs[1:], 1):
        tg.start_soon(one, i, x)
    # Some are taken (they wait for a place); the others wait in the node's input,
    # until it is full (the rest wait to be sent).
    inbox = head.inbox
    await until(
        lambda: (
            len(inbox) == inbox.capacity or inbox.stats.items - taken + len(inbox) >= len(inputs)
        )
    )
    return results


def held(probe: Any, body: Any, key: str = "hold", prefix: str = "") -> Any:
    """``body``, except that the input ``key`` waits in the actor for the probe (it sets
    ``prefix + "held"`` and waits for ``prefix + "release"``), then gives -1."""

    def f(x: Any) -> Any:
        if x == key:
            ray.get(probe.set.remote(prefix + "held"))
            ray.get(probe.wait.remote(prefix + "release"))
            return -1
        return body(x)

    f.__name__ = body.__name__
    return f


async def test_items_waiting_at_a_ray_chain_share_calls_and_fail_alone(probe: Any) -> None:
    def first(x: int) -> int:
        if x % 3 == 0:
            raise ValueError(f"no multiples of 3: {x}")
        return x

    def second(x: int) -> int:
        assert isinstance(x, int), f"got {x!r}"  # a failed item never reaches the body
        return x + 1

    def last(x: int) -> int:
        return x * 10

    opts = {**FREE, "max_in_flight": 1}
    chain = (
        df.map(held(probe, first), name="first", placement="ray", options=opts)
        >> df.map(second, name="second", placement="ray", options=opts)
        >> df.map(last, name="last", placement="ray", options=opts)
    )
    async with df.Engine(df.Graph("shared", chain)) as engine:
        await warmed(engine, [1, 2, 4, 5])
        inputs: list[Any] = ["hold", *range(1, 31)]
        async with anyio.create_task_group() as tg:
            results = await queue_behind_a_held_call(engine, probe, "first", inputs, tg)
            await get(probe.set.remote("release"))
        for x, result in zip(inputs[1:], results[1:], strict=True):
            if x % 3:
                assert result == (x + 1) * 10, x
            else:  # failed where it raised, alone, with the body's own error
                assert isinstance(result, df.NodeError) and result.node == "first", x
                assert isinstance(result.__cause__, ValueError), x
        # The 16 items waiting in first's input when the held call ended went in one
        # call (at most 16 each), the rest shared too; so on through the chain, failed
        # items included (how the next nodes' calls split depends on timing).
        shared = {
            name: {k: n for k, n in runner(engine, name).stats.batch_sizes.items() if k > 1}
            for name in ("first", "second", "last")
        }
        assert max(shared["first"]) == 16
        assert sum(k * n for k, n in shared["first"].items()) == 29
        assert shared["second"] and shared["last"]
        stats = engine.stats()["nodes"]
        assert stats["first"]["failed"] == 10 and stats["second"]["failed"] == 0
        assert stats["last"]["failed"] == 0


async def test_one_request_ending_does_not_cancel_a_call_another_one_shares(
    probe: Any,
) -> None:
    def echo(x: Any) -> Any:
        return x

    # Two lanes: one waits for the held call, the other takes b and c together.
    opts = {**FREE, "max_in_flight": 2}
    node = df.map(held(probe, echo), name="echo", placement="ray", options=opts)
    async with df.Engine(df.Graph("cancel-one", node)) as engine:
        await warmed(engine, [1, 2])
        taken = runner(engine, "echo").inbox.stats.items
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def one(x: Any, deadline: float | None = None) -> None:
                try:
                    results.append(await engine.run(x, timeout=deadline))
                except TimeoutError:
                    results.append("timed out")

            tg.start_soon(one, "hold")
            await get(probe.wait.remote("held"))
            tg.start_soon(one, "b", 0.2)  # it ends while its call waits in the actor
            tg.start_soon(one, "c")
            echo_runner = runner(engine, "echo")
            # b and c were taken, in one call
            await until(
                lambda: echo_runner.inbox.stats.items >= taken + 3 and not echo_runner.inbox
            )
            await until(lambda: "timed out" in results)
            await get(probe.set.remote("release"))
        assert sorted(map(str, results)) == ["-1", "c", "timed out"]
        assert runner(engine, "echo").stats.batch_sizes[2] == 1


def test_a_handed_on_call_is_cancelled_once_none_of_its_requests_wants_it(
    ray_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataflow.runtime import _request
    from dataflow.runtime._backend import Backend
    from dataflow.runtime.executors import _ray_handed
    from dataflow.runtime.executors._ray_handed import Group, HandedCall, Places, Unreported
    from dataflow.runtime.executors._ray_refs import RayRef

    cancelled: list[Any] = []
    monkeypatch.setattr(_ray_handed, "cancel", cancelled.append)
    backend = Backend()
    status = object()  # never looked at: the call only gets cancelled, or not
    group = Group(status, Places(backend, 1), 2)
    requests = [_request.Request(i, backend, {}, lambda req: None) for i in range(2)]
    for slot, req in enumerate(requests):
        call = HandedCall(RayRef(None, "n"), group, slot, Unreported(), lambda exc: exc)
        call.adopt(req, lambda outcome, at: None)
    requests[0].finish(_request.FAILED, RuntimeError("cancelled"))
    assert cancelled == []  # the other request still wants the call's other output
    assert group.holds  # ... and the call its place
    requests[1].finish(_request.FAILED, RuntimeError("cancelled"))
    assert cancelled == [status] and not group.holds


def test_a_slow_body_goes_one_item_per_call() -> None:
    from dataflow.runtime._coalesce import group_limit

    class Runner:
        def __init__(self, *times: float) -> None:
            self.stats = type("S", (), {"service": deque(times)})()

    assert group_limit(Runner(), 16) == 1  # nothing known yet
    assert group_limit(Runner(1e-6), 16) == 16  # a quick body: as many as allowed
    assert group_limit(Runner(1e-6), 1) == 1  # coalesce=1
    assert group_limit(Runner(0.0005), 16) == 4  # ~2 ms of body per call
    assert group_limit(Runner(0.05), 16) == 1  # a slow body: one per call
    assert group_limit(Runner(*[1e-6] * 7, 0.05), 16) == 1  # a slow one of the last few
    assert group_limit(Runner(0.05, *[1e-6] * 8), 16) == 16  # ... but not an old one


def test_a_take_leaves_a_trailing_part_of_an_upstream_call_for_the_next() -> None:
    from types import SimpleNamespace

    from dataflow.runtime._backend import Backend
    from dataflow.runtime._channel import Channel
    from dataflow.runtime._coalesce import aligned

    a, b = object(), object()  # two upstream calls, of 3 and 4 items

    class Replica:
        def group_key(self, value: Any) -> Any:
            return value[0]

        def group_size(self, key: Any) -> int:
            return {id(a): 3, id(b): 4}[id(key)]

    inbox: Channel[Any] = Channel(Backend(), 16)
    runner = SimpleNamespace(replica_objs=[Replica()], inbox=inbox)

    def items(*values: Any) -> list[Any]:
        return [SimpleNamespace(value=v) for v in values]

    def aligned_values(*values: Any) -> list[Any]:
        return [it.value for it in aligned(runner, 0, items(*values))]  # type: ignore[arg-type]

    a3 = [(a, i) for i in range(3)]
    inbox.put_nowait("next")
    # b's first two follow a's items: they go back in front, for the next take.
    assert aligned_values(*a3, (b, 0), (b, 1)) == a3
    assert [getattr(it, "value", it) for it in inbox.take(16)] == [(b, 0), (b, 1), "next"]
    # A take of one call's items alone goes as it is, as does one ending in all of a call.
    assert aligned_values((b, 2), (b, 3)) == [(b, 2), (b, 3)]
    assert aligned_values((a, 2), *[(b, i) for i in range(4)]) == [(a, 2)] + [
        (b, i) for i in range(4)
    ]
    assert aligned_values((b, 0), *a3) == [(b, 0), *a3]
    assert aligned_values(*a3, (None, 0)) == [*a3, (None, 0)]  # a value known good
    assert not inbox.take(16)


async def test_calls_downstream_line_up_with_the_calls_upstream(probe: Any) -> None:
    def echo(x: Any) -> Any:
        return x

    opts = {**FREE, "max_in_flight": 1}
    chain = (
        df.map(held(probe, echo, "h1", "h1 "), name="first", placement="ray", options=opts)
        >> df.map(echo, name="second", placement="ray", options=opts)
        >> df.map(held(probe, echo, "h3", "h3 "), name="third", placement="ray", options=opts)
    )
    async with df.Engine(df.Graph("lined-up", chain)) as engine:
        await warmed(engine, list(range(20)))
        first, second, third = (runner(engine, n) for n in ("first", "second", "third"))
        assert second.inbox.capacity == 16  # (what follows needs less than 3 + 16)
        taken = second.inbox.stats.items
        results: dict[Any, Any] = {}

        async def one(x: Any) -> None:
            results[x] = await engine.run(x)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "h3")  # third's only lane waits for it in the actor...
            await get(probe.wait.remote("h3 held"))
            for q in range(100, 117):  # ... 16 more fill its input, the 17th (116) is
                tg.start_soon(one, q)  # computed by second, which waits to send it on
            await until(lambda: second.inbox.stats.items - taken == 18)
            tg.start_soon(one, "y")  # so second takes nothing more for now
            await until(lambda: len(second.inbox) == 1)
            tg.start_soon(one, "h1")  # first's only place held: 17 items queue there
            await get(probe.wait.remote("h1 held"))
            for z in range(17):
                tg.start_soon(one, z)
            await until(lambda: len(first.inbox) == 16)  # (the 17th waits for a place)
            await get(probe.set.remote("h1 release"))
            # first sends -1 and 0 alone, then 1..16 from one call: 13 of them fill
            # second's input (after y, -1 and 0), 3 wait to be sent.
            await until(lambda: len(second.inbox) == second.inbox.capacity)
            before = dict(second.stats.batch_sizes)
            await get(probe.set.remote("h3 release"))
        assert results == {
            "h3": -1,
            "y": "y",
            "h1": -1,
            **{x: x for x in [*range(100, 117), *range(17)]},
        }
        shared = {
            k: n - before.get(k, 0)
            for k, n in second.stats.batch_sizes.items()
            if k > 1 and n > before.get(k, 0)
        }
        # second's take of y, -1, 0 and 13 of first's call left the 13 for the next
        # take, which found the other 3 too: one call of 16, as upstream (not 13 + 3).
        assert shared == {16: 1}, shared
        assert first.stats.batch_sizes[16] >= 1
        assert not third.stats.failed


async def test_coalesce_1_sends_every_item_in_a_call_of_its_own(probe: Any) -> None:
    def echo(x: Any) -> Any:
        return x

    opts = {**FREE, "max_in_flight": 1, "coalesce": 1}
    node = df.map(held(probe, echo), name="echo", placement="ray", options=opts)
    async with df.Engine(df.Graph("one-per-call", node)) as engine:
        await warmed(engine, [1, 2])
        async with anyio.create_task_group() as tg:
            results = await queue_behind_a_held_call(engine, probe, "echo", ["hold", 1, 2, 3], tg)
            await get(probe.set.remote("release"))
        assert results == [-1, 1, 2, 3]
        assert not runner(engine, "echo").stats.batch_sizes  # no call carried several
