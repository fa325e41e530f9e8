"""Ray placement: each replica of a node is a Ray actor; the engine stays in the caller.

``placement="ray"`` keeps the graph, the channels and the requests in the caller's process
and event loop, and sends each item to an actor that built the body there (``setup()``
runs once per actor). The same graph runs in-process or on a cluster by changing the
placement; tensors travel through Ray's object store.

Across the boundary:

- **Backpressure**: the runner keeps at most ``max_in_flight`` calls outstanding per
  actor (one worker lane each), and a generator body pauses once ``max_in_flight`` of
  its outputs wait unread (Ray's streaming-generator backpressure).
- **Cancellation**: a caller that stops waiting cancels the Ray task and tells the actor,
  through a separate control thread, to skip the call if it has not started; a generator
  stops at its next ``yield``. A call already running finishes and its result is dropped,
  as with thread placement.
- **Failure**: when an actor dies, its in-flight items fail with :class:`ActorLost`
  (chained to Ray's error, wrapped in ``NodeError`` by the runner) and the next call
  starts a fresh actor, up to ``max_restarts`` times; after that every call fails with
  :class:`ActorLost` at once, never hangs.
- **Loops**: asyncio awaits ObjectRefs; trio is woken from the ref's completion
  callback (calls) or steps the output stream in a worker thread (generators).

This module imports Ray; the executors package imports it only for a ``"ray"``
placement, so ``import dataflow`` never does.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
import ray
import ray.exceptions

from ..._errors import GraphError
from ...graph import Batch, Node
from .._backend import Backend, ThreadCall
from ._base import Replica, build_body

__all__ = ["OPTION_KEYS", "ActorLost", "RayOptions", "RayReplica", "ensure_ray", "ray_options"]

OPTION_KEYS = frozenset(
    {
        "num_cpus",
        "num_gpus",
        "resources",
        "max_restarts",
        "max_in_flight",
        "address",
        "start_timeout",
        "runtime_env",
    }
)

_END = object()
_TEARDOWN_S = 30.0  # the most ``stop()`` waits for a body's teardown() in its actor


class ActorLost(RuntimeError):
    """The Ray actor serving a replica died (killed, crashed, its node lost).

    Raised for each call that was in flight on it (the runner wraps it in ``NodeError``
    naming the node) and, once ``max_restarts`` is used up, for every later call.
    ``__cause__`` is Ray's own error.
    """


@dataclass(frozen=True)
class RayOptions:
    """A ray-placed node's ``options=``, checked.

    Attributes:
        num_cpus: CPUs each actor reserves (Ray also sizes the actor's thread pools by it).
        num_gpus: GPUs each actor reserves.
        resources: custom Ray resources each actor reserves.
        max_restarts: how many times a replica replaces a dead actor.
        max_in_flight: calls outstanding per actor, and a generator's unread outputs.
        address: the Ray cluster to join if Ray is not initialised yet (``None``: the
            ``RAY_ADDRESS`` variable, else a new local instance); ignored once it is.
        start_timeout: seconds an actor may take to be placed and run ``setup()``.
        runtime_env: Ray's runtime environment for the actors (e.g. ``{"working_dir":
            "."}`` so that workers can import the body's module).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    max_restarts: int = 1
    max_in_flight: int = 2
    address: str | None = None
    start_timeout: float = 120.0
    runtime_env: dict[str, Any] | None = None


def ray_options(node: Node) -> RayOptions:
    """Check a ray-placed node's ``options=`` and return them with defaults filled in.

    Raises:
        GraphError: an unknown key or an invalid value, naming the node and the key.
    """
    opts = node.options
    where = f"node {node.name!r}"
    unknown = sorted(set(opts) - OPTION_KEYS)
    if unknown:
        raise GraphError(
            f"{where}: unknown Ray option(s) {', '.join(map(repr, unknown))}; "
            f"placement='ray' accepts {', '.join(sorted(OPTION_KEYS))}",
            nodes=(node.name,),
        )

    def number(key: str, default: float, *, minimum: float, integer: bool = False) -> Any:
        value = opts.get(key, default)
        kind = int if integer else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, kind)
            or not math.isfinite(value)
            or value < minimum
        ):
            what = "an int" if integer else "a number"
            raise GraphError(
                f"{where}: Ray option {key!r} must be {what} >= {minimum}, got {value!r}",
                nodes=(node.name,),
            )
        return value

    resources = opts.get("resources", {})
    if not isinstance(resources, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
        for k, v in resources.items()
    ):
        raise GraphError(
            f"{where}: Ray option 'resources' must map resource names to amounts >= 0",
            nodes=(node.name,),
        )
    address = opts.get("address")
    if address is not None and not isinstance(address, str):
        raise GraphError(
            f"{where}: Ray option 'address' must be a string such as 'auto' or "
            f"'ray://host:10001', got {address!r}",
            nodes=(node.name,),
        )
    runtime_env = opts.get("runtime_env")
    if runtime_env is not None and not isinstance(runtime_env, dict):
        raise GraphError(
            f"{where}: Ray option 'runtime_env' must be a dict, got {runtime_env!r}",
            nodes=(node.name,),
        )
    start_timeout = number("start_timeout", 120.0, minimum=0.0)
    if start_timeout <= 0:
        raise GraphError(f"{where}: Ray option 'start_timeout' must be > 0", nodes=(node.name,))
    return RayOptions(
        num_cpus=float(number("num_cpus", 1.0, minimum=0.0)),
        num_gpus=float(number("num_gpus", 0.0, minimum=0.0)),
        resources={k: float(v) for k, v in resources.items()},
        max_restarts=number("max_restarts", 1, minimum=0, integer=True),
        max_in_flight=number("max_in_flight", 2, minimum=1, integer=True),
        address=address,
        start_timeout=float(start_timeout),
        runtime_env=runtime_env,
    )


def ensure_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or start a local one) unless Ray is initialised.

    A local instance started here lives until the process exits or ``ray.shutdown()``;
    engines come and go, and a Ray start costs seconds.
    """
    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)


# -- the actor ---------------------------------------------------------------------------
class _NodeActor:
    """One replica's body inside a Ray worker process.

    Calls run one at a time on the actor's default thread, so thread-local state set up
    by ``setup()`` stays put. The actor also has a ``control`` concurrency group: that
    makes Ray treat it as a threaded actor, whose queued calls ``ray.cancel`` drops (a
    plain actor runs them anyway), and lets ``stop`` overtake a running generator.
    """

    def __init__(self, node: Node, threads: int | None) -> None:
        self._node = node
        self._threads = threads
        self._body: Any = None
        self._stopping: dict[int, bool] = {}  # running generators: stream id -> stop?

    def setup(self) -> int:
        if self._threads is not None:
            # torch's intra-op thread count is per thread: set it where calls run.
            import torch

            torch.set_num_threads(self._threads)
        # Each actor unpickled its own copy of a shared body, so each runs setup().
        self._body = build_body(self._node, True)
        return os.getpid()

    def call(self, value: Any, kw: dict[str, Any]) -> Any:
        return self._body(value, **kw)

    def call_batch(self, values: list[Any], kw: dict[str, Any]) -> Any:
        from .._batching import run_batch

        batch = self._node.batch
        assert isinstance(batch, Batch)  # RayReplica only sends batches for batched nodes
        return run_batch(self._body, batch, values, kw)

    def iterate(self, sid: int, value: Any, kw: dict[str, Any]) -> Iterator[Any]:
        self._stopping[sid] = False
        gen = self._body(value, **kw)
        try:
            for out in gen:
                yield out
                if self._stopping[sid]:
                    return
        finally:
            gen.close()
            del self._stopping[sid]

    @ray.method(concurrency_group="control")
    def stop(self, sid: int) -> None:
        # Only a running generator is marked: a queued one is dropped by ray.cancel.
        if sid in self._stopping:
            self._stopping[sid] = True

    def teardown(self) -> None:
        body, self._body = self._body, None
        target = getattr(body, "__wrapped__", body)
        teardown = getattr(target, "teardown", None)
        if callable(teardown):
            teardown()


_ACTOR_CLASS: Any = None


def _actor_class() -> Any:
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = ray.remote(concurrency_groups={"control": 1})(  # type: ignore[call-overload]
            _NodeActor
        )
    return _ACTOR_CLASS


def _unwrap(exc: ray.exceptions.RayTaskError) -> BaseException:
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


def _next_blocking(stream: Any) -> Any:
    """The next output of a streaming generator, blocking (trio's thread bridge)."""
    try:
        ref = next(stream)
    except StopIteration:
        return _END
    return ray.get(ref)


# -- the driver side ---------------------------------------------------------------------
class RayReplica(Replica):
    """A replica served by one Ray actor, replaced when it dies.

    Args:
        node: the node (pickled to the actor with its body).
        index: which replica this is.
        backend: the event loop's primitives.
        options: the node's checked Ray options.
        threads: torch intra-op threads to set in the actor (``None``: Ray's default,
            which follows ``num_cpus``).
    """

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
        self._asyncio = backend.name == "asyncio"
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
        await self._spawn()

    async def _spawn(self) -> None:
        opts = self.options
        actor = (
            _actor_class()
            .options(
                num_cpus=opts.num_cpus,
                num_gpus=opts.num_gpus,
                resources=opts.resources or None,
                runtime_env=opts.runtime_env,
                # Restarts are this replica's business, so that in-flight items fail
                # with a clear error and a replacement runs setup() again.
                max_restarts=0,
                max_task_retries=0,
            )
            .remote(self.node, self.threads)
        )
        self._actor = actor
        try:
            with anyio.move_on_after(opts.start_timeout) as waited:
                await self._resolve(actor.setup.remote())
        except BaseException:
            self._drop_actor()
            raise
        if waited.cancelled_caught:
            self._drop_actor()
            available = ray.available_resources()  # type: ignore[no-untyped-call]
            raise TimeoutError(
                f"node {self.node.name!r}: Ray actor {self.index} did not start within "
                f"{opts.start_timeout:g} s; the cluster may lack the resources it asks for "
                f"(num_cpus={opts.num_cpus:g}, num_gpus={opts.num_gpus:g}, "
                f"resources={opts.resources}); available: {available}"
            )

    async def stop(self) -> None:
        """Run ``teardown()`` in the actor (bounded wait), then kill it; never raises."""
        actor = self._actor
        if actor is None:
            return
        self._actor = None
        self._generation += 1
        with anyio.CancelScope(shield=True), anyio.move_on_after(_TEARDOWN_S):
            try:
                await self._resolve(actor.teardown.remote())
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
            f"item ({type(exc).__name__}); {then}"
        )

    # -- calls ---------------------------------------------------------------------------
    async def _resolve(self, ref: Any) -> Any:
        """The value of ``ref``; a caller that stops waiting cancels the call in Ray
        (dropped if it has not begun; a running call finishes, its result unread)."""
        try:
            if self._asyncio:
                return await ref
            future = ref.future()
            call = ThreadCall(future.result, ())
            # The done callback runs in a Ray thread and hands the outcome to the loop:
            # no thread of ours blocks on the ref.
            return await self.backend.call_in_thread(
                lambda c: future.add_done_callback(lambda _: c.run()), call
            )
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None
        except Exception:
            raise
        except BaseException:
            _cancel(ref)
            raise

    async def _submit(self, method: str, *args: Any) -> Any:
        actor, generation = await self._live()
        try:
            return await self._resolve(getattr(actor, method).remote(*args))
        except ray.exceptions.RayActorError as exc:
            raise self._died(generation, exc) from exc

    async def call(self, value: Any, kw: dict[str, Any]) -> Any:
        """The body's result for one input, computed in the actor."""
        return await self._submit("call", value, kw)

    async def call_batch(self, batch: Batch, values: list[Any], kw: dict[str, Any]) -> list[Any]:
        """Collate, call and split in the actor (its copy of the node's ``batch``)."""
        out: list[Any] = await self._submit("call_batch", values, kw)
        return out

    async def iterate(self, value: Any, kw: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """The generator's outputs as the actor yields them; closing stops it there."""
        actor, generation = await self._live()
        sid = next(self._ids)
        stream = actor.iterate.options(
            num_returns="streaming",
            _generator_backpressure_num_objects=self.options.max_in_flight,
        ).remote(sid, value, kw)
        finished = False
        try:
            while True:
                try:
                    out = await self._step(stream)
                except ray.exceptions.RayActorError as exc:
                    finished = True
                    raise self._died(generation, exc) from exc
                except ray.exceptions.RayTaskError as exc:
                    finished = True
                    raise _unwrap(exc) from None
                if out is _END:
                    finished = True
                    return
                yield out
        finally:
            if not finished:
                _cancel(stream)
                try:
                    actor.stop.remote(sid)  # stops it at its next yield
                except Exception:  # the actor is gone
                    pass

    async def _step(self, stream: Any) -> Any:
        if self._asyncio:
            try:
                ref = await stream.__anext__()
            except StopAsyncIteration:
                return _END
            return await ref
        # If the caller gives up, the thread is abandoned; cancelling the stream (in
        # iterate's finally) ends its wait.
        return await anyio.to_thread.run_sync(_next_blocking, stream, abandon_on_cancel=True)


def _cancel(ref: Any) -> None:
    try:
        ray.cancel(ref)
    except Exception:  # already finished, or the actor is gone
        pass


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead
        pass


def _factory(node: Node, index: int, backend: Backend, intra_op_threads: int | None) -> Replica:
    # Ray sizes an actor's thread pools (OMP_NUM_THREADS) by num_cpus; only an explicit
    # threads= overrides that, the local default share does not apply to another process.
    return RayReplica(node, index, backend, ray_options(node), threads=node.threads)


def register() -> None:
    """Make ``placement="ray"`` build :class:`RayReplica` s."""
    from . import register_placement

    register_placement("ray", _factory)


register()
