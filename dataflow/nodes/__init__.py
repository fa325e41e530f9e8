"""The built-in node library for parallelism across threads and devices.

* :func:`split_stages` — pipeline parallelism: a model's blocks split into stages, each an
  infer node with its own placement, micro-batches streaming through them.
* :func:`shard_linear`, :func:`shard_mlp` — tensor parallelism: a layer's weights split
  across parallel branches, merged by concat or sum.
* :func:`split_batch`, :func:`concat`, :func:`sum_parts`, :func:`data_parallel` — data
  sharding along dim 0, and merges that check the parts' shapes.

Everything here builds ordinary nodes and graphs from ``dataflow.graph``; nothing runs
until an :class:`~dataflow.Engine` starts them.
"""

from __future__ import annotations

from ._data import concat, data_parallel, split_batch, sum_parts
from ._stages import blocks_of, measure_blocks, partition, split_stages
from ._tensor import Sharded, shard_linear, shard_mlp

__all__ = [
    "Sharded",
    "blocks_of",
    "concat",
    "data_parallel",
    "measure_blocks",
    "partition",
    "shard_linear",
    "shard_mlp",
    "split_batch",
    "split_stages",
    "sum_parts",
]
