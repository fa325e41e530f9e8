"""The Ray actor that serves one replica of a ray-placed node.

Values arrive as top-level arguments, so an ``ObjectRef`` handed on by the previous Ray
node is resolved here, in the actor, by Ray (never in the engine's process). The
``*_ref`` methods return a small status first -- the body's seconds -- and the value as a
separate object, so the engine learns that a call succeeded (and how long its body took)
without fetching what it produced. ``call_group`` computes several items in one call
(see ``runtime/_coalesce``): an item whose body raised goes on as :class:`Raised`, which the
next group passes through and any other call refuses with :class:`InputFailed`.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import ray
import ray.exceptions

from ...graph import Batch, Node
from ._base import build_body

__all__ = ["InputFailed", "Raised", "actor_class", "unwrap"]


class Raised:
    """A body's exception, on its way to the engine as a value: out of a compiled chain,
    or as one item's output of a call computing several (the others' are good)."""

    __slots__ = ("error", "node")

    def __init__(self, node: str, error: Exception) -> None:
        self.node = node
        self.error = error


class InputFailed(Exception):
    """A call refused an input that is a :class:`Raised`: the node that computed the input
    failed on it (the engine blames that node, see ``_ray_handed.blame``)."""


def _good(value: Any) -> Any:
    if type(value) is Raised:
        raise InputFailed(f"the input failed at node {value.node!r}")
    return value


def _raised(node: str, exc: Exception) -> Raised:
    """``exc`` as an item's output, with the actor's traceback; one that cannot be pickled
    travels as a RuntimeError naming it (or the whole call, every item, would fail)."""
    exc.add_note(f"raised in a Ray actor:\n{traceback.format_exc()}")
    try:
        pickle.dumps(exc)
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc} (the exception could not be pickled)")
    return Raised(node, exc)


class _CallActor:
    """One replica's body inside a Ray worker process: set up, called, torn down.

    Calls run one at a time on the actor's default thread, so thread-local state set up
    by ``setup()`` stays put. A compiled node's actor is this plain class (Compiled
    Graphs drive it through channels); other nodes use :class:`_NodeActor`.
    """

    def __init__(self, node: Node, threads: int | None) -> None:
        self._node = node
        self._threads = threads
        self._body: Any = None

    def setup(self) -> int:
        if self._threads is not None:
            # torch's intra-op thread count is per thread: set it where calls run.
            import torch

            torch.set_num_threads(self._threads)
        # Each actor unpickled its own copy of a shared body, so each runs setup().
        self._body = build_body(self._node, True)
        return os.getpid()

    # -- calls: the value comes back to the engine ------------------------------------
    def call(self, kw: dict[str, Any], value: Any) -> Any:
        return self._body(_good(value), **kw)

    def call_plain(self, value: Any) -> Any:
        """``call`` without parameters: one argument less to serialise."""
        return self._body(_good(value))

    def call_parts(self, kw: dict[str, Any], *parts: Any) -> Any:
        return self._body([_good(p) for p in parts], **kw)

    def chain_call(self, kw: dict[str, Any], value: Any) -> Any:
        """One step of a compiled chain: a body's exception travels on as
        :class:`Raised`, so the engine fails the request at the node that raised."""
        if type(value) is Raised:
            return value
        try:
            return self._body(value, **kw)
        except Exception as exc:
            return _raised(self._node.name, exc)

    def call_batch(self, kw: dict[str, Any], *values: Any) -> Any:
        from .._batching import run_batch

        batch = self._node.batch
        assert isinstance(batch, Batch)  # only batched nodes are sent batches
        return run_batch(self._body, batch, list(values), kw)

    def teardown(self) -> None:
        body, self._body = self._body, None
        target = getattr(body, "__wrapped__", body)
        teardown = getattr(target, "teardown", None)
        if callable(teardown):
            teardown()


class _NodeActor(_CallActor):
    """:class:`_CallActor` with outputs left in Ray, batches and streaming generators.

    It has a ``control`` concurrency group: that makes Ray treat it as a threaded actor,
    whose queued calls ``ray.cancel`` drops (a plain actor runs them anyway), and lets
    ``stop`` overtake a running generator.
    """

    def __init__(self, node: Node, threads: int | None) -> None:
        super().__init__(node, threads)
        self._lock = threading.Lock()
        # Generators told to stop: running ones see it after their next yield, one that
        # has not started yet returns before computing anything.
        self._stopped: set[int] = set()

    # -- calls: the value stays in Ray (status first, then the value(s)) ---------------
    # The status is the body's time in seconds. (Declared with their number of
    # outputs: a per-call ``.options()`` costs more than the rest of submitting.)
    @ray.method(num_returns=2)
    def call_ref(self, kw: dict[str, Any], value: Any) -> tuple[float, Any]:
        return _timed(self._body, _good(value), **kw)

    @ray.method(num_returns=2)
    def call_parts_ref(self, kw: dict[str, Any], *parts: Any) -> tuple[float, Any]:
        return _timed(self._body, [_good(p) for p in parts], **kw)

    def call_group(self, kw: dict[str, Any], *values: Any) -> tuple[Any, ...]:
        """Several items in one call: the status -- per item, the body's seconds, the
        :class:`Raised` it failed with, or None for an input that had failed already
        (passed on as it is) -- then each item's output; as one object, or (submitted
        with ``num_returns=len(values) + 1``) each its own. The call itself never fails
        for one item."""
        body = self._body
        perf = time.perf_counter
        status: list[Any] = []
        outs: list[Any] = [status]
        for value in values:
            if type(value) is Raised:
                status.append(None)
                outs.append(value)
                continue
            start = perf()
            try:
                out = body(value, **kw)
            except Exception as exc:
                out = _raised(self._node.name, exc)
                status.append(out)
            else:
                status.append(perf() - start)
            outs.append(out)
        return tuple(outs)

    def call_batch_ref(self, kw: dict[str, Any], *values: Any) -> tuple[Any, ...]:
        seconds, outs = _timed(self.call_batch, kw, *values)
        return (seconds, *outs)

    # -- generators ----------------------------------------------------------------------
    def iterate(self, sid: int, kw: dict[str, Any], value: Any) -> Iterator[Any]:
        with self._lock:
            # Generators run one at a time in the order they were sent: a stop for an
            # earlier one (cancelled in the queue, or already over) is stale.
            self._stopped = {s for s in self._stopped if s >= sid}
            if sid in self._stopped:  # stopped before it began
                return
        gen = self._body(_good(value), **kw)
        try:
            for out in gen:
                yield out
                if sid in self._stopped:
                    return
        finally:
            gen.close()
            with self._lock:
                self._stopped.discard(sid)

    @ray.method(concurrency_group="control")
    def stop(self, sid: int) -> None:
        with self._lock:
            self._stopped.add(sid)


def _timed(fn: Any, *args: Any, **kw: Any) -> tuple[float, Any]:
    """``(seconds, fn(*args, **kw))``: the status a ``*_ref`` call returns first."""
    start = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - start, out


_ACTOR_CLASSES: dict[bool, Any] = {}


def actor_class(compiled: bool = False) -> Any:
    """The Ray actor class (made once per process, when first needed): the plain one
    for a compiled node, else the threaded one."""
    cls = _ACTOR_CLASSES.get(compiled)
    if cls is None:
        if compiled:
            cls = ray.remote(_CallActor)
        else:
            cls = ray.remote(concurrency_groups={"control": 1})(  # type: ignore[call-overload]
                _NodeActor
            )
        _ACTOR_CLASSES[compiled] = cls
    return cls


def unwrap(exc: ray.exceptions.RayTaskError) -> BaseException:
    """The body's own exception, carrying the actor's traceback as a note, so a failing
    body reads the same under every placement."""
    cause = exc.cause
    if not isinstance(cause, Exception) or isinstance(cause, ray.exceptions.RayError):
        return exc
    # A "dual" RayTaskError (also an instance of the cause's class) keeps the remote
    # traceback only in its message.
    remote = getattr(exc, "traceback_str", None) or str(exc)
    cause.add_note(f"raised in a Ray actor:\n{remote}")
    return cause
