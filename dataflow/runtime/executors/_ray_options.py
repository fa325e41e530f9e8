"""A ray-placed node's ``options=``: checked at plan time, mapped to Ray's scheduling.

Placement keys say where each actor may run: ``num_cpus``, ``num_gpus``, ``resources``
(custom resources a node advertises), ``accelerator_type``, ``label_selector`` (node
labels, Ray >= 2.45) and ``node`` (a node id, hard or ``soft`` affinity). The others say
how the engine drives the actors (``max_in_flight``, ``coalesce``, ``max_restarts``,
``start_timeout``)
and where to find the cluster (``address``, ``runtime_env``). ``compiled`` runs the node
as a Ray Compiled Graph; a node that cannot be one is a GraphError saying why.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..._errors import GraphError
from ...graph import Node

__all__ = ["OPTION_KEYS", "RayOptions", "ensure_ray", "ray_options"]

OPTION_KEYS = frozenset(
    {
        "num_cpus",
        "num_gpus",
        "resources",
        "accelerator_type",
        "label_selector",
        "node",
        "soft",
        "max_restarts",
        "max_in_flight",
        "coalesce",
        "address",
        "start_timeout",
        "runtime_env",
        "compiled",
    }
)


@dataclass(frozen=True)
class RayOptions:
    """A ray-placed node's ``options=``, checked.

    Attributes:
        num_cpus: CPUs each actor reserves (Ray also sizes the actor's thread pools by it).
        num_gpus: GPUs each actor reserves.
        resources: custom Ray resources each actor reserves (pins it to nodes that
            advertise them).
        accelerator_type: the accelerator type the actor's node must have (e.g. ``"A100"``).
        label_selector: node labels the actor's node must carry (Ray's label selector).
        node: the id (hex) of the Ray node the actors must run on.
        soft: with ``node``, another node may be used when that one is gone or full.
        max_restarts: how many times a replica replaces a dead actor.
        max_in_flight: calls outstanding per actor, and a generator's unread outputs.
        coalesce: the most items one actor call may carry when items queue at the node
            (see ``runtime/_coalesce``); 1 sends every item in a call of its own.
        address: the Ray cluster to join if Ray is not initialised yet (``None``: the
            ``RAY_ADDRESS`` variable, else a new local instance); ignored once it is.
        start_timeout: seconds an actor may take to be placed and run ``setup()``.
        runtime_env: Ray's runtime environment for the actors (e.g. ``{"working_dir":
            "."}`` so that workers can import the body's module).
        compiled: drive the actor through a Ray Compiled Graph (see ``_ray_compiled``).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None
    label_selector: dict[str, str] | None = None
    node: str | None = None
    soft: bool = False
    max_restarts: int = 1
    max_in_flight: int = 2
    coalesce: int = 16
    address: str | None = None
    start_timeout: float = 120.0
    runtime_env: dict[str, Any] | None = None
    compiled: bool = False

    def actor_options(self) -> dict[str, Any]:
        """Keyword arguments for Ray's ``ActorClass.options`` (placement only)."""
        out: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "resources": self.resources or None,
            "runtime_env": self.runtime_env,
        }
        if self.accelerator_type is not None:
            out["accelerator_type"] = self.accelerator_type
        if self.label_selector:
            out["label_selector"] = self.label_selector
        if self.node is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            out["scheduling_strategy"] = NodeAffinitySchedulingStrategy(self.node, soft=self.soft)
        return out

    def describe(self) -> str:
        """What the actors ask the cluster for, for error messages."""
        parts = [f"num_cpus={self.num_cpus:g}", f"num_gpus={self.num_gpus:g}"]
        parts.append(f"resources={self.resources}")
        if self.accelerator_type is not None:
            parts.append(f"accelerator_type={self.accelerator_type!r}")
        if self.label_selector:
            parts.append(f"label_selector={self.label_selector}")
        if self.node is not None:
            parts.append(f"node={self.node!r} ({'soft' if self.soft else 'hard'})")
        return ", ".join(parts)


def _strings(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def ray_options(node: Node) -> RayOptions:
    """Check a ray-placed node's ``options=`` and return them with defaults filled in.

    Raises:
        GraphError: an unknown key or an invalid value, naming the node and the key.
    """
    opts = node.options
    where = f"node {node.name!r}"

    def fail(message: str) -> GraphError:
        return GraphError(f"{where}: {message}", nodes=(node.name,))

    unknown = sorted(set(opts) - OPTION_KEYS)
    if unknown:
        raise fail(
            f"unknown Ray option(s) {', '.join(map(repr, unknown))}; "
            f"placement='ray' accepts {', '.join(sorted(OPTION_KEYS))}"
        )

    def number(key: str, default: float, *, minimum: float, integer: bool = False) -> Any:
        value = opts.get(key, default)
        kind = int if integer else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, kind)
            or not math.isfinite(value)
            or value < minimum
        ):
            what = "an int" if integer else "a number"
            raise fail(f"Ray option {key!r} must be {what} >= {minimum}, got {value!r}")
        return value

    compiled = opts.get("compiled", False)
    if not isinstance(compiled, bool):
        raise fail(f"Ray option 'compiled' must be True or False, got {compiled!r}")
    if compiled:
        _check_compilable(node, fail)
    resources = opts.get("resources", {})
    if not isinstance(resources, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
        for k, v in resources.items()
    ):
        raise fail("Ray option 'resources' must map resource names to amounts >= 0")
    address = opts.get("address")
    if address is not None and not isinstance(address, str):
        raise fail(
            f"Ray option 'address' must be a string such as 'auto' or "
            f"'ray://host:10001', got {address!r}"
        )
    runtime_env = opts.get("runtime_env")
    if runtime_env is not None and not isinstance(runtime_env, dict):
        raise fail(f"Ray option 'runtime_env' must be a dict, got {runtime_env!r}")
    accelerator = opts.get("accelerator_type")
    if accelerator is not None and not isinstance(accelerator, str):
        raise fail(f"Ray option 'accelerator_type' must be a string, got {accelerator!r}")
    labels = opts.get("label_selector")
    if labels is not None and not _strings(labels):
        raise fail(f"Ray option 'label_selector' must map label names to strings, got {labels!r}")
    pinned = opts.get("node")
    if pinned is not None and not (isinstance(pinned, str) and pinned):
        raise fail(f"Ray option 'node' must be a Ray node id (hex string), got {pinned!r}")
    soft = opts.get("soft", False)
    if not isinstance(soft, bool):
        raise fail(f"Ray option 'soft' must be True or False, got {soft!r}")
    if soft and pinned is None:
        raise fail("Ray option 'soft' only applies together with 'node'")
    start_timeout = number("start_timeout", 120.0, minimum=0.0)
    if start_timeout <= 0:
        raise fail("Ray option 'start_timeout' must be > 0")
    return RayOptions(
        num_cpus=float(number("num_cpus", 1.0, minimum=0.0)),
        num_gpus=float(number("num_gpus", 0.0, minimum=0.0)),
        resources={k: float(v) for k, v in resources.items()},
        accelerator_type=accelerator,
        label_selector=dict(labels) if labels else None,
        node=pinned,
        soft=soft,
        max_restarts=number("max_restarts", 1, minimum=0, integer=True),
        max_in_flight=number("max_in_flight", 2, minimum=1, integer=True),
        coalesce=number("coalesce", 16, minimum=1, integer=True),
        address=address,
        start_timeout=float(start_timeout),
        runtime_env=runtime_env,
        compiled=compiled,
    )


def _check_compilable(node: Node, fail: Any) -> None:
    """Why a node cannot run as a Ray Compiled Graph, as a GraphError (never a silent
    fallback to actor calls)."""
    why = []
    if node.replicas > 1:
        why.append(f"it has replicas={node.replicas} (a compiled node has one actor)")
    if node.batch is not None:
        why.append("it batches (batch=...)")
    if node.info.mode in ("generator", "async_generator"):
        why.append("its body is a generator (streamed outputs)")
    if node.kind in ("shard", "merge"):
        why.append(f"it is a {node.kind} node")
    if why:
        raise fail(
            "Ray option 'compiled' needs a one-replica map/infer node with a plain "
            f"function or class body, but {'; '.join(why)}; remove 'compiled' or those"
        )


def ensure_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or start a local one) unless Ray is initialised.

    A local instance started here lives until the process exits or ``ray.shutdown()``;
    engines come and go, and a Ray start costs seconds.
    """
    import ray

    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)
