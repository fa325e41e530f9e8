"""Model-stage splitting (pipeline parallelism): outputs equal the unsplit model, stages
are balanced and placed as asked, and bad input is a clear error."""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import pytest
import torch
from torch import nn

import dataflow as df
from dataflow.graph import _placement
from dataflow.nodes import blocks_of, partition, split_stages


def _mlp(blocks: int = 6, dim: int = 8, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(blocks // 2):
        layers += [nn.Linear(dim, dim), nn.Tanh()]
    return nn.Sequential(*layers)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


def _graph(chain: df.Chain) -> df.Graph:
    return df.Graph("split", chain)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolve placements as on a CPU-only machine, whatever this one has."""
    monkeypatch.setattr(_placement, "cuda_device_count", lambda: 0)


# -- outputs equal the unsplit module -------------------------------------------------


def _stage_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dataflow:stage")]


@pytest.mark.anyio
async def test_split_points_give_the_unsplit_output(no_gpu: None) -> None:
    model = _mlp()
    chain = split_stages(model, split_points=[2, 4])
    assert [n.name for n in chain] == ["stage.0", "stage.1", "stage.2"]
    x = torch.randn(5, 8)
    async with df.Engine(_graph(chain)) as engine:
        assert len(_stage_threads()) == 3  # one long-lived thread per stage
        out = await engine.run(x)
    assert _stage_threads() == []
    torch.testing.assert_close(out, _reference(model, x))


@pytest.mark.anyio
@pytest.mark.parametrize(("option", "value"), [("micro_batches", 4), ("micro_batch", 3)])
async def test_micro_batches_stream_through_and_merge_in_order(
    no_gpu: None, option: str, value: int
) -> None:
    model = _mlp()
    chain = split_stages(model, stages=3, **{option: value})
    names = [n.name for n in chain]
    assert names[0] == "stage.split" and names[-1] == "stage.merge"
    x = torch.randn(10, 8)  # 10 rows: micro-batches of unequal size either way
    async with df.Engine(_graph(chain)) as engine:
        out = await engine.run(x)
        stats = engine.stats()
    torch.testing.assert_close(out, _reference(model, x))
    # Four micro-batches either way: 10 rows in 4 parts, or ceil(10 / 3) parts of 3 rows.
    assert stats["nodes"]["stage.1"]["items_in"] == 4


@pytest.mark.anyio
async def test_concurrent_requests_never_mix_micro_batches(no_gpu: None) -> None:
    model = _mlp()
    chain = split_stages(model, stages=2, micro_batches=3)
    inputs = [torch.randn(6, 8) + i for i in range(40)]
    results: dict[int, torch.Tensor] = {}
    async with df.Engine(_graph(chain)) as engine:

        async def one(i: int) -> None:
            results[i] = await engine.run(inputs[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(inputs)):
                tg.start_soon(one, i)
    for i, x in enumerate(inputs):
        torch.testing.assert_close(results[i], _reference(model, x))


@pytest.mark.anyio
async def test_stages_work_on_different_micro_batches_at_once(no_gpu: None) -> None:
    m = 4
    started = [threading.Event() for _ in range(m)]

    class First(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            started[int(x[0, 0])].set()
            return x

    class Second(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            j = int(x[0, 0])
            # Finishing micro-batch j waits until stage 0 has begun j + 1: only a
            # pipeline whose stages run at the same time gets past this.
            if j + 1 < m and not started[j + 1].wait(timeout=30):
                raise RuntimeError(f"stage 0 never started micro-batch {j + 1}")
            return x

    chain = split_stages(nn.Sequential(First(), Second()), stages=2, micro_batches=m)
    x = torch.arange(m, dtype=torch.float32).reshape(m, 1)
    async with df.Engine(_graph(chain)) as engine:
        assert torch.equal(await engine.run(x), x)


class _Blocks(nn.Module):
    """A model holding its blocks in a ModuleList and applying them in order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class _ReluLinear(nn.Module):
    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.layer(x))


@pytest.mark.anyio
async def test_module_with_a_block_list(no_gpu: None) -> None:
    model = _Blocks()
    # The blocks of a ModuleList run one after another; wrap each with its activation.
    wrapped = nn.Sequential(*(_ReluLinear(layer) for layer in model.layers))
    chain = split_stages(wrapped, stages=2)
    x = torch.randn(3, 4)
    async with df.Engine(_graph(chain)) as engine:
        out = await engine.run(x)
    torch.testing.assert_close(out, _reference(model, x))
    assert [name for name, _ in blocks_of(model)] == ["0", "1", "2", "3"]


# -- balancing and placement ----------------------------------------------------------


def test_partition_minimises_the_slowest_stage() -> None:
    assert partition([1, 1, 1, 1, 4], 2) == [4]
    assert partition([3, 1, 1, 1], 2) == [1]
    assert partition([1] * 6, 3) == [2, 4]
    assert partition([5, 1, 1, 1, 1, 1, 5], 3) == [1, 6]
    assert partition([2, 2], 1) == []


def test_stages_balance_parameter_counts(no_gpu: None) -> None:
    big, small = nn.Linear(32, 32), nn.Linear(4, 4)
    model = nn.Sequential(
        nn.Linear(32, 4), small, nn.Linear(4, 4), nn.Linear(4, 32), big, nn.Linear(32, 32)
    )
    chain = split_stages(model, stages=2)
    first, second = (list(n.body) for n in chain)
    assert first[-1] is big and second == [model[5]]


class _Sleep(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)  # simulated work, not synchronisation (intended)
        return x


def test_stages_balance_measured_time(no_gpu: None) -> None:
    model = nn.Sequential(_Sleep(0.001), _Sleep(0.001), _Sleep(0.001), _Sleep(0.012))
    chain = split_stages(model, stages=2, balance="time", sample=torch.zeros(1))
    assert [len(n.body) for n in chain] == [3, 1]
    with pytest.raises(df.GraphError, match="sample"):
        split_stages(model, stages=2, balance="time")


def test_each_stage_is_an_infer_node_on_one_thread(no_gpu: None) -> None:
    chain = split_stages(_mlp(), stages=3)
    for node in chain:
        assert node.kind == "infer"
        assert node.placement == "thread"
        assert node.threads == 1
        assert "cuda_output" not in node.options


def test_gpu_stages_hand_tensors_over_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_placement, "cuda_device_count", lambda: 2)
    chain = split_stages(_mlp(), stages=3, micro_batches=2)
    stages = [n for n in chain if n.kind == "infer"]
    assert [n.placement for n in stages] == ["cuda:0", "cuda:0", "cuda:1"]
    # Between GPU stages tensors stay on the device; the last stage gives host tensors.
    assert [n.options.get("cuda_output", "host") for n in stages] == ["device", "device", "host"]
    mixed = split_stages(_mlp(), split_points=[2], placements=["cuda:0", "thread"])
    assert [n.options.get("cuda_output", "host") for n in mixed] == ["host", "host"]


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("points", "message"),
    [
        (["nope"], "'nope' is not a block"),
        ([0], "does not exist"),
        ([6], "does not exist"),
        ([4, 2], "must increase"),
        ([2, 2], "must increase"),
        ([1.5], "index or name"),
    ],
)
def test_split_points_that_do_not_exist(points: list[Any], message: str) -> None:
    with pytest.raises(df.GraphError, match=message):
        split_stages(_mlp(), split_points=points)


def test_split_points_by_name() -> None:
    model = nn.Sequential()
    model.add_module("embed", nn.Linear(2, 2))
    model.add_module("body", nn.Linear(2, 2))
    model.add_module("head", nn.Linear(2, 2))
    chain = split_stages(model, split_points=["body", "head"], placements="thread")
    assert [list(dict(n.body.named_children())) for n in chain] == [["embed"], ["body"], ["head"]]


def test_more_stages_than_blocks() -> None:
    with pytest.raises(df.GraphError, match="cannot make 7 stages from 6 block"):
        split_stages(_mlp(), stages=7)


def test_misuse_is_a_graph_error() -> None:
    with pytest.raises(df.GraphError, match="exactly one of stages= or split_points="):
        split_stages(_mlp())
    with pytest.raises(df.GraphError, match="3 placements for 2 stages"):
        split_stages(_mlp(), stages=2, placements=["thread"] * 3)
    with pytest.raises(df.GraphError, match="balance must be"):
        split_stages(_mlp(), stages=2, balance="flops")
    with pytest.raises(df.GraphError, match="micro_batches must be an int >= 1"):
        split_stages(_mlp(), stages=2, micro_batches=0)
    with pytest.raises(df.GraphError, match="micro_batch must be an int >= 1"):
        split_stages(_mlp(), stages=2, micro_batch=2.5)  # type: ignore[arg-type]


def test_weights_outside_the_block_list_are_refused() -> None:
    class WithHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.head = nn.Linear(2, 1)

    with pytest.raises(df.GraphError, match=r"outside its block list.*nn\.Sequential"):
        split_stages(WithHead(), stages=2)


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 1e6).any()):
            raise ValueError("poisoned input")
        return x


@pytest.mark.anyio
async def test_a_failing_stage_is_named_and_the_engine_keeps_serving(no_gpu: None) -> None:
    model = nn.Sequential(nn.Identity(), nn.Identity(), _Boom(), nn.Identity())
    chain = split_stages(model, split_points=[2], micro_batches=2)
    bad = torch.zeros(4, 2)
    bad[3, 0] = 1e9  # only the second micro-batch is poisoned
    async with df.Engine(_graph(chain)) as engine:
        with pytest.raises(df.NodeError, match="poisoned input") as info:
            await engine.run(bad)
        assert info.value.node == "stage.1"
        assert isinstance(info.value.__cause__, ValueError)
        good = torch.ones(4, 2)
        torch.testing.assert_close(await engine.run(good), good)
        requests = engine.stats()["requests"]
    assert requests["failed"] == 1 and requests["succeeded"] == 1


@pytest.mark.anyio
async def test_more_micro_batches_than_rows_fails_that_request(no_gpu: None) -> None:
    chain = split_stages(_mlp(), stages=2, micro_batches=4)
    async with df.Engine(_graph(chain)) as engine:
        with pytest.raises(df.NodeError, match="3 rows cannot be split into 4") as info:
            await engine.run(torch.randn(3, 8))
        assert info.value.node == "stage.split"
        assert (await engine.run(torch.randn(4, 8))).shape == (4, 8)
