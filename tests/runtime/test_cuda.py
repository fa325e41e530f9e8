"""CUDA placement.

Placement resolution and the replica's stream/event bookkeeping run everywhere, against a
fake :class:`DeviceOps` that logs which thread did what; the tests at the end run on a
real GPU and skip only where torch sees none.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import torch
from torch import nn

import dataflow as df
from dataflow.graph import _placement, resolve
from dataflow.runtime import current_backend
from dataflow.runtime.executors import CudaReplica, ThreadReplica, _cuda, make_replica
from dataflow.runtime.executors._cuda import EVENT_ATTR, device_index, event_of

# -- a fake device ----------------------------------------------------------------------


class FakeStream:
    def __init__(self, device: int, default: bool = False) -> None:
        self.device = device
        self.default = default

    def __repr__(self) -> str:
        return f"FakeStream({self.device}{', default' if self.default else ''})"


class FakeEvent:
    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream


def on_device(t: torch.Tensor, index: int) -> torch.Tensor:
    """Mark a CPU tensor as if it lived on fake device ``index``."""
    t._fake_device = index  # type: ignore[attr-defined]
    return t


def device_of(t: Any) -> int | None:
    return getattr(t, "_fake_device", None)


class FakeOps:
    """DeviceOps that computes on the CPU and logs (thread, op, *args) for every call."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.defaults: dict[int, FakeStream] = {}
        self.fail_on = fail_on

    def _note(self, op: str, *args: Any) -> None:
        if op == self.fail_on:
            raise RuntimeError(f"fake CUDA failure in {op}")
        self.log.append((threading.get_ident(), op, *args))

    def ops(self, name: str) -> list[tuple[Any, ...]]:
        return [entry for entry in self.log if entry[1] == name]

    def set_device(self, index: int) -> None:
        self._note("set_device", index)

    def new_stream(self, index: int) -> FakeStream:
        stream = FakeStream(index)
        self._note("new_stream", stream)
        return stream

    def default_stream(self, index: int) -> FakeStream:
        return self.defaults.setdefault(index, FakeStream(index, default=True))

    def use_stream(self, stream: Any) -> None:
        self._note("use_stream", stream)

    def record_event(self, stream: Any) -> FakeEvent:
        event = FakeEvent(stream)
        self._note("record_event", stream, event)
        return event

    def wait_event(self, stream: Any, event: Any) -> None:
        self._note("wait_event", stream, event)

    def wait_stream(self, stream: Any, other: Any) -> None:
        self._note("wait_stream", stream, other)

    def synchronize_event(self, event: Any) -> None:
        self._note("synchronize_event", event)

    def synchronize_stream(self, stream: Any) -> None:
        self._note("synchronize_stream", stream)

    def device_of(self, value: Any) -> int | None:
        return device_of(value) if isinstance(value, torch.Tensor) else None

    def is_tensor(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor)

    def upload(self, tensor: Any, index: int) -> Any:
        self._note("upload", index)
        return on_device(tensor.clone(), index)

    def download(self, tensor: Any) -> Any:
        self._note("download", device_of(tensor))
        return tensor.clone()

    def peer_copy(self, tensor: Any, index: int, via: Any) -> Any:
        self._note("peer_copy", device_of(tensor), index, via)
        return on_device(tensor.clone(), index)

    def record_stream(self, tensor: Any, stream: Any) -> None:
        self._note("record_stream", stream)

    def place_module(self, module: Any, index: int) -> None:
        self._note("place_module", module, index)


def _replica(
    node: df.Node,
    ops: FakeOps,
    *,
    index: int = 0,
    device: int = 0,
    output: str = "host",
) -> CudaReplica:
    return CudaReplica(
        node,
        index,
        current_backend(),
        owns_setup=index == 0,
        intra_op_threads=1,
        device=device,
        output=output,
        ops=ops,
    )


def _double(x: torch.Tensor) -> torch.Tensor:
    # What a kernel on the device would give: a new tensor on the input's device.
    return on_device(x * 2, device_of(x) or 0)


# -- placement resolution -------------------------------------------------------------


def test_device_index_of_a_placement() -> None:
    assert device_index("cuda") == 0
    assert device_index("cuda:0") == 0
    assert device_index("cuda:12") == 12
    for bad in ("thread", "cuda:", "cuda:x", "cuda:-1", "gpu:0"):
        with pytest.raises(ValueError, match="not a CUDA placement"):
            device_index(bad)


def test_auto_is_a_thread_without_a_gpu_and_cuda_with_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = df.infer(_double)
    monkeypatch.setattr(_placement, "cuda_device_count", lambda: 0)
    assert resolve(node) == "thread"
    monkeypatch.setattr(_placement, "cuda_device_count", lambda: 1)
    assert resolve(node) == "cuda:0"
    assert resolve(df.infer(_double, placement="cuda")) == "cuda:0"
    assert resolve(df.infer(_double, placement="cuda:3")) == "cuda:3"


def test_cuda_without_a_gpu_is_a_graph_error_naming_the_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_placement, "cuda_device_count", lambda: 0)
    for placement in ("cuda", "cuda:1"):
        graph = df.Graph("g", df.infer(_double, name="gpu_stage", placement=placement))
        with pytest.raises(df.GraphError, match=r"gpu_stage.*needs a CUDA GPU") as info:
            df.Engine(graph)
        assert info.value.nodes == ("gpu_stage",)
    monkeypatch.setattr(_placement, "cuda_device_count", lambda: 2)
    graph = df.Graph("g", df.infer(_double, name="gpu_stage", placement="cuda:2"))
    with pytest.raises(df.GraphError, match="only 2 CUDA device"):
        df.Engine(graph)


@pytest.mark.anyio
async def test_cuda_placements_make_cuda_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_placement, "cuda_device_count", lambda: 2)
    backend = current_backend()
    node = df.infer(_double, placement="cuda:1", options={"cuda_output": "device"})
    replica = make_replica(node, "cuda:1", 0, backend, intra_op_threads=1)
    assert isinstance(replica, CudaReplica) and isinstance(replica, ThreadReplica)
    assert (replica.device, replica.output, replica.stream_mode) == (1, "device", "own")
    auto = make_replica(df.infer(_double), "cuda:0", 1, backend, intra_op_threads=None)
    assert isinstance(auto, CudaReplica) and (auto.device, auto.output) == (0, "host")
    assert not auto.owns_setup
    bad = df.infer(_double, placement="cuda", options={"cuda_output": "gpu"})
    with pytest.raises(df.GraphError, match="cuda_output must be 'host' or 'device'"):
        make_replica(bad, "cuda:0", 0, backend, intra_op_threads=1)


# -- the replica's stream and event bookkeeping (fake device) ----------------------------


@pytest.mark.anyio
async def test_each_replica_makes_one_stream_in_its_own_thread_and_keeps_it() -> None:
    ops = FakeOps()
    node = df.infer(_double, placement="cuda", replicas=2)
    replicas = [_replica(node, ops, index=i) for i in range(2)]
    loop_thread = threading.get_ident()
    try:
        for r in replicas:
            await r.start()
        for _ in range(3):
            for r in replicas:
                await r.call(torch.ones(2), {})
    finally:
        for r in replicas:
            await r.stop()
    made = ops.ops("new_stream")
    assert len(made) == 2  # one per replica, not one per call
    assert {entry[0] for entry in made} == {r.thread_id for r in replicas}
    assert loop_thread not in {r.thread_id for r in replicas}
    for r, (thread, _, stream) in zip(replicas, made, strict=True):
        assert r.state is not None and r.state.stream is stream and thread == r.thread_id
        assert (thread, "use_stream", stream) in ops.log
        assert (thread, "set_device", 0) in ops.log


@pytest.mark.anyio
async def test_host_inputs_go_up_and_outputs_come_back_synced_off_the_loop() -> None:
    ops = FakeOps()
    replica = _replica(df.infer(_double, placement="cuda"), ops)
    await replica.start()
    try:
        out = await replica.call(torch.arange(3.0), {})
    finally:
        await replica.stop()
    assert torch.equal(out, torch.tensor([0.0, 2.0, 4.0]))
    assert device_of(out) is None and event_of(out) is None  # a host tensor, ready to read
    names = [entry[1] for entry in ops.log]
    call = names[names.index("upload") :]
    assert call[:4] == ["upload", "download", "record_event", "synchronize_event"]
    # Nothing device-related ever ran on the event loop's thread.
    assert {entry[0] for entry in ops.log} == {replica.thread_id}


@pytest.mark.anyio
async def test_device_outputs_carry_an_event_the_next_stage_waits_on() -> None:
    ops = FakeOps()
    first = _replica(df.infer(_double, name="a"), ops, output="device")
    second = _replica(df.infer(_double, name="b"), ops, output="host")
    await first.start()
    await second.start()
    try:
        mid = await first.call(torch.ones(2), {})
        assert device_of(mid) == 0
        event = event_of(mid)
        assert isinstance(event, FakeEvent)
        assert event.stream is first.state.stream  # type: ignore[union-attr]
        assert not ops.ops("synchronize_event")  # no host sync between GPU stages
        out = await second.call(mid, {})
    finally:
        await first.stop()
        await second.stop()
    assert torch.equal(out, torch.full((2,), 4.0))
    stream_b = second.state.stream  # type: ignore[union-attr]
    tb = second.thread_id
    assert (tb, "wait_event", stream_b, event) in ops.log
    assert (tb, "record_stream", stream_b) in ops.log
    assert [e for e in ops.ops("upload") if e[0] == tb] == []  # already on the device
    assert len(ops.ops("synchronize_event")) == 1  # only where the result leaves the GPU


@pytest.mark.anyio
async def test_a_tensor_from_another_gpu_is_copied_on_a_peer_stream() -> None:
    ops = FakeOps()
    replica = _replica(df.infer(_double), ops, device=1, output="device")
    await replica.start()
    try:
        produced = [FakeEvent(FakeStream(0)) for _ in range(2)]
        outs = []
        for event in produced:
            x = on_device(torch.ones(2), 0)
            setattr(x, EVENT_ATTR, event)
            outs.append(await replica.call(x, {}))
    finally:
        await replica.stop()
    peers = [e for e in ops.ops("new_stream") if e[2].device == 0]
    assert len(peers) == 1  # one long-lived stream per source device
    peer = peers[0][2]
    for event in produced:
        assert (replica.thread_id, "wait_event", peer, event) in ops.log
    assert ops.ops("peer_copy") == [(replica.thread_id, "peer_copy", 0, 1, peer)] * 2
    assert (replica.thread_id, "record_stream", peer) in ops.log
    assert all(device_of(o) == 1 and isinstance(event_of(o), FakeEvent) for o in outs)
    # Shutdown waits for the peer stream too.
    assert (replica.thread_id, "synchronize_stream", peer) in ops.log


@pytest.mark.anyio
async def test_a_device_tensor_without_an_event_waits_for_the_default_stream() -> None:
    ops = FakeOps()
    replica = _replica(df.infer(_double), ops)
    await replica.start()
    try:
        await replica.call(on_device(torch.ones(1), 0), {})
    finally:
        await replica.stop()
    stream = replica.state.stream  # type: ignore[union-attr]
    assert (replica.thread_id, "wait_stream", stream, ops.defaults[0]) in ops.log


@pytest.mark.anyio
@pytest.mark.parametrize("output", ["host", "device"])
async def test_batches_go_up_once_and_every_output_is_handed_on(output: str) -> None:
    ops = FakeOps()

    # Views of a real CUDA tensor are CUDA tensors; the fake marks them by hand.
    def split(out: torch.Tensor, n: int) -> list[torch.Tensor]:
        where = device_of(out)
        return [t if where is None else on_device(t, where) for t in out.unbind(0)]

    batch = df.Batch(max_size=4, split=split)
    node = df.infer(_double, batch=batch)
    replica = _replica(node, ops, output=output)
    await replica.start()
    try:
        values = [torch.full((2,), float(i)) for i in range(3)]
        outs = await replica.call_batch(batch, values, {})
    finally:
        await replica.stop()
    assert [o.tolist() for o in outs] == [[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]]
    assert len(ops.ops("upload")) == 1  # collated on the host, one copy for the batch
    if output == "host":
        assert len(ops.ops("synchronize_event")) == 1
        assert all(event_of(o) is None and device_of(o) is None for o in outs)
    else:
        assert not ops.ops("synchronize_event")
        events = {id(event_of(o)) for o in outs}
        assert len(events) == 1 and None not in {event_of(o) for o in outs}


@pytest.mark.anyio
async def test_generator_outputs_are_handed_on_one_by_one() -> None:
    ops = FakeOps()

    def count(x: torch.Tensor) -> Iterator[torch.Tensor]:
        for i in range(3):
            yield on_device(x + i, 0)

    replica = _replica(df.infer(count), ops)
    await replica.start()
    try:
        outs = [o async for o in replica.iterate(torch.zeros(1), {})]
    finally:
        await replica.stop()
    assert [o.item() for o in outs] == [0.0, 1.0, 2.0]
    assert len(ops.ops("download")) == 3 and len(ops.ops("synchronize_event")) == 3


@pytest.mark.anyio
async def test_a_module_moves_to_its_device_in_the_replica_thread() -> None:
    ops = FakeOps()
    module = nn.Linear(2, 2)
    replica = _replica(df.infer(module), ops, device=1)
    await replica.start()
    await replica.stop()
    assert ops.ops("place_module") == [(replica.thread_id, "place_module", module, 1)]
    names = [entry[1] for entry in ops.log]
    assert names.index("place_module") < names.index("synchronize_stream")


@pytest.mark.anyio
async def test_shutdown_syncs_the_stream_and_joins_the_thread() -> None:
    ops = FakeOps()
    replica = _replica(df.infer(_double, name="stopper"), ops)
    await replica.start()
    await replica.call(torch.ones(1), {})
    await replica.stop()
    stream = replica.state.stream  # type: ignore[union-attr]
    assert ops.log[-1] == (replica.thread_id, "synchronize_stream", stream)
    assert not [t for t in threading.enumerate() if t.name == "dataflow:stopper:0"]


@pytest.mark.anyio
async def test_a_device_that_fails_to_initialise_fails_start_without_hanging() -> None:
    ops = FakeOps(fail_on="new_stream")
    replica = _replica(df.infer(_double, name="broken"), ops)
    with anyio.fail_after(30):
        with pytest.raises(RuntimeError, match="fake CUDA failure in new_stream"):
            await replica.start()
        await replica.stop()
    assert not [t for t in threading.enumerate() if t.name == "dataflow:broken:0"]


class _Keep(nn.Module):
    """A block whose output stays on the (fake) device of its input, as a kernel's does."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = device_of(x)
        assert device is not None, "the stage received a host tensor"
        return on_device(self.layer(x), device)


@pytest.mark.anyio
async def test_a_pipeline_over_two_gpus_never_touches_cuda_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dataflow.nodes import split_stages

    ops = FakeOps()
    monkeypatch.setattr(_placement, "cuda_device_count", lambda: 2)
    monkeypatch.setattr(_cuda, "_default_ops", ops)
    torch.manual_seed(0)
    model = nn.Sequential(*(_Keep(nn.Linear(4, 4)) for _ in range(4)))
    chain = split_stages(model, stages=2, micro_batches=2)
    x = torch.randn(6, 4)
    async with df.Engine(df.Graph("gpus", chain)) as engine:
        out = await engine.run(x)
    with torch.inference_mode():
        expected = nn.Sequential(*(b.layer for b in model))(x)
    torch.testing.assert_close(out, expected)
    loop = threading.get_ident()
    assert all(entry[0] != loop for entry in ops.log)
    assert len(ops.ops("peer_copy")) == 2  # each micro-batch crosses from cuda:0 to cuda:1
    assert len(ops.ops("synchronize_event")) == 2  # only the last stage syncs, per micro-batch


# -- on a real GPU ----------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.anyio
async def test_gpu_pipeline_matches_a_float64_cpu_reference() -> None:
    from dataflow.nodes import split_stages

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(6)))
    reference = nn.Sequential(*(nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(6)))
    reference.load_state_dict(model.state_dict())
    reference.double()
    count = torch.cuda.device_count()
    placements = [f"cuda:{i * count // 3}" for i in range(3)]
    chain = split_stages(model, stages=3, placements=placements, micro_batches=4)
    inputs = [torch.randn(32, 64) for _ in range(8)]
    async with df.Engine(df.Graph("gpu", chain)) as engine:
        outs = [await engine.run(x) for x in inputs]
    with torch.inference_mode():
        for x, out in zip(inputs, outs, strict=True):
            assert out.device.type == "cpu"  # synchronised before the CPU reads it
            torch.testing.assert_close(out.double(), reference(x.double()), rtol=1e-4, atol=1e-5)


@gpu
@pytest.mark.anyio
async def test_gpu_replica_runs_on_its_own_stream() -> None:
    def which(x: torch.Tensor) -> tuple[int, int]:
        stream = torch.cuda.current_stream()
        return stream.cuda_stream, torch.cuda.default_stream().cuda_stream

    graph = df.Graph("s", df.infer(which, placement="cuda", replicas=2, ordered=False))
    async with df.Engine(graph) as engine:
        seen = {await engine.run(torch.ones(1)) for _ in range(8)}
    streams = {s for s, _ in seen}
    defaults = {d for _, d in seen}
    assert 1 <= len(streams) <= 2 and not streams & defaults


@gpu
@pytest.mark.anyio
async def test_gpu_stages_hand_over_on_the_device_without_losing_data() -> None:
    def heavy(x: torch.Tensor) -> torch.Tensor:
        for _ in range(20):  # long enough that a missing wait would read unfinished data
            x = torch.tanh(x @ x.T @ x / x.shape[0])
        return x

    first = df.infer(heavy, name="a", placement="cuda", options={"cuda_output": "device"})
    second = df.infer(lambda x: x.sum(dim=1), name="b", placement="cuda")
    inputs = [torch.randn(256, 256) for _ in range(6)]
    async with df.Engine(df.Graph("h", first >> second)) as engine:
        outs = [await engine.run(x) for x in inputs]
    for x, out in zip(inputs, outs, strict=True):
        expected = heavy(x.cuda()).sum(dim=1).cpu()
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
