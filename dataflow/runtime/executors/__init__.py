"""Executors: where a node's body runs (the loop itself, or a replica's own thread)."""

from __future__ import annotations

from ._thread import ThreadReplica, default_intra_op_threads

__all__ = ["ThreadReplica", "default_intra_op_threads"]
