"""Executors: where each replica of a node runs its body.

``loop`` runs on the event loop; ``thread`` gives each replica a long-lived thread.
Other placements plug in by subclassing :class:`Replica` and registering a factory.
"""

from __future__ import annotations

from collections.abc import Callable

from ...graph import Node
from .._backend import Backend
from ._base import Handed, LoopReplica, Replica, UpstreamFailed, build_body
from ._cuda import CudaReplica
from ._thread import ThreadReplica, default_intra_op_threads

__all__ = [
    "CudaReplica",
    "Handed",
    "LoopReplica",
    "Replica",
    "ReplicaFactory",
    "ThreadReplica",
    "UpstreamFailed",
    "build_body",
    "default_intra_op_threads",
    "make_replica",
    "register_placement",
]

ReplicaFactory = Callable[[Node, int, Backend, "int | None"], Replica]
_FACTORIES: dict[str, ReplicaFactory] = {}


def register_placement(kind: str, factory: ReplicaFactory) -> None:
    """Make ``placement=kind`` (or ``kind:N``) build replicas with ``factory``."""
    _FACTORIES[kind] = factory


def make_replica(
    node: Node, placement: str, index: int, backend: Backend, *, intra_op_threads: int | None
) -> Replica:
    """The replica ``index`` of ``node`` for its resolved ``placement``."""
    kind = placement.split(":", 1)[0]
    factory = _FACTORIES.get(kind)
    if factory is None and kind == "ray":
        # Imported here, on first use, so that `import dataflow` never imports Ray.
        from . import _ray  # noqa: F401  (registers "ray")

        factory = _FACTORIES.get(kind)
    if factory is not None:
        return factory(node, index, backend, intra_op_threads)
    if kind == "loop":
        return LoopReplica(node, index, owns_setup=index == 0)
    if kind == "thread":
        return ThreadReplica(
            node, index, backend, owns_setup=index == 0, intra_op_threads=intra_op_threads
        )
    raise ValueError(f"node {node.name!r}: no executor for placement {placement!r}")


# torch.cuda is touched only when a CUDA replica starts, not on import.
register_placement("cuda", CudaReplica.from_node)
