"""The pure description of a dataflow graph: nodes, edges, validation, pictures.

Nothing in this package starts a thread or touches an event loop; ``dataflow.runtime``
executes what is described here.
"""

from __future__ import annotations

from ._generation import StepModel, generate
from ._graph import Chain, Graph, Plan
from ._node import Batch, Node, encode, infer, map, merge, shard
from ._placement import check_available, resolve

__all__ = [
    "Batch",
    "Chain",
    "Graph",
    "Node",
    "Plan",
    "StepModel",
    "check_available",
    "encode",
    "generate",
    "infer",
    "map",
    "merge",
    "resolve",
    "shard",
]
