"""The pure description of a dataflow graph: nodes, edges, validation, pictures.

Nothing in this package starts a thread or touches an event loop; ``dataflow.runtime``
executes what is described here.
"""

from __future__ import annotations

from ._generation import (
    Chunk,
    GenerationConfig,
    StepModel,
    TokenLogprob,
    generate,
    generation_config,
)
from ._graph import Chain, Graph, Plan
from ._node import Batch, Node, encode, infer, map, merge, shard
from ._placement import check_available, resolve

__all__ = [
    "Batch",
    "Chain",
    "Chunk",
    "GenerationConfig",
    "Graph",
    "Node",
    "Plan",
    "StepModel",
    "TokenLogprob",
    "check_available",
    "encode",
    "generate",
    "generation_config",
    "infer",
    "map",
    "merge",
    "resolve",
    "shard",
]
