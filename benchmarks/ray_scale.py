"""Ray placement: what the engine adds on top of Ray, and how it scales with actors.

In one run, on one local Ray instance (2 CPUs, no dashboard):

1. Per-item cost per hop of a 3-stage pass-through chain of ray-placed nodes, against a
   plain Ray actor chain (ObjectRefs passed actor to actor) and a Ray Compiled Graph of
   the same shape; each as latency (one item at a time) and throughput (many in flight);
   dataflow both with actor calls (refs passed actor to actor; items waiting at a node
   share calls, ``coalesce``) and with ``options={"compiled": True}``, and once with
   ``coalesce=1`` (every item in a call of its own). Both Ray chains also run driven
   from asyncio (each result awaited on the loop, as an engine on a loop has to): the
   floor under anything asyncio-based. Each figure is the median of ``--repeats`` runs,
   all in the same process, every chain run once per repeat in turn (so the machine's
   noise falls on all alike), each timed once the machine is quiet after its set-up
   (Ray starts worker processes for new actors: ``settle``), and the ratios
   (dataflow / Ray) go under keys containing ``ratio``: dataflow's best
   ``max_in_flight`` against the plain chain (which keeps every item in flight at
   once), compiled dataflow against the Compiled Graph, and both against Ray awaited
   on asyncio (``..._awaited_on_asyncio``).
2. Throughput of a CPU-bound node with 1 and with 2 actors (``num_cpus=1`` each).

Prints tables and writes benchmarks/results/ray_scale.json.

    python benchmarks/ray_scale.py [--items N] [--latency-items N] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio
import ray
from _common import settle, table, write_result

import dataflow as df

STAGES = 3
IN_FLIGHT = (1, 4, 16, 64)  # max_in_flight settings of dataflow's actor-call chains
WINDOW = IN_FLIGHT[-1]  # ... the largest, also given to a plain chain, for comparison
ONE_PER_CALL = "dataflow asyncio, coalesce=1, max_in_flight"
AWAITED_PLAIN = f"plain actor chain awaited on asyncio, {WINDOW} in flight"
AWAITED_COMPILED = "compiled graph awaited on asyncio (4 in flight)"
FREE = {"num_cpus": 0}  # the overhead chains reserve no CPU: only the scaling part does


def passthrough(x: Any) -> Any:
    return x


class Stage:
    def f(self, x: Any) -> Any:
        return x


def burn(n: int) -> int:
    """CPU-bound work that holds the GIL (pure Python), n iterations."""
    acc = 0
    for i in range(n):
        acc = (acc + i * i) % 1_000_003
    return acc


# -- 1. overhead ---------------------------------------------------------------------------
def chain_graph(
    max_in_flight: int, compiled: bool = False, coalesce: int | None = None
) -> df.Graph:
    opts: dict[str, Any] = {**FREE, "max_in_flight": max_in_flight, "compiled": compiled}
    if coalesce is not None:  # else the option's default
        opts["coalesce"] = coalesce
    nodes = [
        df.map(passthrough, name=f"s{i}", placement="ray", options=opts) for i in range(STAGES)
    ]
    return df.Graph("ray-chain", nodes[0] >> nodes[1] >> nodes[2])


async def engine_chain(
    items: int,
    latency_items: int,
    max_in_flight: int,
    compiled: bool = False,
    coalesce: int | None = None,
) -> tuple[float, float]:
    """(latency s/item, throughput s/item) of the engine over ray-placed nodes."""
    async with df.Engine(chain_graph(max_in_flight, compiled, coalesce)) as engine:
        await engine.run(0)  # warm: actors up, code paths hot
        await anyio.to_thread.run_sync(settle)  # Ray's worker processes started
        start = time.perf_counter()
        for i in range(latency_items):
            await engine.run(i)
        latency = (time.perf_counter() - start) / latency_items
        start = time.perf_counter()
        n = 0
        async for _ in engine.map(range(items)):
            n += 1
        assert n == items
        throughput = (time.perf_counter() - start) / items
    return latency, throughput


def actor_chain() -> tuple[list[Any], Callable[[Any], Any]]:
    """Plain actors, one per stage, and ``submit(x)``: the last stage's ref for ``x``,
    each stage's ref handed to the next."""
    actors = [ray.remote(num_cpus=0)(Stage).remote() for _ in range(STAGES)]

    def submit(x: Any) -> Any:
        ref = x
        for actor in actors:
            ref = actor.f.remote(ref)
        return ref

    return actors, submit


def plain_chain(items: int, latency_items: int, window: int | None = None) -> tuple[float, float]:
    """The same with plain actors, each stage's ref handed to the next: every item
    submitted at once (``window`` None), or at most ``window`` items in flight, as a
    program that bounds its memory would (and as the engine does)."""
    actors, submit = actor_chain()
    ray.get(submit(0))
    settle()
    start = time.perf_counter()
    for i in range(latency_items):
        ray.get(submit(i))
    latency = (time.perf_counter() - start) / latency_items
    start = time.perf_counter()
    if window is None:
        ray.get([submit(i) for i in range(items)])
    else:
        pending: list[Any] = []
        for i in range(items):
            if len(pending) == window:
                ray.get(pending.pop(0))
            pending.append(submit(i))
        ray.get(pending)
    throughput = (time.perf_counter() - start) / items
    for actor in actors:
        ray.kill(actor)
    return latency, throughput


async def plain_chain_awaited(items: int, latency_items: int) -> tuple[float, float]:
    """The plain chain as an asyncio program drives it: each item's last ref awaited on
    the loop (Ray's own ``await ref``), at most ``WINDOW`` items in flight -- what any
    asyncio caller of Ray pays, before an engine adds anything."""
    actors, submit = actor_chain()
    await submit(0)
    await anyio.to_thread.run_sync(settle)
    start = time.perf_counter()
    for i in range(latency_items):
        await submit(i)
    latency = (time.perf_counter() - start) / latency_items
    start = time.perf_counter()
    pending: list[Any] = []
    for i in range(items):
        if len(pending) == WINDOW:
            await pending.pop(0)
        pending.append(submit(i))
    for ref in pending:
        await ref
    throughput = (time.perf_counter() - start) / items
    for actor in actors:
        ray.kill(actor)
    return latency, throughput


def _compiled_dag(enable_asyncio: bool, window: int) -> tuple[list[Any], Any]:
    from ray.dag import InputNode

    actors = [ray.remote(num_cpus=0)(Stage).remote() for _ in range(STAGES)]
    with InputNode() as inp:
        node: Any = inp
        for actor in actors:
            node = actor.f.bind(node)
    return actors, node.experimental_compile(
        _max_inflight_executions=window, enable_asyncio=enable_asyncio
    )


def _release(actors: list[Any], dag: Any) -> None:
    dag.teardown()
    for actor in actors:
        ray.kill(actor)


async def compiled_chain_awaited(
    items: int, latency_items: int, window: int
) -> tuple[float, float]:
    """The Compiled Graph as an asyncio program drives it (``enable_asyncio=True``,
    ``await dag.execute_async(x)``): Ray's own way to await a graph on a loop."""
    actors, dag = _compiled_dag(True, window)
    try:
        await (await dag.execute_async(0))
        await anyio.to_thread.run_sync(settle)
        start = time.perf_counter()
        for i in range(latency_items):
            await (await dag.execute_async(i))
        latency = (time.perf_counter() - start) / latency_items
        start = time.perf_counter()
        pending: list[Any] = []
        for i in range(items):
            if len(pending) == window:
                await pending.pop(0)
            pending.append(await dag.execute_async(i))
        for fut in pending:
            await fut
        throughput = (time.perf_counter() - start) / items
    finally:
        _release(actors, dag)
    return latency, throughput


def compiled_chain(items: int, latency_items: int, window: int) -> tuple[float, float]:
    """The same as a Ray Compiled Graph (``window`` executions in flight)."""
    actors, dag = _compiled_dag(False, window)
    try:
        ray.get(dag.execute(0))
        settle()
        start = time.perf_counter()
        for i in range(latency_items):
            ray.get(dag.execute(i))
        latency = (time.perf_counter() - start) / latency_items
        start = time.perf_counter()
        pending: list[Any] = []
        for i in range(items):
            if len(pending) == window:
                ray.get(pending.pop(0))
            pending.append(dag.execute(i))
        for ref in pending:
            ray.get(ref)
        throughput = (time.perf_counter() - start) / items
    finally:
        _release(actors, dag)
    return latency, throughput


# -- 2. scaling ------------------------------------------------------------------------------
async def cpu_bound(actors: int, items: int, work: int) -> float:
    """Items per second through one CPU-bound ray node with ``actors`` replicas."""
    node = df.infer(
        burn, placement="ray", replicas=actors, options={"num_cpus": 1, "max_in_flight": 2}
    )
    async with df.Engine(df.Graph("cpu", node)) as engine:
        await engine.run(work)
        await anyio.to_thread.run_sync(settle)
        start = time.perf_counter()
        async for _ in engine.map([work] * items):
            pass
        return items / (time.perf_counter() - start)


def plain_actors(actors: int, items: int, work: int) -> float:
    """Items per second of plain Ray actors (round robin, all submitted at once)."""
    pool = [ray.remote(num_cpus=1)(Burner).remote() for _ in range(actors)]
    ray.get([a.f.remote(1) for a in pool])
    settle()
    start = time.perf_counter()
    ray.get([pool[i % actors].f.remote(work) for i in range(items)])
    rate = items / (time.perf_counter() - start)
    for actor in pool:
        ray.kill(actor)
    return rate


class Burner:
    def f(self, n: int) -> int:
        return burn(n)


def calibrate(ms: float) -> int:
    n = 100_000
    start = time.perf_counter()
    burn(n)
    return max(1, int(n * ms / 1e3 / (time.perf_counter() - start)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--latency-items", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-ms", type=float, default=20.0)
    parser.add_argument("--scale-items", type=int, default=60)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    us = 1e6 / STAGES
    rows: list[list[str]] = []
    results: dict[str, Any] = {"stages": STAGES, "items": args.items, "repeats": args.repeats}
    n, lat_n, reps = args.items, args.latency_items, args.repeats

    def record(name: str, figures: tuple[float, float]) -> tuple[float, float]:
        latency, throughput = figures
        results[name] = {"latency_us_per_hop": latency * us, "us_per_item_per_hop": throughput * us}
        rows.append([name, f"{latency * us:.0f}", f"{throughput * us:.0f}"])
        return figures

    def engine(
        backend: str, k: int, compiled: bool = False, coalesce: int | None = None
    ) -> tuple[float, float]:
        return anyio.run(engine_chain, n, lat_n, k, compiled, coalesce, backend=backend)

    # Every repeat runs each chain once, in turn, so that the machine's moods (a shared
    # 2-core box swings by a third between runs) fall on all of them alike.
    chains: list[tuple[str, Callable[[], tuple[float, float]]]] = [
        ("plain actor chain", lambda: plain_chain(n, lat_n)),
        (f"plain actor chain, {WINDOW} in flight", lambda: plain_chain(n, lat_n, WINDOW)),
        ("compiled graph (4 in flight)", lambda: compiled_chain(n, lat_n, 4)),
        # Ray driven from asyncio, the way an engine on a loop has to wait for it.
        (AWAITED_PLAIN, lambda: anyio.run(plain_chain_awaited, n, lat_n)),
        (AWAITED_COMPILED, lambda: anyio.run(compiled_chain_awaited, n, lat_n, 4)),
    ]
    for backend in ("asyncio", "trio"):
        for k in IN_FLIGHT:
            chains.append(
                (f"dataflow {backend}, max_in_flight={k}", lambda b=backend, k=k: engine(b, k))
            )
        chains.append(
            (f"dataflow {backend}, compiled, max_in_flight=4", lambda b=backend: engine(b, 4, True))
        )
    # Without coalescing (every item in an actor call of its own), for comparison.
    chains.append((f"{ONE_PER_CALL}={WINDOW}", lambda: engine("asyncio", WINDOW, coalesce=1)))
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in chains}
    unavailable: dict[str, str] = {}
    for _ in range(reps):
        for name, measure in chains:
            if name in unavailable:
                continue
            try:
                runs[name].append(measure())
            except Exception as exc:  # Compiled Graphs are experimental: report, do not fail
                if "compiled" not in name:
                    raise
                unavailable[name] = type(exc).__name__
    figures: dict[str, tuple[float, float]] = {}
    for name, _ in chains:
        if name in unavailable:
            rows.append([name, "n/a", f"n/a ({unavailable[name]})"])
            continue
        figures[name] = record(
            name,
            (
                statistics.median(r[0] for r in runs[name]),
                statistics.median(r[1] for r in runs[name]),
            ),
        )
    plain = figures["plain actor chain"]
    compiled = figures.get("compiled graph (4 in flight)")
    best: dict[str, tuple[float, float]] = {}
    for backend in ("asyncio", "trio"):
        for k in IN_FLIGHT:
            if backend == "asyncio":
                best[f"max_in_flight={k}"] = figures[f"dataflow {backend}, max_in_flight={k}"]
        key = f"dataflow {backend}, compiled, max_in_flight=4"
        if key in figures:
            best[f"compiled {backend}"] = figures[key]
    print(f"{STAGES}-stage pass-through chain, small items (µs per item per hop)")
    print(table(["chain", "latency", "throughput"], rows))
    # Ratios: dataflow's best actor-call setting (asyncio) against the plain chain, and
    # compiled dataflow against the Ray Compiled Graph; < 1.0 is faster than Ray.
    calls = [v for key, v in best.items() if key.startswith("max_in_flight")]
    windowed = figures[f"plain actor chain, {WINDOW} in flight"]
    ratios = {
        "throughput_ratio_vs_plain_chain": min(t for _, t in calls) / plain[1],
        # Both plain chains time the same latency loop: each side's best figure.
        "latency_ratio_vs_plain_chain": min(lt for lt, _ in calls) / min(plain[0], windowed[0]),
        # the same number of items in flight on both sides
        "throughput_ratio_vs_plain_chain_same_window": best[f"max_in_flight={WINDOW}"][1]
        / windowed[1],
        # ... and so without coalescing (coalesce=1)
        "throughput_ratio_vs_plain_chain_one_item_per_call": figures[f"{ONE_PER_CALL}={WINDOW}"][1]
        / windowed[1],
    }
    # Against Ray driven from asyncio (each result awaited on the loop, as an engine on
    # a loop must wait): what the engine itself adds.
    awaited = figures[AWAITED_PLAIN]
    ratios["latency_ratio_vs_plain_chain_awaited_on_asyncio"] = (
        min(lt for lt, _ in calls) / awaited[0]
    )
    ratios["throughput_ratio_vs_plain_chain_awaited_on_asyncio"] = (
        best[f"max_in_flight={WINDOW}"][1] / awaited[1]
    )
    compiled_awaited = figures.get(AWAITED_COMPILED)
    if compiled is not None:
        for backend in ("asyncio", "trio"):
            if f"compiled {backend}" not in best:
                continue
            lt, t = best[f"compiled {backend}"]
            ratios[f"compiled_{backend}_throughput_ratio_vs_ray_compiled"] = t / compiled[1]
            ratios[f"compiled_{backend}_latency_ratio_vs_ray_compiled"] = lt / compiled[0]
            if compiled_awaited is not None:
                on_loop = f"compiled_{backend}_{{}}_ratio_vs_ray_compiled_awaited_on_asyncio"
                ratios[on_loop.format("throughput")] = t / compiled_awaited[1]
                ratios[on_loop.format("latency")] = lt / compiled_awaited[0]
    results["ratios"] = ratios
    print(table(["ratio", "value"], [[k, f"{v:.2f}x"] for k, v in ratios.items()]))

    work = calibrate(args.work_ms)
    scale_rows: list[list[str]] = []
    results["cpu_bound"] = {"work_ms": args.work_ms}
    for name, run in (
        ("plain Ray actors", lambda k: plain_actors(k, args.scale_items, work)),
        ("dataflow", lambda k: anyio.run(cpu_bound, k, args.scale_items, work)),
    ):
        rates = {k: run(k) for k in (1, 2)}
        results["cpu_bound"][name] = {
            "items_per_s": {str(k): v for k, v in rates.items()},
            "speedup": rates[2] / rates[1],
        }
        scale_rows += [[name, str(k), f"{v:.1f}", f"{v / rates[1]:.2f}x"] for k, v in rates.items()]
    print(f"\nCPU-bound node, {args.work_ms:g} ms per item, num_cpus=1 per actor")
    print(table(["", "actors", "items/s", "speedup"], scale_rows))
    write_result("ray_scale", results)
    ray.shutdown()


if __name__ == "__main__":
    main()
