"""Execution: channels, the scheduler, executors, batching, request outcomes.

Everything that runs lives here; ``dataflow.graph`` only describes, and
``dataflow.engine`` is the façade users hold.
"""

from __future__ import annotations

from . import _generation  # noqa: F401  (registers the unbatched decoder with graph/)
from ._backend import Backend, current_backend
from ._channel import BrokenChannel, Channel, EndOfChannel

__all__ = ["Backend", "BrokenChannel", "Channel", "EndOfChannel", "current_backend"]
