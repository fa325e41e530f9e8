"""Helpers for testing your own graphs the way dataflow tests its own.

* :func:`collect` runs a graph over inputs from synchronous test code and returns the
  results (one engine, shut down properly).
* :func:`check_contracts` drives a graph with concurrent requests, random early exits,
  cancellations and deadlines, on each backend, and asserts the engine's contracts:
  exactly one outcome per request, ``stats()`` balancing, no task, thread or file left
  behind after the engine closed, channels within their capacity. A broken contract
  raises :class:`ContractViolation` naming the contract, the backend and the seed.
* ``pytest_plugins = ["dataflow.testing_plugin"]`` adds an ``engine`` fixture (see
  ``docs/testing.md``).

Only the public API is used here: what this module checks is what users can rely on.
"""

from __future__ import annotations

import gc
import inspect
import os
import random
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from . import Engine, Graph

__all__ = ["ContractViolation", "Report", "check_contracts", "collect"]


class ContractViolation(AssertionError):
    """A graph broke one of the engine's contracts under :func:`check_contracts`.

    Attributes:
        contract: which contract (e.g. ``"no thread outlives the engine"``).
        seed: the seed that reproduces the run.
        backend: the backend it broke on.
    """

    def __init__(self, contract: str, detail: str, *, seed: int, backend: str, graph: str):
        super().__init__(
            f"graph {graph!r} broke the contract {contract!r} on {backend} (seed={seed}): "
            f"{detail}\nreproduce with check_contracts(..., seed={seed}, backends=({backend!r},))"
        )
        self.contract = contract
        self.seed = seed
        self.backend = backend


def _params_kw(method: Any, params: dict[str, Any]) -> dict[str, Any]:
    """``params=`` where the engine takes it (any parameter name is safe), else keywords."""
    declared = inspect.signature(method).parameters.get("params")
    if declared is not None and declared.kind is inspect.Parameter.KEYWORD_ONLY:
        return {"params": params}
    return params


def collect(graph: Graph, inputs: Iterable[Any], /, **params: Any) -> list[Any]:
    """Run ``graph`` over ``inputs`` and return one result per input, in input order.

    For a streaming graph each result is the list of that input's outputs. ``params`` are
    per-request parameters for every input. Runs its own event loop (asyncio), so call it
    from synchronous code; the engine is shut down before it returns.

    Raises what :meth:`Engine.run` raises for the first request that fails.
    """
    items = list(inputs)

    async def go() -> list[Any]:
        async with Engine(graph) as engine:
            results = [out async for out in engine.map(items, **_params_kw(engine.map, params))]
        return results

    return anyio.run(go)


@dataclass
class Report:
    """What :func:`check_contracts` did on one backend (returned, one per backend)."""

    backend: str
    requests: int = 0
    completed: int = 0
    failed: int = 0
    early_exits: int = 0
    cancelled: int = 0
    timed_out: int = 0
    stats: dict[str, Any] = field(default_factory=dict, repr=False)


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


def _fds() -> set[int]:
    try:
        return {int(fd) for fd in os.listdir("/proc/self/fd")}
    except OSError:  # not Linux: no file check
        return set()


def _tasks() -> set[Any]:
    """The tasks of the running loop (asyncio) or of the run's task tree (trio)."""
    import sniffio

    if sniffio.current_async_library() == "asyncio":
        import asyncio

        return set(asyncio.all_tasks())
    import trio

    found: set[Any] = set()
    root = trio.lowlevel.current_root_task()
    pending = [] if root is None else [root]
    while pending:
        task = pending.pop()
        found.add(task)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return found


def _name(x: Any) -> str:
    return getattr(x, "name", None) or getattr(x, "get_name", lambda: repr(x))()


async def _whole(engine: Any, x: Any, timeout: float | None, params: Any) -> None:
    """The request's whole outcome: every output of a stream, or the result."""
    if engine.plan.streaming:
        async for _ in engine.stream(x, timeout=timeout, **_params_kw(engine.stream, params)):
            pass
    else:
        await engine.run(x, timeout=timeout, **_params_kw(engine.run, params))


async def _one(engine: Any, x: Any, kind: str, rng: random.Random, r: Report, params: Any) -> None:
    """One request of the given kind; counts exactly one client-side outcome."""
    try:
        if kind == "deadline":
            await _whole(engine, x, rng.choice((0.0005, 0.002, 0.01, 0.05)), params)
        elif kind == "early_exit" and engine.plan.streaming:
            keep = rng.randint(0, 3)
            async with engine.stream(x, **_params_kw(engine.stream, params)) as stream:
                async for _ in stream:
                    if keep == 0:
                        break
                    keep -= 1
            r.early_exits += 1
            return
        elif kind in ("cancel", "early_exit"):
            with anyio.move_on_after(rng.choice((0.0, 0.001, 0.005, 0.02))) as scope:
                await _whole(engine, x, None, params)
            if scope.cancelled_caught:
                r.cancelled += 1
                return
        else:
            await _whole(engine, x, None, params)
    except TimeoutError:
        r.timed_out += 1
        return
    except Exception:
        r.failed += 1
        return
    r.completed += 1


async def _drive(
    graph: Graph,
    inputs: list[Any],
    rng: random.Random,
    r: Report,
    kinds: list[str],
    requests: int,
    concurrency: int,
    params: dict[str, Any],
    options: dict[str, Any],
    fail: Any,
) -> None:
    tasks_before = _tasks()
    engine = Engine(graph, **options)
    samples: list[dict[str, Any]] = []
    try:
        async with engine:
            tickets = iter(range(requests))

            async def client() -> None:
                for i in tickets:
                    r.requests += 1
                    kind = rng.choice(kinds)
                    await _one(engine, inputs[i % len(inputs)], kind, rng, r, params)
                    if i % 8 == 0:
                        samples.append(engine.stats())

            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(client)
            await anyio.lowlevel.checkpoint()
            r.stats = engine.stats()
    except Exception as exc:
        fail(
            "shutdown ends every body",
            f"leaving `async with Engine` raised {type(exc).__name__}: {exc} (a body "
            f"kept running after its request ended: does it swallow cancellation?)",
        )
    req = r.stats["requests"]
    ended = req["succeeded"] + req["failed"] + req["cancelled"]
    if req["in_flight"] != 0 or ended != req["submitted"]:
        fail("exactly one outcome per request", f"stats do not balance: {req}")
    # A request the caller left (early exit, cancel, deadline) may still have ended in the
    # engine as a success or a failure, racing the caller; nothing else is ambiguous.
    left_early = r.early_exits + r.cancelled + r.timed_out
    if (
        req["submitted"] > r.requests
        or not r.completed <= req["succeeded"] <= r.completed + left_early
        or req["failed"] > r.failed + left_early
        or req["timed_out"] > r.timed_out
    ):
        fail(
            "exactly one outcome per request",
            f"the caller saw {r.completed} results, {r.failed} failures, {r.timed_out} "
            f"deadlines and left {r.early_exits + r.cancelled} early out of {r.requests} "
            f"requests, but the engine counted {req}",
        )
    for snap in [*samples, r.stats]:
        for edge, figures in snap["edges"].items():
            if figures["max_depth"] > figures["capacity"]:
                fail(
                    "memory is bounded by capacities",
                    f"edge {edge!r} held {figures['max_depth']} items, capacity "
                    f"{figures['capacity']}",
                )
    for _ in range(100):  # tasks being cancelled get a moment to finish
        left = {t for t in _tasks() - tasks_before if not getattr(t, "done", lambda: False)()}
        if not left:
            break
        await anyio.sleep(0.01)
    if left:
        fail("no task outlives the engine", f"tasks still running: {sorted(map(_name, left))}")


async def _warm_up(graph: Graph, x: Any, params: dict[str, Any], options: dict[str, Any]) -> None:
    """One request through a first engine: what loads lazily once (a library's thread
    pool, a model file) is not mistaken for a leak of the measured run."""
    with anyio.move_on_after(options["grace"]):
        async with Engine(graph, **options) as engine:
            try:
                await engine.run(x, **_params_kw(engine.run, params))
            except Exception:
                pass


def check_contracts(
    graph: Graph,
    inputs: Iterable[Any],
    *,
    seed: int = 0,
    cancellations: bool = True,
    deadlines: bool = True,
    backends: Iterable[str] = ("asyncio", "trio"),
    requests: int = 64,
    concurrency: int = 8,
    params: dict[str, Any] | None = None,
    grace: float = 2.0,
    time_limit: float = 60.0,
    engine_options: dict[str, Any] | None = None,
) -> list[Report]:
    """Drive ``graph`` hard and assert the engine's contracts held; one report per backend.

    ``requests`` requests (inputs cycled), ``concurrency`` at a time; with
    ``cancellations`` some leave their stream early or are cancelled by the caller, with
    ``deadlines`` some get a short ``timeout``. The choices come from ``seed``: the same
    seed makes the same choices (timings still vary). After each run: every request had
    one outcome and ``stats()`` balances; no task, thread or open file descriptor that
    the run created is left; no edge ever held more than its capacity; the engine closed
    within ``grace`` seconds of its last request and the whole run within ``time_limit``
    (each backend's run has its own thread, so a body that never ends is reported, not
    waited for). ``engine_options`` go to ``Engine(graph, ...)`` (``max_in_flight``,
    ``stream_buffer``, ``inline``, ...).

    Raises:
        ContractViolation: a contract broke; the message names it, the backend and seed.
    """
    items = list(inputs)
    if not items:
        raise ValueError("check_contracts needs at least one input")
    options = {**(engine_options or {}), "grace": grace}
    kinds = ["complete", "complete"]
    if cancellations:
        kinds += ["early_exit", "cancel"]
    if deadlines:
        kinds += ["deadline"]
    reports = []
    for backend in backends:
        rng = random.Random(f"{seed}:{backend}")
        report = Report(backend)

        def fail(contract: str, detail: str, backend: str = backend) -> None:
            raise ContractViolation(contract, detail, seed=seed, backend=backend, graph=graph.name)

        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always", ResourceWarning)
            warm = _bounded(_warm_up, (graph, items[0], dict(params or {}), options), backend)
            warm.join(time_limit)  # what goes wrong here, the measured run reports
            if warm.is_alive():
                _stuck(fail, time_limit, grace)
            gc.collect()
        threads, fds = _threads(), _fds()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            args = (graph, items, rng, report, kinds, requests, max(1, concurrency))
            runner = _bounded(_drive, (*args, dict(params or {}), options, fail), backend)
            runner.join(time_limit)
            if runner.is_alive():
                _stuck(fail, time_limit, grace)
            if runner.error is not None:
                raise runner.error
            gc.collect()
        threads |= {warm, runner}
        _check_leftovers(threads, fds, caught, fail)
        reports.append(report)
    return reports


def _stuck(fail: Any, time_limit: float, grace: float) -> None:
    fail(
        "shutdown ends every body",
        f"the run had not ended {time_limit} s after it started (its engine closes within "
        f"grace={grace} s of its last request): a body is still running after its request "
        "ended — does it swallow cancellation?",
    )


class _Runner(threading.Thread):
    error: BaseException | None = None


def _bounded(fn: Any, args: tuple[Any, ...], backend: str) -> _Runner:
    """``anyio.run(fn, *args)`` started in a thread of its own (see :func:`check_contracts`)."""

    def target() -> None:
        try:
            anyio.run(fn, *args, backend=backend)
        except BaseException as exc:
            runner.error = exc

    runner = _Runner(target=target, name=f"dataflow-check-contracts-{backend}", daemon=True)
    runner.start()
    return runner


def _check_leftovers(
    threads: set[threading.Thread], fds: set[int], caught: list[Any], fail: Any
) -> None:
    # Threads a backend keeps for reuse (trio's thread cache, anyio's worker pool) are
    # its own, not the graph's; every other new thread must be gone, after a short wait.
    deadline = time.monotonic() + 1.0
    while True:
        new = {
            t
            for t in _threads() - threads
            if not t.name.startswith(("Trio thread", "AnyIO worker thread", "asyncio_"))
        }
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.01)  # polling for threads that are just ending
    if new:
        names = ", ".join(sorted(repr(t.name) for t in new))
        fail(
            "no thread outlives the engine",
            f"thread(s) {names} still running after the engine closed (started by a node "
            "or its setup() and never joined in teardown()?)",
        )
    leaked = _fds() - fds
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    if leaked or unclosed:
        what = unclosed[0] if unclosed else f"file descriptors {sorted(leaked)} still open"
        fail(
            "teardown() releases what setup() acquired",
            f"{what} after the engine closed (opened by a node or its setup() and never "
            "closed in teardown()?)",
        )
