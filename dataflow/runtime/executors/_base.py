"""Replicas: where one copy of a node's body lives and runs.

A node runs ``replicas`` copies of its body. Each copy is a :class:`Replica` that builds
the body where it will run (so ``setup()`` loads weights in the replica's own thread,
device or actor), runs it on single items, batches and generators, and tears it down.
Subclasses only say *where* a call runs (:meth:`Replica._run`); placements that live
outside this process (Ray) override the calls themselves.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ...graph import Batch, Node

if TYPE_CHECKING:
    from .._request import Request

__all__ = ["Handed", "LoopReplica", "Replica", "Report", "UpstreamFailed", "build_body"]

_END = object()


class Handed:
    """A call's output, handed on before the call is known to have ended.

    A replica whose calls run elsewhere (Ray, with every consumer in Ray too) returns a
    subclass of this right after submitting: the runner sends :attr:`value` on at once
    and :meth:`adopt` s the call for the item's request. Whoever later learns how the
    call ended -- a consumer of the value, or the request's end -- settles it, and the
    runner hears of it through ``report(outcome, at)`` (on the loop): ``outcome`` is the
    body's seconds (it succeeded), an exception (it raised: the request fails at this
    node) or None (it did not run for its request); ``at`` is when that became known
    (``time.perf_counter``).
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def adopt(self, req: Request, report: Report) -> None:
        raise NotImplementedError


Report = Callable[[float | BaseException | None, float], None]


class UpstreamFailed(Exception):
    """A call failed only because an input handed on to it (:class:`Handed`) failed
    where it was computed: that node fails the request, so this item is dropped."""


def build_body(node: Node, run_setup: bool) -> Callable[..., Any]:
    """The callable one replica invokes: a fresh instance for a class body (with its
    ``setup()`` run), the shared body otherwise; ``nn.Module`` calls run in eval mode
    under ``torch.inference_mode``."""
    body = node.body
    if node.info.per_replica:
        body = body()
        run_setup = True
    if run_setup:
        setup = getattr(body, "setup", None)
        if callable(setup):
            setup()
    if node.info.is_module:
        return _wrap_module(body)
    return body  # type: ignore[no-any-return]


def _wrap_module(module: Any) -> Callable[..., Any]:
    import torch

    module.eval()

    def forward(value: Any, **kw: Any) -> Any:
        with torch.inference_mode():
            return module(value, **kw)

    forward.__wrapped__ = module  # type: ignore[attr-defined]
    return forward


def _call_kw(fn: Callable[..., Any], value: Any, kw: dict[str, Any]) -> Any:
    return fn(value, **kw)


def _teardown(body: Callable[..., Any]) -> None:
    target = getattr(body, "__wrapped__", body)
    teardown = getattr(target, "teardown", None)
    if callable(teardown):
        teardown()


class Replica:
    """One copy of a node's body and the place it runs.

    Args:
        node: the node.
        index: which replica this is (0-based).
        owns_setup: run ``setup()``/``teardown()`` of a shared (non-class) body here;
            true for replica 0 only, so a shared object is set up once.
    """

    def __init__(self, node: Node, index: int, *, owns_setup: bool) -> None:
        self.node = node
        self.index = index
        self.owns_setup = owns_setup
        self.body: Callable[..., Any] | None = None
        # Items the runner may keep outstanding here at once, one worker lane each: more
        # than one where a call's round trip is worth hiding (a Ray actor queues them).
        self.in_flight = 1
        # Whether the runner may stop waiting for a call whose request ended: true where
        # the replica can then cancel the call where it runs (Ray), so a thread's queue
        # never fills with abandoned work.
        self.interruptible = False
        # Whether calls return a :class:`Handed` at once (submitted, not finished): the
        # runner then neither times them nor waits for them (see Handed).
        self.hand_on = False
        # The most items one call may carry (:meth:`submit_group` with hand_on, else
        # :meth:`call_many`): more than 1 only where calls cost more than bodies (Ray).
        self.coalesce = 1
        # Seconds :meth:`stop` waits for a body still running (the engine's ``grace``);
        # :attr:`stuck` says it was still running then.
        self.grace = math.inf
        self.stuck = False

    async def submit_group(self, values: list[Any], kw: dict[str, Any]) -> list[Handed]:
        """With hand_on: one call computing all ``values`` (parameters ``kw``), its outputs
        handed on at once, one :class:`Handed` per value."""
        raise NotImplementedError

    async def call_many(self, values: list[Any], kw: dict[str, Any]) -> list[tuple[float, Any]]:
        """One call computing all ``values``: per value ``(the body's seconds, its
        output)`` or ``(0.0, the exception it fails with)``."""
        raise NotImplementedError

    def group_key(self, value: Any) -> Any:
        """Items may share a call (:meth:`submit_group`) only if their values' keys are
        the same object."""
        return None

    def group_size(self, key: Any) -> int:
        """How many items share ``key`` (a :meth:`group_key`) in all, wherever they are
        now; 0 if unknown."""
        return 0

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` where this replica runs and return the result."""
        raise NotImplementedError

    async def start(self) -> None:
        """Build the body in place (constructor and ``setup()``); raises what they raise.

        Cancelling start-up lets a ``setup()`` already running finish first, so that its
        ``teardown()`` runs when the replica stops."""
        with anyio.CancelScope(shield=True):
            self.body = await self._run(build_body, self.node, self.owns_setup)
        await anyio.lowlevel.checkpoint_if_cancelled()

    async def stop(self) -> None:
        """Run ``teardown()`` where the body lives; never raises."""
        body = self.body
        if body is None or not (self.node.info.per_replica or self.owns_setup):
            return
        self.body = None
        # Not shielded here: the runner shields the whole stop, and a ThreadReplica
        # bounds it by its grace period.
        try:
            await self._run(_teardown, body)
        except Exception:  # a failing teardown must not hide the engine's own exit
            pass

    async def call(self, value: Any, kw: dict[str, Any]) -> Any:
        """The body's result for one input."""
        assert self.body is not None
        if self.node.info.mode == "async":
            return await self.body(value, **kw)
        return await self._run(_call_kw, self.body, value, kw)

    def report_stats(self) -> None:
        """Add to the node's stats what this replica still holds back (before a stats
        snapshot): a Ray replica's busy times not fetched yet."""

    async def call_batch(self, batch: Batch, values: list[Any], kw: dict[str, Any]) -> list[Any]:
        """Collate ``values``, call the body once, split its output per input."""
        from .._batching import run_batch

        assert self.body is not None
        return await self._run(run_batch, self.body, batch, values, kw)  # type: ignore[no-any-return]

    async def iterate(self, value: Any, kw: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """The outputs of a generator body, one at a time; closing stops the generator."""
        assert self.body is not None
        if self.node.info.mode == "async_generator":
            agen = self.body(value, **kw)
            try:
                async for out in agen:
                    yield out
            finally:
                with anyio.CancelScope(shield=True):
                    await agen.aclose()
            return
        gen = await self._run(_call_kw, self.body, value, kw)
        try:
            while True:
                out = await self._run(next, gen, _END)
                if out is _END:
                    return
                yield out
        finally:
            with anyio.CancelScope(shield=True):
                await self._run(gen.close)


class LoopReplica(Replica):
    """Runs the body on the event loop itself (async bodies, cheap sync ones)."""

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def direct(self) -> Callable[..., Any]:
        """The body for the worker's fast path (sync function, no parameters)."""
        assert self.body is not None
        return self.body
