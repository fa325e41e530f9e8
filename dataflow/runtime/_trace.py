"""Per-request traces of a running graph, as Chrome trace-event JSON.

The file opens in https://ui.perfetto.dev (or ``chrome://tracing``). Two kinds of tracks:

* one track per node replica (process ``dataflow <graph>``, one thread per replica) with
  ``batch wait`` and ``compute`` slices; a compute slice names the requests it served
  and, for batched nodes, the batch id; flow arrows follow each request from one compute
  slice to the next;
* one async track per request (process ``requests``): the request's whole life, and
  nested inside it, per node it passed, ``wait <node>`` (sitting in the node's input
  channel), ``batch <node>`` (waiting for its batch to fill), ``compute <node>`` and
  ``emit <node>`` (handing the output downstream, waiting for room if the edge is full).

Tracing is off unless asked for (``Engine(graph, trace=...)``). When off, workers hold
``tracer = None`` and the per-item fast path is not even entered with a tracer, so the
cost is one ``is None`` test per call on the general path and none on the fast path.
Every hook runs on the event loop's thread, so the tracer needs no lock.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .._log import hop_logger
from ._request import STATE_NAMES, Item, Request, Tag

if TYPE_CHECKING:
    from ._scheduler import Scheduler
    from ._worker import NodeRunner

__all__ = ["TraceOption", "Tracer", "make_tracer", "start_tracing"]

TraceOption = Union[bool, str, "os.PathLike[str]", "Tracer", None]

_NODES_PID = 1
_REQUESTS_PID = 2
_CLOSED_KEPT = 4096  # recently ended requests whose late spans are still clamped in
_READY_KEPT = 64  # per request: items whose channel wait is still to be measured


class Tracer:
    """Records spans of requests through a graph and writes Chrome trace-event JSON.

    Args:
        path: where :meth:`close` writes the trace (``None``: keep it in memory only).
        record: keep events (False with ``log_hops`` only logs each hop).
        log_hops: log each hop on the ``dataflow.hop`` logger at DEBUG level.
        max_events: stop recording after this many events, so a long run cannot eat
            memory; :attr:`dropped` counts what was left out.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        record: bool = True,
        log_hops: bool = False,
        max_events: int = 1_000_000,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.record = record
        self.log_hops = log_hops
        self.max_events = max_events
        self.events: list[dict[str, Any]] = []
        self.dropped = 0
        self.graph = ""
        self._t0 = time.perf_counter()
        self._meta: list[dict[str, Any]] = []
        self._tids: dict[tuple[str, int], int] = {}
        self._open: dict[int, float] = {}  # request id -> start
        self._closed: dict[int, float] = {}  # request id -> end, for late spans
        self._ready: dict[int, dict[Tag, float]] = {}  # when each item entered a channel
        self._last: dict[int, tuple[int, float]] = {}  # request -> its last compute slice
        self._batches = 0
        self._flows = 0
        self._log = hop_logger()

    # -- set-up ----------------------------------------------------------------------
    def attach(self, graph_name: str, scheduler: Scheduler) -> None:
        """Give every runner of ``scheduler`` this tracer and name the tracks."""
        self.graph = graph_name
        if not self.events:
            self._t0 = time.perf_counter()  # the trace starts when the engine does
        self._meta = [
            _meta("process_name", _NODES_PID, 0, name=f"dataflow {graph_name}"),
            _meta("process_sort_index", _NODES_PID, 0, sort_index=0),
            _meta("process_name", _REQUESTS_PID, 0, name="requests"),
            _meta("process_sort_index", _REQUESTS_PID, 0, sort_index=1),
        ]
        for name in scheduler.plan.order:
            runner = scheduler.runners[name]
            runner.tracer = self
            for index in range(runner.replicas):
                tid = len(self._tids) + 1
                self._tids[(name, index)] = tid
                label = f"{name} [{index}] {runner.placement}"
                self._meta.append(_meta("thread_name", _NODES_PID, tid, name=label))
                self._meta.append(_meta("thread_sort_index", _NODES_PID, tid, sort_index=tid))

    def now(self) -> float:
        return time.perf_counter()

    def _us(self, t: float) -> float:
        return round((t - self._t0) * 1e6, 3)

    def _add(self, event: dict[str, Any]) -> None:
        if len(self.events) >= self.max_events:
            self.dropped += 1
            return
        self.events.append(event)

    def _span_end(self, rid: int, end: float) -> float | None:
        """Where a span of request ``rid`` may end: ``end``, clamped to the request's own
        end if it already finished (a thread call that outlived its request); None when
        the request is not traced."""
        if rid in self._open:
            return end
        closed = self._closed.get(rid)
        if closed is None:
            return None
        return min(end, closed)

    def _req_span(self, rid: int, name: str, start: float, end: float, **args: Any) -> None:
        stop = self._span_end(rid, end)
        if stop is None or not self.record:
            return
        start = min(start, stop)
        common = {"cat": "request", "id": rid, "pid": _REQUESTS_PID, "tid": 0, "name": name}
        self._add({**common, "ph": "b", "ts": self._us(start), "args": args})
        self._add({**common, "ph": "e", "ts": self._us(stop)})

    # -- hooks (called by the engine and the node runners) ---------------------------
    def request_start(self, req: Request) -> None:
        now = time.perf_counter()
        self._open[req.id] = now
        if self.record:
            self._ready[req.id] = {(): now}
        if self.log_hops:
            self._log.debug("request entered", extra={"request_id": req.id, "node": None})

    def request_end(self, req: Request) -> None:
        now = time.perf_counter()
        start = self._open.pop(req.id, None)
        self._ready.pop(req.id, None)
        self._last.pop(req.id, None)
        if start is None:
            return
        self._closed[req.id] = now
        if len(self._closed) > _CLOSED_KEPT:
            del self._closed[next(iter(self._closed))]
        outcome = STATE_NAMES[req.state]
        if self.record:
            common = {"cat": "request", "id": req.id, "pid": _REQUESTS_PID, "tid": 0}
            name = f"request {req.id}"
            self._add(
                {
                    **common,
                    "ph": "b",
                    "name": name,
                    "ts": self._us(start),
                    "args": {"outcome": outcome},
                }
            )
            self._add({**common, "ph": "e", "name": name, "ts": self._us(now)})
        if self.log_hops:
            extra = {
                "request_id": req.id,
                "node": None,
                "outcome": outcome,
                "duration_s": now - start,
            }
            self._log.debug("request %s", outcome, extra=extra)

    def take(self, runner: NodeRunner, index: int, it: Item) -> None:
        """A worker starts on ``it``: its wait in the input channel ends now."""
        now = time.perf_counter()
        rid = it.req.id
        ready = self._ready.get(rid, {}).get(it.tag)
        if ready is not None:
            self._req_span(rid, f"wait {runner.name}", ready, now, node=runner.name)

    def batch_wait(
        self, runner: NodeRunner, index: int, items: Sequence[Item], start: float, end: float
    ) -> int:
        """A batch of ``items`` closed at ``end`` after collecting from ``start``; returns
        its batch id (shown on the compute slice too)."""
        self._batches += 1
        bid = self._batches
        node = runner.name
        if self.record:
            tid = self._tids.get((node, index), 0)
            self._add(
                {
                    "ph": "X",
                    "cat": "node",
                    "name": "batch wait",
                    "pid": _NODES_PID,
                    "tid": tid,
                    "ts": self._us(start),
                    "dur": round((end - start) * 1e6, 3),
                    "args": {"batch": bid, "size": len(items)},
                }
            )
        for it in items:
            rid = it.req.id
            ready = self._ready.get(rid, {}).get(it.tag, start)
            if ready < start:
                self._req_span(rid, f"wait {node}", ready, start, node=node)
            self._req_span(rid, f"batch {node}", max(ready, start), end, node=node, batch=bid)
        return bid

    def compute(
        self,
        runner: NodeRunner,
        index: int,
        reqs: Iterable[Request],
        start: float,
        end: float,
        batch: int | None = None,
    ) -> None:
        """The body ran from ``start`` to ``end`` for ``reqs`` (several in a batch)."""
        node = runner.name
        tid = self._tids.get((node, index), 0)
        rids = [r.id for r in reqs]
        if self.record:
            args: dict[str, Any] = {"requests": rids}
            if batch is not None:
                args["batch"] = batch
                args["size"] = len(rids)
            ts = self._us(start)
            self._add(
                {
                    "ph": "X",
                    "cat": "node",
                    "name": "compute",
                    "pid": _NODES_PID,
                    "tid": tid,
                    "ts": ts,
                    "dur": round((end - start) * 1e6, 3),
                    "args": args,
                }
            )
            for rid in rids:
                if self._span_end(rid, end) is None:
                    continue
                batch_arg = {} if batch is None else {"batch": batch}
                self._req_span(
                    rid, f"compute {node}", start, end, node=node, replica=index, **batch_arg
                )
                last = self._last.get(rid)
                if last is not None:
                    # An arrow from the request's previous compute slice to this one.
                    self._flows += 1
                    flow = {
                        "cat": "flow",
                        "name": f"request {rid}",
                        "id": self._flows,
                        "pid": _NODES_PID,
                    }
                    self._add({**flow, "ph": "s", "tid": last[0], "ts": last[1]})
                    self._add({**flow, "ph": "f", "bp": "e", "tid": tid, "ts": ts})
                self._last[rid] = (tid, ts)
        if self.log_hops:
            for rid in rids:
                extra: dict[str, Any] = {
                    "request_id": rid,
                    "node": node,
                    "replica": index,
                    "duration_s": end - start,
                    "batch": batch,
                }
                self._log.debug("computed", extra=extra)

    def emitted(self, runner: NodeRunner, it: Item, start: float, end: float) -> None:
        """``it`` left ``runner`` (handed to the next channel or the sink) at ``end``."""
        rid = it.req.id
        ready = self._ready.get(rid)
        if ready is not None and self.record and len(self.events) < self.max_events:
            # Bounded per request: a generator's thousandth output forgets the oldest.
            if len(ready) >= _READY_KEPT and it.tag not in ready:
                del ready[next(iter(ready))]
            ready[it.tag] = end
        self._req_span(rid, f"emit {runner.name}", start, end, node=runner.name)
        if self.log_hops:
            extra = {"request_id": rid, "node": runner.name, "duration_s": end - start}
            self._log.debug("emitted", extra=extra)

    # -- output ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The trace as a Chrome trace-event JSON object."""
        return {
            "traceEvents": [*self._meta, *self.events],
            "displayTimeUnit": "ms",
            "otherData": {"graph": self.graph, "dropped_events": self.dropped},
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the trace to ``path`` (open it in ui.perfetto.dev); returns the path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, separators=(",", ":"))
        return target

    def close(self) -> None:
        """Write the trace to :attr:`path`, if one was given."""
        if self.path is not None and self.record:
            self.write(self.path)


def _meta(kind: str, pid: int, tid: int, **args: Any) -> dict[str, Any]:
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": args}


def make_tracer(trace: TraceOption) -> Tracer | None:
    """The tracer an ``Engine(trace=...)`` option asks for.

    ``True`` keeps the trace in memory (``engine.tracer``), a path also writes it there
    when the engine closes, a :class:`Tracer` is used as is, ``None``/``False`` is off.

    Raises:
        TypeError: ``trace`` is none of those.
    """
    if trace is None or trace is False:
        return None
    if trace is True:
        return Tracer()
    if isinstance(trace, Tracer):
        return trace
    if isinstance(trace, str | os.PathLike):
        return Tracer(trace)
    raise TypeError(f"trace must be a bool, a path or a Tracer, got {type(trace).__name__}")


def start_tracing(tracer: Tracer | None, graph_name: str, scheduler: Scheduler) -> Tracer | None:
    """Attach the hooks a starting engine needs: ``tracer`` if tracing was asked for,
    else a log-only tracer when the ``dataflow.hop`` logger is enabled for DEBUG, else
    nothing (the zero-cost default)."""
    if tracer is None and hop_logger().isEnabledFor(logging.DEBUG):
        tracer = Tracer(record=False, log_hops=True)
    elif tracer is not None and hop_logger().isEnabledFor(logging.DEBUG):
        tracer.log_hops = True
    if tracer is not None:
        tracer.attach(graph_name, scheduler)
    return tracer
