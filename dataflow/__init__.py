"""dataflow: an asyncio-native streaming dataflow engine for PyTorch inference.

The layers, from the bottom up:

* ``dataflow.graph`` — the pure description: node specs (``encode``, ``shard``,
  ``infer``, ``merge``, ``map``), graphs, validation, pictures. No event loop, no threads.
* ``dataflow.runtime`` — execution: bounded channels, the scheduler, executors (loop,
  thread), batching, request outcomes.
* ``dataflow.engine`` — the façade: ``Engine`` with ``run``, ``stream``, ``map``, ``stats``.

Only the names below are public; everything in a ``_module`` is private.
"""

from __future__ import annotations

from ._errors import (
    DataflowError,
    EngineClosed,
    GraphError,
    InvalidRequest,
    NodeError,
    Overloaded,
)
from ._streams import MapStream, Stream
from .engine import Engine, EngineState
from .graph import (
    Batch,
    Chain,
    Chunk,
    Graph,
    Node,
    StepModel,
    TokenLogprob,
    encode,
    generate,
    infer,
    map,
    merge,
    shard,
)

__all__ = [
    "Batch",
    "Chain",
    "Chunk",
    "DataflowError",
    "Engine",
    "EngineClosed",
    "EngineState",
    "Graph",
    "GraphError",
    "InvalidRequest",
    "MapStream",
    "Node",
    "NodeError",
    "Overloaded",
    "StepModel",
    "Stream",
    "TokenLogprob",
    "encode",
    "generate",
    "infer",
    "map",
    "merge",
    "shard",
]

__version__ = "0.1.0"
