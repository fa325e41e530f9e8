"""The driver side of a ray-placed replica: one Ray actor, replaced when it dies."""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator
from typing import Any, NoReturn

import anyio
import ray
import ray.exceptions

from ...graph import Batch, Node
from .._backend import Backend
from ._base import Handed, Replica
from ._ray_actor import InputFailed, actor_class, unwrap
from ._ray_handed import Group, HandedCall, Places, Unreported, blame, confirm, handed_calls
from ._ray_options import RayOptions, ensure_ray
from ._ray_refs import END, RayRef, RayStream, arg, has_refs, value_of

__all__ = ["ActorLost", "RayReplica"]

_STOP_S = 5.0  # the most leaving a stream waits for the actor's generator to stop
_TEARDOWN_S = 30.0  # the most ``stop()`` waits for a body's teardown() in its actor


class ActorLost(RuntimeError):
    """The Ray actor serving a replica died (killed, crashed, its node lost).

    Raised for each call that was in flight on it (the runner wraps it in ``NodeError``
    naming the node) and, once ``max_restarts`` is used up, for every later call.
    ``__cause__`` is Ray's own error.
    """


def _summary(exc: BaseException) -> str:
    """Ray's reason, on one line (its messages run to many)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 240 else text[:237] + "..."


class RayReplica(Replica):
    """A replica served by one Ray actor, replaced when it dies.

    Subclasses may override ``_spawn`` (call it first) and ``_drop_actor``.

    Args:
        node: the node (pickled to the actor with its body).
        index: which replica this is.
        backend: the event loop's primitives.
        options: the node's checked Ray options.
        threads: torch intra-op threads to set in the actor (``None``: Ray's default,
            which follows ``num_cpus``).
    """

    compiled = False  # a Compiled Graph drives the actor (see _ray_compiled)

    def __init__(
        self,
        node: Node,
        index: int,
        backend: Backend,
        options: RayOptions,
        *,
        threads: int | None,
    ) -> None:
        # Every actor holds its own copy of the body, so every one runs setup().
        super().__init__(node, index, owns_setup=True)
        self.backend = backend
        self.options = options
        self.threads = threads
        self.in_flight = options.max_in_flight
        self.interruptible = True
        # Set by the runner before start() when every consumer of the node is
        # ray-placed: outputs then stay in Ray and go on as RayRef (see _ray_refs).
        self.pass_refs = False
        # ... and hands them on as soon as the call is submitted (see _ray_handed),
        # where every consumer blames a failed input on the node that computed it.
        self.hand_on = False
        self._places: Places | None = None  # the max_in_flight bound on handed-on calls
        # The current actor's method for a handed-on call, per number of items.
        self._group_methods: dict[int, Any] = {}
        self._unreported = Unreported()
        self._actor: Any = None
        self._generation = 0  # which actor this is; failures of an older one are old news
        self._restarts = 0
        self._lost: BaseException | None = None  # why the last actor died
        self._spawning = anyio.Lock()
        self._ids = itertools.count()

    @property
    def restarts(self) -> int:
        """How many times this replica replaced a dead actor."""
        return self._restarts

    @property
    def actor(self) -> Any:
        """The live actor handle (``None`` while it is being replaced)."""
        return self._actor

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Start the actor and run ``setup()`` in it; raises what ``setup()`` raises,
        or TimeoutError if the actor is not up within ``start_timeout``."""
        ensure_ray(self.options.address)
        if self.hand_on:
            # Its one lane only submits: the places bound the calls outstanding.
            self._places = Places(self.backend, self.options.max_in_flight)
            self.in_flight = 1
        node = self.node
        if (
            not self.compiled
            and (self.hand_on or not self.pass_refs)
            and node.kind not in ("shard", "merge")
            and node.info.mode == "function"
            and node.batch is None
            and node.timeout is None  # (a deadline is each item's own)
        ):
            # Items queued here may share calls (see runtime/_coalesce).
            self.coalesce = self.options.coalesce
        await self._spawn()

    async def _spawn(self) -> None:
        opts = self.options
        actor = (
            actor_class(self.compiled)
            .options(
                **opts.actor_options(),
                # Restarts are this replica's business, so that in-flight items fail
                # with a clear error and a replacement runs setup() again.
                max_restarts=0,
                max_task_retries=0,
                # A call runs once its inputs exist, not in submission order: a call
                # handed a ref still being computed never holds up the ones behind it,
                # and cancelling it never leaves a gap in the actor's sequence (Ray
                # then holds every later call 30 s). The runner keeps outputs in order.
                allow_out_of_order_execution=True,
            )
            .remote(self.node, self.threads)
        )
        self._actor = actor
        self._group_methods = {}
        try:
            with anyio.move_on_after(opts.start_timeout) as waited:
                await self._value(actor.setup.remote())
        except BaseException:
            self._drop_actor()
            raise
        if waited.cancelled_caught:
            self._drop_actor()
            available = ray.available_resources()  # type: ignore[no-untyped-call]
            raise TimeoutError(
                f"node {self.node.name!r}: Ray actor {self.index} did not start within "
                f"{opts.start_timeout:g} s; the cluster may lack what it asks for "
                f"({opts.describe()}); available: {available}"
            )

    async def stop(self) -> None:
        """Run ``teardown()`` in the actor (bounded wait), then kill it; never raises."""
        actor = self._actor
        if actor is None:
            return
        self._actor = None
        self._generation += 1
        self._unreported.flush()
        with anyio.CancelScope(shield=True), anyio.move_on_after(_TEARDOWN_S):
            try:
                await self._value(actor.teardown.remote())
            except Exception:  # a failing teardown must not hide the engine's own exit
                pass
        _kill(actor)

    def _drop_actor(self) -> None:
        actor, self._actor = self._actor, None
        if actor is not None:
            _kill(actor)

    async def _live(self) -> tuple[Any, int]:
        """The current actor and its generation, replacing a dead one first."""
        actor = self._actor
        if actor is not None:
            return actor, self._generation
        async with self._spawning:
            if self._actor is None:
                if self._restarts >= self.options.max_restarts:
                    raise ActorLost(
                        f"node {self.node.name!r}: Ray actor {self.index} died and its "
                        f"max_restarts={self.options.max_restarts} are used up"
                    ) from self._lost
                self._restarts += 1
                # A request cancelled meanwhile must not leave a half-started actor.
                with anyio.CancelScope(shield=True):
                    await self._spawn()
            return self._actor, self._generation

    def _died(self, generation: int, exc: BaseException) -> ActorLost:
        if generation == self._generation and self._actor is not None:
            self._drop_actor()
            self._generation += 1
            self._lost = exc
        left = self.options.max_restarts - self._restarts
        then = (
            "a new actor starts with the next item"
            if left > 0
            else "no restarts are left (max_restarts)"
        )
        return ActorLost(
            f"node {self.node.name!r}: Ray actor {self.index} died while serving this "
            f"item ({type(exc).__name__}: {_summary(exc)}); {then}"
        )

    # -- calls ---------------------------------------------------------------------------
    async def _value(self, ref: Any) -> Any:
        """The value of ``ref``, with the body's own exception if it raised."""
        try:
            return await value_of(self.backend, ref)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc, ray.exceptions.RayActorError):
                raise
            raise unwrap(exc) from None

    def _failed(self, exc: BaseException, generation: int, inputs: list[Any]) -> NoReturn:
        """Raise a call's failure as its node sees it: :class:`UpstreamFailed` when an
        input handed on to it failed first, :class:`ActorLost` when this actor died,
        else the body's exception (or the cancellation) itself."""
        if isinstance(exc, Exception):
            blame(exc, inputs)
            if isinstance(exc, ray.exceptions.RayActorError):
                raise self._died(generation, exc) from exc
        raise exc

    def _failure(self, generation: int, exc: BaseException) -> BaseException:
        """What a handed-on call that failed with Ray's ``exc`` fails its request with."""
        if isinstance(exc, ray.exceptions.RayActorError):
            return self._died(generation, exc)
        if isinstance(exc, ray.exceptions.RayTaskError):
            return unwrap(exc)
        return exc

    async def _submit(self, method: str, inputs: list[Any], *args: Any) -> Any:
        actor, generation = await self._live()
        try:
            out = await self._value(getattr(actor, method).remote(*args))
        except BaseException as exc:
            self._failed(exc, generation, inputs)
        confirm(inputs)
        return out

    async def _submit_refs(self, method: str, n: int, inputs: list[Any], *args: Any) -> list[Any]:
        """Call ``method`` with ``n`` outputs left in Ray; returns once it succeeded
        (its small status fetched, the outputs not)."""
        actor, generation = await self._live()
        refs = getattr(actor, method).options(num_returns=n + 1).remote(*args)
        try:
            await self._value(refs[0])
        except BaseException as exc:
            _settle(refs[1:])
            self._failed(exc, generation, inputs)
        confirm(inputs)
        return list(refs[1:])

    async def submit_group(self, values: list[Any], kw: dict[str, Any]) -> list[Handed]:
        """Submit one call computing every one of ``values`` (same parameters ``kw``),
        once one of the replica's places is free; each output goes on as a
        :class:`RayRef` at once (see _ray_handed and runtime/_coalesce)."""
        places = self._places
        assert places is not None, "hand_on is set before start()"
        await places.take()
        try:
            actor, generation = await self._live()
        except BaseException:
            places.give_back()
            raise
        n = len(values)
        method = self._group_methods.get(n)
        if method is None:
            # One wrapper per size and actor: ``.options()`` per call costs more than
            # the rest of submitting.
            method = actor.call_group.options(num_returns=n + 1)
            self._group_methods[n] = method
        refs = method.remote(kw, *map(arg, values))
        group = Group(refs[0], places, n)
        name = self.node.name

        def failure(exc: BaseException) -> BaseException:
            return self._failure(generation, exc)

        calls: list[Handed] = []
        for i, value in enumerate(values):
            out = RayRef(refs[i + 1], name)
            call = HandedCall(out, group, i, self._unreported, failure)
            out.calls = handed_calls([value], call)
            calls.append(call)
        places.held_by(group)
        return calls

    async def call_many(self, values: list[Any], kw: dict[str, Any]) -> list[tuple[float, Any]]:
        """One call computing every one of ``values``, all outputs in its reply: per
        item, ``(the body's seconds, its output)``, or ``(0.0, the exception it fails
        with)`` -- :class:`UpstreamFailed` where its input had failed upstream."""
        actor, generation = await self._live()
        try:
            status, *outs = await value_of(
                self.backend, actor.call_group.remote(kw, *map(arg, values))
            )
        except Exception as exc:  # the call as a whole (its actor died, an input's did)
            why: BaseException = exc
            if isinstance(exc, ray.exceptions.RayTaskError) and not isinstance(
                exc, ray.exceptions.RayActorError
            ):
                why = unwrap(exc)
            return [(0.0, self._refused(why, generation, [value])) for value in values]
        results: list[tuple[float, Any]] = []
        for value, entry, out in zip(values, status, outs, strict=True):
            if isinstance(entry, float):
                confirm([value])
                results.append((entry, out))
            elif entry is None:  # its input was a failed item's output
                refused = InputFailed(f"the input failed at node {out.node!r}")
                results.append((0.0, self._refused(refused, generation, [value])))
            else:
                results.append((0.0, entry.error))
        return results

    def _refused(self, exc: BaseException, generation: int, inputs: list[Any]) -> BaseException:
        """What :meth:`_failed` raises for a call that failed with ``exc``."""
        try:
            self._failed(exc, generation, inputs)
        except Exception as failure:
            return failure
        raise AssertionError("unreachable")  # pragma: no cover

    def group_key(self, value: Any) -> Any:
        """Items whose values share a key may share a call: the call that computed a
        value still in flight (a call fails as a whole, so only those of one upstream
        call go together), None for a value known good."""
        if type(value) is RayRef and value.calls:
            call = value.calls[-1]
            assert isinstance(call, HandedCall)
            return call.group
        return None

    def group_size(self, key: Any) -> int:
        return key.size if isinstance(key, Group) else 0

    def report_stats(self) -> None:
        self._unreported.flush()

    async def call(self, value: Any, kw: dict[str, Any]) -> Any:
        """The body's result for one input, computed in the actor (a :class:`RayRef`
        to it when every consumer is ray-placed)."""
        if type(value) is list and has_refs(value):  # a merge's parts, some in Ray
            method, args, inputs = "call_parts", (kw, *map(arg, value)), value
        else:
            method, args, inputs = "call", (kw, arg(value)), [value]
        if self.hand_on and method == "call":  # (a merge is never handed on)
            (call,) = await self.submit_group([value], kw)
            return call
        if self.pass_refs and self.node.kind != "shard":  # a shard's parts are split here
            (ref,) = await self._submit_refs(method + "_ref", 1, inputs, *args)
            return RayRef(ref, self.node.name)
        if method == "call" and not kw:
            return await self._submit("call_plain", inputs, args[1])
        return await self._submit(method, inputs, *args)

    async def call_batch(self, batch: Batch, values: list[Any], kw: dict[str, Any]) -> list[Any]:
        """Collate, call and split in the actor (its copy of the node's ``batch``)."""
        args = (kw, *map(arg, values))
        if self.pass_refs:
            refs = await self._submit_refs("call_batch_ref", len(values), values, *args)
            return [RayRef(ref, self.node.name) for ref in refs]
        out: list[Any] = await self._submit("call_batch", values, *args)
        return out

    async def iterate(self, value: Any, kw: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """The generator's outputs as the actor yields them; closing stops it there."""
        actor, generation = await self._live()
        sid = next(self._ids)
        stream = RayStream(
            self.backend,
            actor.iterate.options(
                num_returns="streaming",
                _generator_backpressure_num_objects=self.options.max_in_flight,
            ).remote(sid, kw, arg(value)),
        )
        inputs = [value]
        try:
            while True:
                try:
                    ref = await stream.next_ref()
                    out = END if ref is END else await self._value(ref)
                except Exception as exc:
                    stream.finished = True  # the body raised or its actor died: it is over
                    self._failed(exc, generation, inputs)
                if inputs:  # it ran, so its input was good
                    confirm(inputs)
                    inputs = []
                if out is END:
                    return
                yield out
        finally:
            if not stream.finished:
                try:
                    actor.stop.remote(sid)  # it returns after its current yield
                    # Read what it yields until then: a cancel would raise
                    # KeyboardInterrupt wherever the body is (its own Ray call, its
                    # finally). Only a body that does not reach a yield in time is
                    # cancelled, by close().
                    await stream.drain(_STOP_S)
                except Exception:  # the actor is gone, or the body raised meanwhile
                    pass
            stream.close()


def _settle(refs: list[Any]) -> None:
    """Mark the outputs of a call that failed as seen: Ray would log each one's error as
    unhandled when it is dropped, though the caller got it (from the status)."""
    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except Exception:  # the call's error, or not ready (a cancelled call)
            pass


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead
        pass
