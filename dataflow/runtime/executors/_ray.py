"""Ray placement: each replica of a node is a Ray actor; the engine stays in the caller.

``placement="ray"`` keeps the graph, the channels and the requests in the caller's process
and event loop, and sends each item to an actor that built the body there (``setup()``
runs once per actor). The same graph runs in-process or on a cluster by changing the
placement; tensors travel through Ray's object store.

The modules:

- ``_ray_options``: the node's ``options=`` checked at plan time and mapped to Ray's
  scheduling (resources, GPUs, accelerator type, label selectors, node affinity).
- ``_ray_actor``: the actor that runs the body.
- ``_ray_refs``: awaiting refs and streams on asyncio and trio without threads, and
  :class:`RayRef`, the output of a node whose consumers are all ray-placed: it goes on
  actor to actor as an ``ObjectRef`` and is fetched only where the engine needs it.
- ``_ray_handed``: calls whose ref went on as soon as they were submitted, settled by
  whoever later waits on something that depends on them.
- ``_ray_replica``: :class:`RayReplica`, the driver side.
- ``_ray_compiled``: chains of nodes with ``options={"compiled": True}`` run as one Ray
  Compiled Graph.

The scheduler calls :func:`plan_ray` (hints per runner) and each runner applies them to
the replicas it makes with :func:`configure`.

Across the boundary:

- **Backpressure**: the runner keeps at most ``max_in_flight`` calls outstanding per
  actor (one worker lane each, or one lane and that many places for a node whose
  calls hand their output on), and a generator body pauses once ``max_in_flight`` of
  its outputs wait unread (Ray's streaming-generator backpressure).
- **Cancellation**: a request's end cancels its Ray calls (a queued call is dropped; a
  call already running finishes and its result is dropped, as with thread placement);
  a generator is told to stop, its task cancelled and its stream deleted, so it returns
  at its next ``yield`` even while paused by backpressure.
- **Failure**: when an actor dies, its in-flight items fail with :class:`ActorLost`
  (chained to Ray's error, wrapped in ``NodeError`` by the runner) and the next call
  starts a fresh actor, up to ``max_restarts`` times; after that every call fails with
  :class:`ActorLost` at once, never hangs.

This package imports Ray only for a ``"ray"`` placement, so ``import dataflow`` never does.
"""

from __future__ import annotations

from typing import Any

from ...graph import Node, Plan
from .._backend import Backend
from ._base import Replica
from ._ray_compiled import ChainFollower, CompiledRayReplica, plan_chains
from ._ray_options import OPTION_KEYS, RayOptions, ensure_ray, ray_options
from ._ray_refs import RayRef
from ._ray_replica import ActorLost, RayReplica

__all__ = [
    "OPTION_KEYS",
    "ActorLost",
    "CompiledRayReplica",
    "RayOptions",
    "RayRef",
    "RayReplica",
    "configure",
    "ensure_ray",
    "plan_ray",
    "ray_options",
    "register",
]


def plan_ray(plan: Plan, placements: dict[str, str], runners: dict[str, Any]) -> None:
    """Tell each Ray node's runner how its replicas hand on values (``ray_hints``):
    ``pass_refs`` where every consumer is a Ray node (``hand_on``: before the call
    ends, see :class:`~._base.Handed`), and compiled chains."""
    nodes = {name: runner.node for name, runner in runners.items()}
    chains = plan_chains(plan, placements, nodes)
    for name, runner in runners.items():
        if placements[name] != "ray":
            continue
        down = plan.downstream[name]
        hints: dict[str, Any] = dict(chains.get(name, {}))
        if down and all(placements[d] == "ray" for d in down):
            hints["pass_refs"] = True
            # The ref goes on before the call ends only from a plain call (not a
            # shard, merge or generator; no timeout: nobody waits for the call to time
            # it) to nodes that blame a failed input on its producer: not a batch (one
            # failed input would fail the other requests' items with it) nor a compiled
            # chain (it fetches values).
            node = nodes[name]
            hints["hand_on"] = (
                node.kind not in ("shard", "merge")
                and node.info.mode == "function"
                and node.timeout is None
                and node.batch is None
                and all(
                    nodes[d].batch is None and nodes[d].options.get("compiled") is not True
                    for d in down
                )
            )
        runner.ray_hints = hints


def configure(replica: Replica, hints: dict[str, Any]) -> Replica:
    """Apply a runner's ``ray_hints`` to a replica it made (before its start)."""
    if hints.get("fused"):
        return ChainFollower(replica.node, replica.index)
    if isinstance(replica, CompiledRayReplica):
        replica.chain = list(hints.get("chain", ()))
    elif isinstance(replica, RayReplica):
        replica.pass_refs = bool(hints.get("pass_refs"))
        replica.hand_on = bool(hints.get("hand_on"))
    return replica


def _factory(node: Node, index: int, backend: Backend, intra_op_threads: int | None) -> Replica:
    # Ray sizes an actor's thread pools (OMP_NUM_THREADS) by num_cpus; only an explicit
    # threads= overrides that, the local default share does not apply to another process.
    options = ray_options(node)
    if options.compiled:
        return CompiledRayReplica(node, index, backend, options, threads=node.threads)
    return RayReplica(node, index, backend, options, threads=node.threads)


def register() -> None:
    """Make ``placement="ray"`` build :class:`RayReplica` s."""
    from . import register_placement

    register_placement("ray", _factory)


register()
