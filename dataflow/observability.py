"""Looking inside a running graph: stats windows, the bottleneck, logging, traces.

* :func:`node_busy` and :func:`bottleneck` read ``engine.stats()`` snapshots; given two,
  they cover the window between them (the load you care about, not start-up);
  :func:`percentile` is the one they use for latencies.
* :func:`configure_logging` prints the engine's log records (``dataflow`` logger;
  ``"DEBUG"`` logs every hop on ``dataflow.hop``), as text or one JSON object a line.
* :class:`Tracer` holds the per-request spans of ``Engine(graph, trace=True)``
  (``engine.tracer``); ``tracer.write(path)`` writes Perfetto JSON.

See ``docs/observability.md``.
"""

from __future__ import annotations

from . import _log
from .runtime import _stats, _trace

bottleneck = _stats.bottleneck
node_busy = _stats.node_busy
percentile = _stats.percentile
configure_logging = _log.configure
JsonFormatter = _log.JsonFormatter
Tracer = _trace.Tracer

__all__ = [
    "JsonFormatter",
    "Tracer",
    "bottleneck",
    "configure_logging",
    "node_busy",
    "percentile",
]
