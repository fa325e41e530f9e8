"""CUDA placement: each replica owns a long-lived thread and its own CUDA stream.

A :class:`CudaReplica` is a :class:`ThreadReplica` whose thread, once started, makes the
replica's device current and installs one ``torch.cuda.Stream`` as that thread's current
stream for the replica's whole life, so every kernel and copy its body issues goes to
that stream and replicas overlap copies with compute. Around each call:

* host tensors go to the device from pinned memory with ``non_blocking=True``;
* a device tensor made by another CUDA node carries the event recorded after it was
  produced: this stream waits on the event (``wait_event``) instead of the host syncing,
  and ``record_stream`` keeps the allocator from reusing its memory while this stream
  may still read it; a tensor on another GPU is copied on a per-source-device stream;
* outputs either stay on the device, carrying a fresh event for the next CUDA node
  (node option ``cuda_output="device"``), or — the default, ``"host"`` — are copied to
  pinned host memory and the event is synchronised *in the replica's thread*, so the
  CPU never reads a tensor before its copy lands and the event loop never blocks.

Every torch.cuda call goes through :class:`DeviceOps`, so the bookkeeping above can be
tested on a machine without a GPU by substituting a fake.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from ..._errors import GraphError
from ...graph import Batch, Node, resolve
from ._thread import ThreadReplica

if TYPE_CHECKING:
    from .._backend import Backend

__all__ = [
    "EVENT_ATTR",
    "CudaReplica",
    "DeviceOps",
    "TorchCudaOps",
    "device_index",
    "event_of",
]

EVENT_ATTR = "_dataflow_cuda_event"
"""The attribute of a device tensor holding the CUDA event recorded after it was made."""

OUTPUT_MODES = ("host", "device")
STREAM_MODES = ("own", "default")


def device_index(placement: str) -> int:
    """The CUDA device index of a placement: ``"cuda"`` → 0, ``"cuda:N"`` → N.

    Raises:
        ValueError: ``placement`` is not ``"cuda"`` or ``"cuda:N"``.
    """
    if placement == "cuda":
        return 0
    kind, sep, index = placement.partition(":")
    if kind != "cuda" or not sep or not index.isdigit():
        raise ValueError(f"not a CUDA placement: {placement!r}; expected 'cuda' or 'cuda:N'")
    return int(index)


def event_of(value: Any) -> Any:
    """The CUDA event a device tensor carries, or None."""
    return getattr(value, EVENT_ATTR, None)


class DeviceOps(Protocol):
    """The CUDA operations a replica needs; :class:`TorchCudaOps` is the real one."""

    def set_device(self, index: int) -> None:
        """Make device ``index`` current for the calling thread."""

    def new_stream(self, index: int) -> Any:
        """A new stream on device ``index``."""

    def default_stream(self, index: int) -> Any:
        """The default stream of device ``index``."""

    def use_stream(self, stream: Any) -> None:
        """Make ``stream`` the calling thread's current stream on its device."""

    def record_event(self, stream: Any) -> Any:
        """Record and return an event marking the work queued on ``stream`` so far."""

    def wait_event(self, stream: Any, event: Any) -> None:
        """Make later work on ``stream`` wait for ``event`` (no host sync)."""

    def wait_stream(self, stream: Any, other: Any) -> None:
        """Make later work on ``stream`` wait for what ``other`` has queued so far."""

    def synchronize_event(self, event: Any) -> None:
        """Block the calling thread until ``event`` has completed."""

    def synchronize_stream(self, stream: Any) -> None:
        """Block the calling thread until ``stream`` is idle."""

    def device_of(self, value: Any) -> int | None:
        """The device index of a device tensor; None for host tensors and non-tensors."""

    def is_tensor(self, value: Any) -> bool:
        """Whether ``value`` is a tensor (host or device)."""

    def upload(self, tensor: Any, index: int) -> Any:
        """Copy a host tensor to device ``index`` on the current stream, from pinned
        memory with ``non_blocking=True``."""

    def download(self, tensor: Any) -> Any:
        """Queue a copy of a device tensor into pinned host memory on the current stream;
        the result is valid once an event recorded afterwards has completed."""

    def peer_copy(self, tensor: Any, index: int, via: Any) -> Any:
        """Copy a tensor from another device to device ``index``; the source side of the
        copy runs on ``via`` (a stream of the source device)."""

    def record_stream(self, tensor: Any, stream: Any) -> None:
        """Tell the allocator ``tensor`` is in use on ``stream``."""

    def place_module(self, module: Any, index: int) -> None:
        """Move an ``nn.Module``'s parameters and buffers to device ``index`` in place."""


class TorchCudaOps:
    """:class:`DeviceOps` on ``torch.cuda``."""

    def __init__(self) -> None:
        import torch

        self._torch = torch

    def set_device(self, index: int) -> None:
        self._torch.cuda.set_device(index)

    def new_stream(self, index: int) -> Any:
        return self._torch.cuda.Stream(device=index)  # type: ignore[no-untyped-call]

    def default_stream(self, index: int) -> Any:
        return self._torch.cuda.default_stream(index)

    def use_stream(self, stream: Any) -> None:
        # The current stream is thread-local in torch: set once, it holds for this
        # replica's thread only, and every op the body issues lands on it.
        self._torch.cuda.set_stream(stream)

    def record_event(self, stream: Any) -> Any:
        event = self._torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        return event

    def wait_event(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def wait_stream(self, stream: Any, other: Any) -> None:
        stream.wait_stream(other)

    def synchronize_event(self, event: Any) -> None:
        event.synchronize()

    def synchronize_stream(self, stream: Any) -> None:
        stream.synchronize()

    def device_of(self, value: Any) -> int | None:
        torch = self._torch
        if isinstance(value, torch.Tensor) and value.is_cuda:
            return int(value.device.index)
        return None

    def is_tensor(self, value: Any) -> bool:
        return isinstance(value, self._torch.Tensor)

    def upload(self, tensor: Any, index: int) -> Any:
        # A non_blocking copy from pageable memory is synchronous; pin first (inputs that
        # are already pinned skip the extra host copy). The caching host allocator records
        # the copy's stream, so the pinned block is not reused before the copy ends.
        source = tensor if tensor.is_pinned() else tensor.pin_memory()
        return source.to(self._torch.device("cuda", index), non_blocking=True)

    def download(self, tensor: Any) -> Any:
        out = self._torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        out.copy_(tensor, non_blocking=True)
        return out

    def peer_copy(self, tensor: Any, index: int, via: Any) -> Any:
        # A cross-device copy runs on the source device's current stream and fences it
        # against the destination's current stream (ours) both ways.
        with self._torch.cuda.stream(via):
            return tensor.to(self._torch.device("cuda", index), non_blocking=True)

    def record_stream(self, tensor: Any, stream: Any) -> None:
        tensor.record_stream(stream)

    def place_module(self, module: Any, index: int) -> None:
        module.to(self._torch.device("cuda", index))


_default_ops: DeviceOps | None = None


def _ops() -> DeviceOps:
    global _default_ops
    if _default_ops is None:
        _default_ops = TorchCudaOps()
    return _default_ops


class _DeviceState:
    """One replica's device, stream and peer streams; used only in the replica's thread."""

    def __init__(self, ops: DeviceOps, index: int, output: str, stream_mode: str) -> None:
        self.ops = ops
        self.index = index
        self.output = output
        ops.set_device(index)
        if stream_mode == "default":
            self.stream = ops.default_stream(index)
        else:
            self.stream = ops.new_stream(index)
        ops.use_stream(self.stream)
        # One long-lived stream per source device for copies from other GPUs.
        self.peers: dict[int, Any] = {}

    def _map(self, value: Any, fn: Callable[[Any], Any]) -> Any:
        if self.ops.is_tensor(value):
            return fn(value)
        if isinstance(value, tuple):
            return tuple(self._map(v, fn) for v in value)
        if isinstance(value, list):
            return [self._map(v, fn) for v in value]
        if isinstance(value, dict):
            return {k: self._map(v, fn) for k, v in value.items()}
        return value

    # -- inputs ----------------------------------------------------------------------
    def accept(self, value: Any) -> Any:
        """Order this stream after the producers of the device tensors in ``value``."""
        return self._map(value, self._accept_tensor)

    def _accept_tensor(self, t: Any) -> Any:
        ops = self.ops
        source = ops.device_of(t)
        if source is None:
            return t
        event = event_of(t)
        if source == self.index:
            self._after(self.stream, t, event, source)
            # Made on another stream, read on ours: keep its memory from being reused
            # by the producer's stream until our work on it is done.
            ops.record_stream(t, self.stream)
            return t
        peer = self.peers.get(source)
        if peer is None:
            peer = self.peers[source] = ops.new_stream(source)
        self._after(peer, t, event, source)
        ops.record_stream(t, peer)
        return ops.peer_copy(t, self.index, peer)

    def _after(self, stream: Any, t: Any, event: Any, source: int) -> None:
        if event is not None:
            self.ops.wait_event(stream, event)
        else:
            # A device tensor from outside the engine: assume it was made on the default
            # stream, as code that does not manage streams does.
            self.ops.wait_stream(stream, self.ops.default_stream(source))

    def upload(self, value: Any) -> Any:
        """Copy the host tensors in ``value`` to this device (device tensors stay)."""
        ops = self.ops
        index = self.index

        def up(t: Any) -> Any:
            return ops.upload(t, index) if ops.device_of(t) is None else t

        return self._map(value, up)

    # -- outputs ---------------------------------------------------------------------
    def finish(self, value: Any) -> Any:
        """Hand an output on: to pinned host memory (synced here) or tagged with an event."""
        ops = self.ops
        if self.output == "host":
            moved = [False]

            def down(t: Any) -> Any:
                if ops.device_of(t) is None:
                    return t
                moved[0] = True
                return ops.download(t)

            out = self._map(value, down)
            if moved[0]:
                # The only host wait on the data path, and it is in this replica's thread.
                ops.synchronize_event(ops.record_event(self.stream))
            return out
        return self.tag(value, None)

    def tag(self, value: Any, event: Any) -> Any:
        """Attach ``event`` (a new one if None) to every device tensor of ``value``."""
        ops = self.ops
        tensors: list[Any] = []
        self._map(value, lambda t: tensors.append(t) if ops.device_of(t) is not None else None)
        if tensors:
            event = event if event is not None else ops.record_event(self.stream)
            for t in tensors:
                setattr(t, EVENT_ATTR, event)
        return value

    def drain(self) -> None:
        """Wait until everything queued on this replica's streams has run."""
        self.ops.synchronize_stream(self.stream)
        for peer in self.peers.values():
            self.ops.synchronize_stream(peer)


class _DeviceBody:
    """The body as a CUDA replica calls it: inputs onto the device, outputs handed on."""

    def __init__(self, fn: Callable[..., Any], state: _DeviceState, generator: bool) -> None:
        self.fn = fn
        self.state = state
        self.generator = generator
        # teardown() is looked up on ``__wrapped__``; keep pointing at the user's object.
        self.__wrapped__ = getattr(fn, "__wrapped__", fn)

    def __call__(self, value: Any, **kw: Any) -> Any:
        state = self.state
        out = self.fn(state.upload(state.accept(value)), **kw)
        if self.generator:
            return self._each(out)
        return state.finish(out)

    def _each(self, gen: Iterator[Any]) -> Iterator[Any]:
        try:
            for out in gen:
                yield self.state.finish(out)
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()

    def batch(self, batch: Batch, values: list[Any], kw: dict[str, Any]) -> list[Any]:
        from .._batching import collate, split

        state = self.state
        # Collate on the host when the items are host tensors, then one copy for the batch.
        x = state.upload(collate(batch, [state.accept(v) for v in values]))
        out = self.fn(x, **kw)
        if state.output == "host":
            return split(batch, state.finish(out), len(values))
        parts = split(batch, out, len(values))
        # Views made by split do not inherit attributes: tag each with one shared event.
        event = state.ops.record_event(state.stream)
        return [state.tag(p, event) for p in parts]


class CudaReplica(ThreadReplica):
    """A replica on one CUDA device with its own thread and its own stream.

    Args:
        node: the node.
        index: which replica this is.
        backend: the event loop's backend.
        owns_setup: run a shared body's ``setup()``/``teardown()`` here.
        intra_op_threads: torch CPU threads for this replica's thread.
        device: the CUDA device index.
        output: ``"host"`` (outputs copied to pinned host memory, synchronised in this
            thread) or ``"device"`` (outputs stay on the device and carry an event).
        stream: ``"own"`` (a stream per replica) or ``"default"`` (the device's default
            stream, for comparisons only: it serialises copies and compute).
        ops: the CUDA operations (a fake in tests).
    """

    def __init__(
        self,
        node: Node,
        index: int,
        backend: Backend,
        *,
        owns_setup: bool,
        intra_op_threads: int | None,
        device: int = 0,
        output: str = "host",
        stream: str = "own",
        ops: DeviceOps | None = None,
    ) -> None:
        super().__init__(
            node, index, backend, owns_setup=owns_setup, intra_op_threads=intra_op_threads
        )
        if output not in OUTPUT_MODES:
            raise GraphError(
                f"node {node.name!r}: cuda_output must be 'host' or 'device', got {output!r}",
                nodes=(node.name,),
            )
        if stream not in STREAM_MODES:
            raise GraphError(
                f"node {node.name!r}: cuda_stream must be 'own' or 'default', got {stream!r}",
                nodes=(node.name,),
            )
        self.device = device
        self.output = output
        self.stream_mode = stream
        self.ops = ops
        self.state: _DeviceState | None = None
        self.thread_id: int | None = None
        self._init_error: BaseException | None = None

    @classmethod
    def from_node(
        cls, node: Node, index: int, backend: Backend, intra_op_threads: int | None
    ) -> CudaReplica:
        """The factory registered for placement ``"cuda"`` (also ``"cuda:N"``, and
        ``"auto"`` on a GPU machine); reads the node options ``cuda_output`` and
        ``cuda_stream``."""
        return cls(
            node,
            index,
            backend,
            owns_setup=index == 0,
            intra_op_threads=intra_op_threads,
            device=device_index(resolve(node)),
            output=str(node.options.get("cuda_output", "host")),
            stream=str(node.options.get("cuda_stream", "own")),
        )

    def thread_init(self) -> None:
        """Make the device current and install this replica's stream, in its thread."""
        self.thread_id = threading.get_ident()
        try:
            super().thread_init()
            ops = self.ops if self.ops is not None else _ops()
            self.state = _DeviceState(ops, self.device, self.output, self.stream_mode)
        except BaseException as exc:
            # The thread must keep serving its queue, or start() would wait forever:
            # keep the error and raise it from start().
            self._init_error = exc

    async def start(self) -> None:
        """Start the thread, build the body, move a module body to the device.

        Raises:
            Exception: what CUDA initialisation, the constructor or ``setup()`` raised.
        """
        await super().start()
        self.body = await self._run(self._bind, self.body)

    def _bind(self, body: Callable[..., Any]) -> _DeviceBody:
        if self._init_error is not None:
            raise self._init_error
        state = self.state
        assert state is not None
        target = getattr(body, "__wrapped__", body)
        if _is_module(target):
            state.ops.place_module(target, self.device)
            # Weights are written once, before any other stream reads them.
            state.ops.synchronize_stream(state.stream)
        return _DeviceBody(body, state, self.node.info.mode == "generator")

    async def call_batch(self, batch: Batch, values: list[Any], kw: dict[str, Any]) -> list[Any]:
        body = self.body
        assert isinstance(body, _DeviceBody)
        return await self._run(body.batch, batch, values, kw)  # type: ignore[no-any-return]

    async def stop(self) -> None:
        """Wait for this replica's streams, tear the body down, join the thread."""
        if self._thread is not None and self.state is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await self._run(self.state.drain)
                except Exception:  # a failing sync must not keep the thread alive
                    pass
        await super().stop()


def _is_module(obj: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)
