"""Adversarial scenarios: random graphs, random callers, random faults (issue 10's proof).

Each scenario builds a small graph (loop and thread placement, generator bodies, dynamic
batches, a ``generate`` node, shard/merge), runs a random mix of ``run``/``stream``/
``map`` callers against it — deadlines, caller cancellation, early exits, slow and
stopped readers, faulty bodies — and then checks the engine's promises:

* every request has exactly one outcome, seen by exactly one caller;
* the engine's counters balance and nothing is left in flight;
* a loop body serving a request is gone within 50 ms of that request's end;
* items inside the graph and outputs buffered per stream stay within the bound in
  ``docs/contracts.md``; a request owns a bounded number of pieces of work;
* no task or thread outlives the engine, and exit is prompt.

The seed of each scenario is printed when it fails (``DATAFLOW_ADVERSARIAL_SEED`` reruns
one; ``DATAFLOW_ADVERSARIAL_SCENARIOS`` sets how many per backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
import sniffio
import torch

import dataflow as df

pytestmark = pytest.mark.anyio

SCENARIOS = int(os.environ.get("DATAFLOW_ADVERSARIAL_SCENARIOS", "400"))
FREE_WITHIN = 0.05  # a loop body ends this long after its request at the latest
EXIT_WITHIN = 2.0  # leaving ``async with`` once every caller is done


class Fault(Exception):
    """A body failing on purpose."""


@dataclass
class Probe:
    """What the bodies of one scenario saw."""

    seed: int
    fault_every: int
    engine: df.Engine | None = None
    # input -> perf_counter when a loop body for it last returned or was cancelled
    body_end: dict[int, float] = field(default_factory=dict)
    active: dict[int, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    # inputs whose loop bodies never return by themselves (their caller has a deadline
    # or cancels): only the request's end can stop them
    hang: set[int] = field(default_factory=set)
    never: anyio.Event = field(default_factory=anyio.Event)

    def check_bounds(self) -> None:
        engine = self.engine
        if engine is None or engine._scheduler is None:
            return
        bound = engine._scheduler.holding_capacity() + 64  # + merge parts (≤ 4 per request)
        inside = engine.items_inside()
        if inside > bound:
            self.violations.append(f"{inside} items inside > bound {bound}")
        for req in list(engine._live.values()):
            if req.streaming and len(req.outputs) > req.buffer_limit:
                self.violations.append(f"request {req.id} buffers {len(req.outputs)} outputs")
            if req.owned_count() > 16:
                self.violations.append(f"request {req.id} owns {req.owned_count()} things")

    def choice(self, x: Any, options: tuple[float, ...]) -> float:
        """A choice fixed by the seed and the input (bodies stay reproducible)."""
        return options[hash((self.seed, x)) % len(options)]

    def key(self, x: Any) -> int:
        return int(x) if isinstance(x, int) else -1

    async def work(self, x: Any) -> None:
        """A tiny body's work: maybe wait a little, maybe fail."""
        self.check_bounds()
        if isinstance(x, int) and x in self.hang:
            await self.never.wait()
        delay = self.choice(x, (0, 0, 0, 0.0005, 0.002, 0.01))
        if delay:
            await anyio.sleep(delay)  # allowed: simulates work
        else:
            await anyio.lowlevel.checkpoint()
        if self.fault_every and isinstance(x, int) and x % self.fault_every == 0:
            raise Fault(f"fault on {x}")

    def enter(self, x: Any) -> None:
        k = self.key(x)
        self.active[k] = self.active.get(k, 0) + 1

    def leave(self, x: Any) -> None:
        k = self.key(x)
        self.active[k] -= 1
        self.body_end[k] = time.perf_counter()


# -- bodies ------------------------------------------------------------------------------
def loop_fn(probe: Probe) -> Any:
    async def body(x: int) -> int:
        probe.enter(x)
        try:
            await probe.work(x)
            return x
        finally:
            probe.leave(x)

    return body


def loop_gen(probe: Probe, n: int) -> Any:
    async def body(x: int) -> AsyncIterator[int]:
        probe.enter(x)
        try:
            for i in range(n):
                await probe.work(x)
                yield x * 100 + i
        finally:
            probe.leave(x)

    return body


def thread_fn(probe: Probe) -> Any:
    def body(x: int) -> int:
        if probe.choice(x, (0, 0, 1)):
            time.sleep(0.002)  # allowed: simulates work
        if probe.fault_every and isinstance(x, int) and x % probe.fault_every == 0:
            raise Fault(f"fault on {x}")
        return x

    return body


def thread_gen(n: int) -> Any:
    def body(x: int) -> Iterator[int]:
        for i in range(n):
            yield x * 100 + i

    return body


def batch_fn(values: list[int]) -> list[int]:
    if any(v % 13 == 7 for v in values):
        raise Fault("a poisoned item in the batch")
    return [v + 1 for v in values]


class TinyLM:
    """A step model: the next token is the last one plus one, over 32 tokens."""

    def __init__(self, max_batch: int) -> None:
        self.last: dict[int, int] = {}

    def _logits(self, token: int) -> torch.Tensor:
        out = torch.zeros(32)
        out[(token + 1) % 32] = 5.0
        return out

    def prefill(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        self.last[slot] = prompt[-1]
        return self._logits(prompt[-1])

    def step(self, slots: Sequence[int], last: Sequence[int]) -> torch.Tensor:
        return torch.stack([self._logits(t) for t in last])

    def free(self, slot: int) -> None:
        self.last.pop(slot, None)


# -- graphs ------------------------------------------------------------------------------
def build(rng: random.Random, probe: Probe) -> tuple[str, df.Graph, bool]:
    """A random small graph; returns (kind, graph, loop bodies to time)."""
    kind = rng.choice(("loop", "thread", "loop_gen", "thread_gen", "batch", "shard", "generate"))
    cap = rng.choice((1, 2, 4))
    reps = rng.choice((1, 1, 2))
    ordered = rng.random() < 0.5
    first = df.map(lambda x: x, name="first", capacity=cap)
    if kind == "loop":
        body = df.map(loop_fn(probe), name="body", capacity=cap, replicas=reps, ordered=ordered)
        return kind, df.Graph("adv", first >> body), True
    if kind == "thread":
        body = df.infer(
            thread_fn(probe), name="body", placement="thread", capacity=cap, replicas=reps
        )
        return kind, df.Graph("adv", first >> body >> df.map(loop_fn(probe), name="after")), True
    if kind == "loop_gen":
        gen = df.map(
            loop_gen(probe, rng.randint(1, 6)),
            name="gen",
            capacity=cap,
            replicas=reps,
            ordered=ordered,
        )
        tail = [df.map(lambda x: x, name="tail")] if rng.random() < 0.5 else []
        chain = first >> gen
        for node in tail:
            chain = chain >> node
        return kind, df.Graph("adv", chain), True
    if kind == "thread_gen":
        gen = df.map(thread_gen(rng.randint(1, 6)), name="gen", placement="thread", capacity=cap)
        return kind, df.Graph("adv", first >> gen), False
    if kind == "batch":
        batched = df.map(
            batch_fn,
            name="batched",
            capacity=cap,
            replicas=reps,
            batch=df.Batch(max_size=rng.choice((2, 4)), max_wait=0.002, collate="list"),
        )
        return kind, df.Graph("adv", first >> batched), False
    if kind == "shard":
        k = rng.randint(1, 4)
        shard = df.shard(lambda x: [x] * k, name="split")
        inner = df.map(loop_fn(probe), name="inner", capacity=cap, replicas=reps)
        merge = df.merge(lambda parts: parts[0], name="join")
        return kind, df.Graph("adv", first >> shard >> inner >> merge), True
    tokens = df.map(lambda x: [x % 32], name="tokens")
    gen = df.generate(
        TinyLM,
        name="lm",
        max_batch=rng.choice((1, 2, 4)),
        max_new_tokens=rng.randint(1, 6),
        temperature=0.0,
        placement=rng.choice(("loop", "thread")),
    )
    return kind, df.Graph("adv", tokens >> gen), False


# -- callers -----------------------------------------------------------------------------
@dataclass
class Outcome:
    x: int
    how: str  # "ok", "error", "timeout", "cancelled", "closed", "left"
    ended: float


async def caller(
    engine: df.Engine, rng: random.Random, x: int, outcomes: list[Outcome], probe: Probe
) -> None:
    mode = rng.choice(("run", "run", "stream", "stream", "map"))
    timeout = rng.choice((None, None, 0.001, 0.005, 0.03))
    cancel_after = rng.choice((None, None, None, 0.002, 0.02))
    if (timeout is not None or cancel_after is not None) and mode != "map" and rng.random() < 0.4:
        probe.hang.add(x)
    how = "ok"
    try:
        with anyio.CancelScope() as scope:
            if cancel_after is not None:
                scope.deadline = anyio.current_time() + cancel_after
            if mode == "run":
                await engine.run(x, timeout=timeout)
            elif mode == "stream":
                stop_at = rng.choice((None, None, 0, 1, 2))
                slow = rng.random() < 0.3
                async with engine.stream(x, timeout=timeout) as stream:
                    n = 0
                    async for _ in stream:
                        n += 1
                        if slow:
                            await anyio.sleep(0.002)  # allowed: simulates a slow reader
                        if stop_at is not None and n > stop_at:
                            how = "left"
                            break
            else:
                xs = [x * 1000 + i for i in range(rng.randint(1, 4))]
                async for _ in engine.map(
                    xs, timeout=timeout, ordered=rng.random() < 0.5, return_exceptions=True
                ):
                    pass
        if scope.cancelled_caught:
            how = "cancelled"
    except TimeoutError:
        how = "timeout"
    except df.EngineClosed:
        how = "closed"
    except df.DataflowError:
        how = "error"
    outcomes.append(Outcome(x, how, time.perf_counter()))


# -- one scenario ------------------------------------------------------------------------
async def scenario(seed: int) -> None:
    rng = random.Random(seed)
    probe = Probe(seed, fault_every=rng.choice((0, 0, 5, 7)))
    kind, graph, timed = build(rng, probe)
    threads_before = _threads()
    tasks_before = _tasks()
    engine = df.Engine(
        graph,
        max_in_flight=rng.choice((None, None, 2, 4)),
        stream_buffer=rng.choice((1, 2, 4)),
        inline=rng.random() < 0.7,
        shutdown=rng.choice(("drain", "drain", "cancel")),
        grace=EXIT_WITHIN,
    )
    probe.engine = engine
    outcomes: list[Outcome] = []
    callers = rng.randint(1, 8)
    with _dump_on_timeout(engine), anyio.fail_after(20):
        async with engine:
            async with anyio.create_task_group() as tg:
                for i in range(callers):
                    tg.start_soon(caller, engine, rng, 1 + i, outcomes, probe)
                    if rng.random() < 0.5:
                        await anyio.lowlevel.checkpoint()
            all_done = time.perf_counter()
            # Requests still running here are map requests cancelled with their caller.
            exit_start = time.perf_counter()
        exit_took = time.perf_counter() - exit_start

    where = f"seed {seed} ({kind}, {sniffio.current_async_library()})"
    assert len(outcomes) == callers, where
    assert len({o.x for o in outcomes}) == callers, where
    counters = engine.counters
    assert counters.in_flight == 0, (where, counters.as_dict())
    assert counters.submitted == counters.succeeded + counters.failed + counters.cancelled, where
    stats = engine.stats()["requests"]
    assert stats["in_flight"] == 0, (where, stats)
    assert not probe.violations, (where, probe.violations[:3])
    if timed:
        # A loop body for a caller's input ended within FREE_WITHIN of that caller's end.
        for o in outcomes:
            end = probe.body_end.get(o.x)
            assert probe.active.get(o.x, 0) == 0, (where, "body still running", o)
            if end is not None and o.how in ("timeout", "cancelled", "left", "error"):
                assert end - o.ended <= FREE_WITHIN, (where, o, end - o.ended)
    assert exit_took <= EXIT_WITHIN, (where, exit_took)
    assert all_done <= exit_start
    assert _threads() == threads_before, (where, threading.enumerate())
    assert _tasks() <= tasks_before, where


@contextlib.contextmanager
def _dump_on_timeout(engine: df.Engine) -> Iterator[None]:
    """Print where a scenario got stuck."""
    try:
        yield
    except TimeoutError:
        print("stuck:", engine.state, engine.counters.as_dict(), "admitted", engine._admitted)
        for req in engine._live.values():
            print(
                "  live", req, req.streaming, req.outstanding, len(req.outputs), req.owned_count()
            )
        if engine._scheduler is not None:
            for name, runner in engine._scheduler.runners.items():
                print("  node", name, len(runner.inbox), runner.parked, runner._borrowed)
        if sniffio.current_async_library() == "asyncio":
            for task in asyncio.all_tasks():
                task.print_stack(limit=6)
        raise


def _threads() -> int:
    """The engine's own threads (not the event loop's thread cache)."""
    return sum(t.name.startswith("dataflow") for t in threading.enumerate())


def _tasks() -> int:
    if sniffio.current_async_library() == "asyncio":
        return len(asyncio.all_tasks())
    return 0


def _seeds() -> list[int]:
    fixed = os.environ.get("DATAFLOW_ADVERSARIAL_SEED")
    if fixed:
        return [int(fixed)]
    base = random.SystemRandom().randrange(1 << 30)
    return [base + i for i in range(SCENARIOS)]


async def test_adversarial_scenarios(anyio_backend: str) -> None:
    seeds = _seeds()
    started = time.perf_counter()
    for seed in seeds:
        try:
            await scenario(seed)
        except BaseException:
            print(f"adversarial scenario failed: DATAFLOW_ADVERSARIAL_SEED={seed}")
            raise
    print(f"{len(seeds)} scenarios on {anyio_backend} in {time.perf_counter() - started:.1f}s")
