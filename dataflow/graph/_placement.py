"""Placement: where a node's body runs, resolved against this machine."""

from __future__ import annotations

import importlib.util

from .._errors import GraphError
from ._node import Node

__all__ = ["check_available", "cuda_device_count", "resolve"]


def cuda_device_count() -> int:
    """The number of CUDA devices torch can use here (0 without torch's CUDA build)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.device_count())


def resolve(node: Node) -> str:
    """The concrete placement of ``node``: ``"auto"`` becomes ``"loop"`` for async bodies,
    ``"cuda"`` where a GPU exists and ``"thread"`` otherwise; ``"cuda"`` becomes
    ``"cuda:0"``."""
    placement = node.placement
    if placement == "auto":
        if node.info.mode in ("async", "async_generator"):
            return "loop"
        return "cuda:0" if cuda_device_count() > 0 else "thread"
    if placement == "cuda":
        return "cuda:0"
    return placement


def check_available(node: Node) -> None:
    """Raise GraphError if ``node``'s placement cannot run on this machine."""
    placement = node.placement
    if placement.startswith("cuda"):
        count = cuda_device_count()
        index = int(placement.split(":", 1)[1]) if ":" in placement else 0
        if count == 0:
            raise GraphError(
                f"node {node.name!r}: placement {placement!r} needs a CUDA GPU and this "
                "machine has none; use 'auto' to fall back to a thread",
                nodes=(node.name,),
            )
        if index >= count:
            raise GraphError(
                f"node {node.name!r}: placement {placement!r} but only {count} CUDA "
                f"device(s) exist",
                nodes=(node.name,),
            )
    elif placement == "ray" and importlib.util.find_spec("ray") is None:
        raise GraphError(
            f"node {node.name!r}: placement 'ray' needs Ray; install the extra: "
            "pip install 'dataflow-engine[ray]'",
            nodes=(node.name,),
        )
