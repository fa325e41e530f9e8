"""Continuous batching (``df.generate``): joining, leaving, sampling, parking, decoding.

The step models here are toys whose next-token logits are a fixed function of the last
token, and which record every call, so a test can count the steps each sequence got.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

import dataflow as df

pytestmark = pytest.mark.anyio

VOCAB = 32
# Logits as a function of the last token: soft enough that sampling varies with the seed.
TABLE = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)) * 2


class Toy:
    """``logits = TABLE[last % VOCAB]``; records prefills, steps per sequence and frees.

    A sequence is keyed by its prompt (tuple), so counts survive slot reuse.
    """

    def __init__(
        self,
        max_batch: int,
        *,
        delay: float = 0.0,
        fail_prefill: int | None = None,
        fail_step: int | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.delay = delay
        self.fail_prefill = fail_prefill
        self.fail_step = fail_step
        self.key: dict[int, tuple[int, ...]] = {}
        self.steps: Counter[tuple[int, ...]] = Counter()
        self.freed: list[tuple[int, ...]] = []
        self.widest = 0

    def prefill(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        assert 0 <= slot < self.max_batch and slot not in self.key, slot
        if self.fail_prefill is not None and self.fail_prefill in prompt:
            raise ValueError("poisoned prompt")
        self.key[slot] = tuple(prompt)
        return TABLE[prompt[-1] % VOCAB].clone()

    def step(self, slots: Sequence[int], last: Sequence[int]) -> torch.Tensor:
        assert len(slots) <= self.max_batch and all(s in self.key for s in slots)
        if self.delay:
            import time

            time.sleep(self.delay)  # simulated work (intended)
        if self.fail_step is not None and self.fail_step in last:
            raise RuntimeError("poisoned step")
        self.widest = max(self.widest, len(slots))
        for s in slots:
            self.steps[self.key[s]] += 1
        return TABLE[torch.tensor(list(last)) % VOCAB]

    def free(self, slot: int) -> None:
        self.freed.append(self.key.pop(slot))


class Script:
    """Plays back ``text``'s UTF-8 bytes whatever the prompt (byte vocabulary)."""

    def __init__(self, max_batch: int, text: str) -> None:
        self.data = text.encode("utf-8")
        self.pos = [0] * max_batch

    def _logits(self, slot: int) -> torch.Tensor:
        out = torch.zeros(256)
        out[self.data[self.pos[slot] % len(self.data)]] = 10.0
        return out

    def prefill(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        self.pos[slot] = 0
        return self._logits(slot)

    def step(self, slots: Sequence[int], last: Sequence[int]) -> torch.Tensor:
        for s in slots:
            self.pos[s] += 1
        return torch.stack([self._logits(s) for s in slots])

    def free(self, slot: int) -> None:
        self.pos[slot] = 0


def toy_node(models: list[Toy], *, placement: str = "thread", **options: Any) -> df.Node:
    """A ``generate`` node named "gen" over :class:`Toy`; each model built is appended to
    ``models``."""
    toy_opts = {k: options.pop(k) for k in ("delay", "fail_prefill", "fail_step") if k in options}

    def factory(max_batch: int) -> Toy:
        model = Toy(max_batch, **toy_opts)
        models.append(model)
        return model

    return df.generate(factory, name="gen", placement=placement, **options)


async def collect(engine: df.Engine, prompt: Any, **params: Any) -> list[Any]:
    return [tok async for tok in engine.stream(prompt, **params)]


def reference(node: df.Node, prompt: Any, **params: Any) -> list[Any]:
    """The same request generated alone, unbatched, by the node's body."""
    return list(node.body()(prompt, **params))


async def test_batched_tokens_equal_unbatched_reference() -> None:
    models: list[Toy] = []
    node = toy_node(models, max_batch=4, max_new_tokens=12)
    requests = [
        ([i, i + 1], {"temperature": t, "seed": i, "top_k": k})
        for i, (t, k) in enumerate([(0.0, 0), (1.0, 0), (0.7, 5), (1.5, 1), (1.0, 3)] * 2)
    ]
    results: dict[int, list[Any]] = {}
    async with df.Engine(df.Graph("g", node)) as engine, anyio.create_task_group() as tg:
        for n, (prompt, params) in enumerate(requests):

            async def one(n: int = n, prompt: Any = prompt, params: Any = params) -> None:
                results[n] = await collect(engine, prompt, **params)

            tg.start_soon(one)
    for n, (prompt, params) in enumerate(requests):
        assert results[n] == reference(node, prompt, max_new_tokens=12, **params), n
        assert len(results[n]) == 12
    assert models[0].widest == 4  # ran batched, capped at max_batch


async def test_same_seed_same_output_alone_and_batched_with_others() -> None:
    models: list[Toy] = []
    node = toy_node(models, max_batch=8, temperature=1.0, max_new_tokens=20)
    async with df.Engine(df.Graph("g", node)) as engine:
        alone = await collect(engine, [7], seed=42)
        crowd: dict[int, list[Any]] = {}
        async with anyio.create_task_group() as tg:
            for i in range(6):

                async def other(i: int = i) -> None:
                    crowd[i] = await collect(engine, [i], seed=1000 + i)

                tg.start_soon(other)

            async def target() -> None:
                crowd[-1] = await collect(engine, [7], seed=42)

            tg.start_soon(target)
        other_seed = await collect(engine, [7], seed=43)
    assert crowd[-1] == alone
    assert other_seed != alone  # the seed matters (fixed seeds: not a flaky coincidence)
    assert models[0].widest >= 2


async def test_requests_join_between_steps_up_to_max_batch() -> None:
    models: list[Toy] = []
    node = toy_node(models, max_batch=3, max_new_tokens=6, temperature=0.0)
    async with df.Engine(df.Graph("g", node)) as engine:
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(collect, engine, [i])
        stats = engine.stats()
    node_stats = stats["nodes"]["gen"]
    assert max(node_stats["batch_sizes"]) == 3
    assert models[0].widest == 3
    assert stats["requests"]["succeeded"] == 10
    assert sorted(models[0].freed) == sorted((i,) for i in range(10))  # every slot freed


async def test_engine_run_returns_every_token() -> None:
    node = toy_node([], max_new_tokens=5, temperature=0.0)
    async with df.Engine(df.Graph("g", node)) as engine:
        out = await engine.run([3])
    assert out == reference(node, [3], max_new_tokens=5, temperature=0.0)


@pytest.mark.parametrize("placement", ["loop", "thread"])
async def test_cancelled_stream_leaves_at_next_step_and_frees_slot(placement: str) -> None:
    models: list[Toy] = []
    node = toy_node(
        models,
        placement=placement,
        max_new_tokens=100_000,
        max_new_tokens_limit=100_000,
        temperature=0.0,
    )
    async with df.Engine(df.Graph("g", node), stream_buffer=100_000) as engine:
        stream = engine.stream([5])
        for _ in range(3):
            await anext(stream)
        model = models[0]
        steps_at_cancel = model.steps[(5,)]
        await stream.aclose()
        # Another request running to the end takes the worker through several ticks.
        await collect(engine, [6], max_new_tokens=4)
        stats = engine.stats()
    # A tick already running in the thread may finish; none starts for it afterwards.
    extra = 0 if placement == "loop" else 1
    assert steps_at_cancel <= model.steps[(5,)] <= steps_at_cancel + extra
    assert (5,) in model.freed
    assert stats["requests"]["cancelled"] == 1
    assert stats["nodes"]["gen"]["cancelled"] == 1


async def test_deadline_ends_generation_and_frees_slot() -> None:
    models: list[Toy] = []
    node = toy_node(models, max_new_tokens=100_000, max_new_tokens_limit=100_000, delay=0.002)
    async with df.Engine(df.Graph("g", node)) as engine:
        with pytest.raises(TimeoutError):
            async for _ in engine.stream([9], timeout=0.05):
                pass
        steps = models[0].steps[(9,)]
        await collect(engine, [8], max_new_tokens=3)
        stats = engine.stats()
    assert models[0].steps[(9,)] <= steps + 1
    assert (9,) in models[0].freed
    assert stats["requests"]["timed_out"] == 1


async def test_slow_reader_parks_only_its_own_sequence() -> None:
    models: list[Toy] = []
    node = toy_node(models, max_new_tokens=40, temperature=0.0)
    async with df.Engine(df.Graph("g", node), stream_buffer=2) as engine:
        slow = engine.stream([1])
        first = await anext(slow)
        with anyio.fail_after(10):
            fast = await collect(engine, [2])
        assert len(fast) == 40
        # The slow stream holds stream_buffer unread outputs and stepped no further:
        # its first token came from the prefill, one step per output after that.
        model = models[0]
        assert model.steps[(1,)] == 2
        rest = [tok async for tok in slow]
    assert [first, *rest] == reference(node, [1], max_new_tokens=40, temperature=0.0)
    assert model.steps[(1,)] == 39


async def test_eos_ends_sequence_without_emitting_it() -> None:
    ref = reference(df.generate(Toy, temperature=0.0, max_new_tokens=30), [4])
    eos = ref[5]
    node = df.generate(Toy, temperature=0.0, max_new_tokens=30, eos=eos)
    async with df.Engine(df.Graph("g", node)) as engine:
        out = await collect(engine, [4])
    assert out == ref[: ref.index(eos)]


TEXT = "héllo wörld → 😀 done. STOP here"


def script_node(**options: Any) -> df.Node:
    return df.generate(
        lambda max_batch: Script(max_batch, TEXT),
        name="script",
        decode="bytes",
        temperature=0.0,
        **options,
    )


async def test_utf8_chunks_never_split_a_character() -> None:
    node = script_node(max_new_tokens=len(TEXT.encode()))
    async with df.Engine(df.Graph("g", node)) as engine:
        chunks = await collect(engine, "x")
    assert "".join(chunks) == TEXT
    assert all(isinstance(c, str) and c and "\ufffd" not in c for c in chunks)
    # Multi-byte characters took several tokens but arrive whole, in one chunk each.
    assert "😀" in chunks and "é" in "".join(chunks[1:2])


async def test_stop_sequences_end_text_and_are_not_emitted() -> None:
    node = script_node(max_new_tokens=200)
    async with df.Engine(df.Graph("g", node)) as engine:
        stopped = await collect(engine, "x", stop=["STOP", "never"])
        across = await collect(engine, "x", stop="d → 😀")  # spans multi-byte tokens
        missing = await collect(engine, "x", stop="wörlds", max_new_tokens=len(TEXT.encode()))
    assert "".join(stopped) == TEXT[: TEXT.index("STOP")]
    assert "".join(across) == TEXT[: TEXT.index("d → 😀")]
    # A prefix of a stop sequence is held back, then released when it does not complete.
    assert "".join(missing) == TEXT


async def test_bad_parameters_fail_only_that_request() -> None:
    models: list[Toy] = []
    node = toy_node(models, max_new_tokens=30, max_new_tokens_limit=1000, delay=0.001)
    bad: list[tuple[Any, dict[str, Any]]] = [
        ([1], {"max_new_tokens": 0}),
        ([1], {"max_new_tokens": -3}),
        ([1], {"max_new_tokens": 10**9}),
        ([1], {"max_new_tokens": 2.5}),
        ([1], {"max_new_tokens": True}),
        ([1], {"temperature": -0.1}),
        ([1], {"temperature": math.nan}),
        ([1], {"temperature": "hot"}),
        ([1], {"top_k": -1}),
        ([1], {"seed": -1}),
        ([1], {"seed": "x"}),
        ([1], {"stop": "x"}),  # a token node has no text to stop on
        ([], {}),
        ("", {}),
        ([1, -2], {}),
        (3.5, {}),
    ]
    async with df.Engine(df.Graph("g", node)) as engine:
        async with anyio.create_task_group() as tg:
            good: list[Any] = []

            async def run_good() -> None:
                good.extend(await collect(engine, [2], temperature=0.0))

            tg.start_soon(run_good)
            for prompt, params in bad:
                with pytest.raises(df.InvalidRequest, match="gen"):
                    await engine.run(prompt, **params)
        with pytest.raises(df.InvalidRequest, match="unknown_option"):
            await engine.run([1], unknown_option=1)
        stats = engine.stats()
    assert good == reference(node, [2], max_new_tokens=30, temperature=0.0)
    assert stats["requests"]["failed"] == len(bad)


async def test_text_node_rejects_bad_stop_values() -> None:
    node = script_node(max_new_tokens=5)
    async with df.Engine(df.Graph("g", node)) as engine:
        for stop in (5, [1], [""], ["a"] * 100):
            with pytest.raises(df.InvalidRequest, match="stop"):
                await engine.run("x", stop=stop)
        assert "".join(await engine.run("x")) == TEXT.encode()[:5].decode()


async def test_model_failures_are_isolated() -> None:
    models: list[Toy] = []
    node = toy_node(models, max_new_tokens=8, temperature=0.0, fail_prefill=13)
    async with df.Engine(df.Graph("g", node)) as engine:
        with pytest.raises(df.NodeError, match="poisoned prompt") as info:
            await engine.run([13])
        assert info.value.node == "gen"
        assert len(await engine.run([12])) == 8
        stats = engine.stats()
    assert stats["requests"]["failed"] == 1
    assert stats["nodes"]["gen"]["failed"] == 1


async def test_step_failure_fails_the_sequences_in_that_step_only() -> None:
    plain = df.generate(Toy, temperature=0.0, max_new_tokens=8)
    poison = reference(plain, [3])[2]
    # A prompt whose greedy continuation never feeds the poisoned token to a step.
    safe = next(p for p in range(VOCAB) if poison not in reference(plain, [p])[:7])
    models: list[Toy] = []
    node = toy_node(models, max_new_tokens=8, temperature=0.0, fail_step=poison)
    async with df.Engine(df.Graph("g", node)) as engine:
        with pytest.raises(df.NodeError, match="poisoned step"):
            await engine.run([3])
        assert await engine.run([safe]) == reference(plain, [safe])
    assert (3,) in models[0].freed


async def test_replicas_each_run_their_own_batch() -> None:
    models: list[Toy] = []
    node = toy_node(models, replicas=2, max_batch=2, max_new_tokens=5, temperature=0.0)
    async with df.Engine(df.Graph("g", node)) as engine:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(collect, engine, [i])
        stats = engine.stats()
    assert len(models) == 2
    assert stats["requests"]["succeeded"] == 8
    assert sum(len(m.freed) for m in models) == 8


def test_generate_options_are_checked_before_running() -> None:
    with pytest.raises(df.GraphError, match="max_batch"):
        df.generate(Toy, max_batch=0)
    with pytest.raises(df.GraphError, match="unknown option"):
        df.generate(Toy, batch_size=4)
    with pytest.raises(df.GraphError, match="temperature"):
        df.generate(Toy, temperature=-1)
    with pytest.raises(df.GraphError, match="decode"):
        df.generate(Toy, decode="latin-1")
    with pytest.raises(df.GraphError, match="max_new_tokens"):
        df.generate(Toy, max_new_tokens=10, max_new_tokens_limit=5)


def test_generate_node_streams_and_declares_its_parameters() -> None:
    @df.generate(max_batch=4)
    class Model(Toy):
        pass

    assert Model.kind == "infer" and Model.name == "Model"
    assert Model.options["generation"].max_batch == 4
    assert {"max_new_tokens", "temperature", "top_k", "seed", "stop"} <= Model.info.params
    assert df.Graph("g", Model).plan().streaming


class BatchedToy(Toy):
    """:class:`Toy` with ``prefill_many``; records the size of each batched prefill."""

    def __init__(self, max_batch: int, **options: Any) -> None:
        super().__init__(max_batch, **options)
        self.prefill_batches: list[int] = []

    def prefill_many(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        if self.fail_prefill is not None and any(self.fail_prefill in p for p in prompts):
            raise ValueError("poisoned prompt")
        self.prefill_batches.append(len(slots))
        return torch.stack([self.prefill(s, p) for s, p in zip(slots, prompts, strict=True)])


async def test_joins_in_one_tick_use_prefill_many_and_fall_back_on_failure() -> None:
    models: list[BatchedToy] = []

    def factory(max_batch: int) -> BatchedToy:
        models.append(BatchedToy(max_batch, fail_prefill=13))
        return models[-1]

    node = df.generate(factory, name="gen", placement="thread", max_new_tokens=6)
    plain = df.generate(Toy, max_new_tokens=6)
    async with df.Engine(df.Graph("g", node)) as engine:
        prompts = [[p] for p in range(8)]
        async with anyio.create_task_group() as tg:
            out: dict[int, list[Any]] = {}

            async def one(p: list[int]) -> None:
                out[p[0]] = await engine.run(p, seed=p[0])

            for p in prompts:
                tg.start_soon(one, p)
        for p in prompts:
            assert out[p[0]] == reference(plain, p, seed=p[0])
        assert max(models[0].prefill_batches) > 1
        # A poisoned prompt in a batched prefill fails only its own request.
        results: dict[int, Any] = {}

        async def run(p: int) -> None:
            try:
                results[p] = await engine.run([p], temperature=0.0)
            except df.NodeError as exc:
                results[p] = exc

        async with anyio.create_task_group() as tg:
            for p in (12, 13, 14):
                tg.start_soon(run, p)
    assert isinstance(results[13], df.NodeError)
    assert results[12] == reference(plain, [12], temperature=0.0)
    assert results[14] == reference(plain, [14], temperature=0.0)


# -- several sequences of one request (issue 10, defect 6) ---------------------------------


async def _others_complete(engine: df.Engine, reference_out: list[Any]) -> None:
    """Five other requests run to the end while a stream nobody reads is open."""
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for i in range(5):

                async def other(i: int = i) -> None:
                    assert sorted(await collect(engine, [20 + i])) == reference_out[i]

                tg.start_soon(other)


@pytest.mark.parametrize(("placement", "replicas"), [("loop", 1), ("thread", 1), ("thread", 2)])
async def test_shard_into_generate_with_a_stopped_reader_stalls_nobody_else(
    placement: str, replicas: int
) -> None:
    models: list[Toy] = []
    gen = toy_node(
        models, placement=placement, replicas=replicas, max_new_tokens=60, temperature=0.0
    )
    split = df.shard(lambda x: [[x[0]], [x[0] + 1], [x[0] + 2]], name="split")
    refs = [[t for p in (20 + i, 21 + i, 22 + i) for t in reference(gen, [p])] for i in range(5)]
    async with df.Engine(df.Graph("g", split >> gen), stream_buffer=4) as engine:
        slow = engine.stream([1])
        first = await anext(slow)  # then stop reading
        await _others_complete(engine, [sorted(r) for r in refs])
        # Parked as a request: its three sequences together emitted what fits its stream.
        held = sum(m.steps[(p,)] for m in models for p in (1, 2, 3))
        assert held <= 4 + 3
        rest = [t async for t in slow]
    assert sorted([first, *rest]) == sorted(t for p in (1, 2, 3) for t in reference(gen, [p]))


@pytest.mark.parametrize("placement", ["loop", "thread"])
async def test_n_sequences_with_a_stopped_reader_stall_nobody_else(placement: str) -> None:
    models: list[Toy] = []
    gen = toy_node(models, placement=placement, max_new_tokens=50, temperature=1.0)
    async with df.Engine(df.Graph("g", gen), stream_buffer=3) as engine:
        slow = engine.stream([1], n=2, seed=7, details=True)
        first = await anext(slow)
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(5):

                    async def other(i: int = i) -> None:
                        chunks = await collect(engine, [20 + i], n=2, seed=i, details=True)
                        assert [c.index for c in chunks].count(1) == 50
                        assert [c.finish_reason for c in chunks].count("length") == 2

                    tg.start_soon(other)
        assert models[0].steps[(1,)] <= 3 + 2  # both sequences parked, as one request
        rest = [c async for c in slow]
    chunks = [first, *rest]
    for i in (0, 1):
        ids = [t for c in chunks if c.index == i for t in c.token_ids]
        assert ids == reference(gen, [1], seed=7 + i)


@pytest.mark.parametrize("n", [1, 2])
async def test_32_early_exits_in_a_row_free_their_slots(n: int) -> None:
    models: list[Toy] = []
    gen = toy_node(models, max_batch=2, max_new_tokens=1000, max_new_tokens_limit=1000)
    params: dict[str, Any] = {"n": n, "details": True} if n > 1 else {}
    async with df.Engine(df.Graph("g", gen), stream_buffer=2) as engine:
        with anyio.fail_after(30):
            for i in range(32):
                async with contextlib.aclosing(engine.stream([i], seed=i, **params)) as stream:
                    await anext(stream)
            assert len(await engine.run([99], max_new_tokens=5)) == 5
        stats = engine.stats()
    assert stats["requests"]["cancelled"] == 32
    assert len(models[0].freed) == 32 * n + 1


async def test_stopped_readers_holding_every_slot_give_them_up() -> None:
    models: list[Toy] = []
    gen = toy_node(models, max_batch=2, max_new_tokens=30, temperature=1.0)
    async with df.Engine(df.Graph("g", gen), stream_buffer=2) as engine:
        stalled = [engine.stream([i], seed=i) for i in (1, 2)]
        firsts = [await anext(s) for s in stalled]  # both parked, holding both slots
        with anyio.fail_after(10):
            others = [await engine.run([i], seed=i) for i in (3, 4, 5)]
        rests = [[t async for t in s] for s in stalled]
    assert others == [reference(gen, [i], seed=i) for i in (3, 4, 5)]
    # Evicted, then rebuilt by one prefill of prompt + tokens: the same text as unbatched.
    for i, first, rest in zip((1, 2), firsts, rests, strict=True):
        assert [first, *rest] == reference(gen, [i], seed=i)
    assert any(len(key) > 1 for key in models[0].freed)  # a slot rebuilt from its history


@pytest.mark.parametrize("seed", range(8))
async def test_random_mix_of_readers_all_end_right_and_free_every_slot(seed: int) -> None:
    """Streams and runs with n = 1..3, readers that stall until the others end or leave
    early, on a small batch and a small stream buffer: the others never wait for the
    stalled ones, every finished sequence equals its unbatched reference, and at the end
    no slot is held."""
    import random

    rng = random.Random(seed)
    models: list[Toy] = []
    gen = toy_node(models, max_batch=3, max_new_tokens=12, temperature=1.0)
    plan = [(rng.randint(1, 3), rng.choice(["run", "stream", "stall", "leave"])) for _ in range(12)]
    results: dict[int, list[Any]] = {}
    movers = sum(kind != "stall" for _, kind in plan)
    resume = anyio.Event()

    async def one(i: int, n: int, kind: str) -> None:
        nonlocal movers
        params: dict[str, Any] = {"seed": i, "n": n, "details": True}
        got: list[Any] = []
        if kind == "run":
            got = await engine.run([i], **params)
        else:
            async with contextlib.aclosing(engine.stream([i], **params)) as stream:
                async for chunk in stream:
                    got.append(chunk)
                    if kind == "stall" and len(got) == 1:
                        await resume.wait()  # stops reading until the others have ended
                    if kind == "leave" and len(got) == 3:
                        break
        if kind != "leave":
            results[i] = got
        if kind != "stall":
            movers -= 1
            if movers == 0:
                resume.set()

    async with df.Engine(df.Graph("g", gen), stream_buffer=2) as engine:
        if movers == 0:
            resume.set()
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i, (n, kind) in enumerate(plan):
                    tg.start_soon(one, i, n, kind)
        stats = engine.stats()
    assert stats["requests"]["in_flight"] == 0
    for i, chunks in results.items():
        n = plan[i][0]
        assert {c.index for c in chunks} == set(range(n)), (seed, i)
        for index in range(n):
            ids = [t for c in chunks if c.index == index for t in c.token_ids]
            assert ids == reference(gen, [i], seed=i + index), (seed, i, index)
            ends = [c.finish_reason for c in chunks if c.index == index]
            assert ends[-1] == "length" and ends.count("length") == 1
    assert models[0].key == {}  # every slot freed


def _every_fifth(token: int) -> Iterator[int]:
    if token % 5 == 0:
        yield token


@pytest.mark.parametrize("placement", ["loop", "thread"])
async def test_a_stream_through_a_sparser_node_after_generate_never_parks_forever(
    placement: str,
) -> None:
    """Parking counts the node's outputs against what the reader took, which only
    matches when the node feeds the stream itself: after a node that yields fewer
    outputs than tokens the count never comes back under the buffer, and the sequence
    used to park for good."""
    models: list[Toy] = []
    gen = toy_node(models, placement=placement, max_new_tokens=200, temperature=0.0)
    sparse = df.map(_every_fifth, name="sparse")
    expected = [t for t in reference(gen, [1]) if t % 5 == 0]
    assert len(expected) > 8  # more than the stream buffer
    async with df.Engine(df.Graph("g", gen >> sparse), stream_buffer=4) as engine:
        with anyio.fail_after(20):
            assert [t async for t in engine.stream([1])] == expected


@pytest.mark.parametrize("placement", ["loop", "thread"])
async def test_a_stopped_reader_behind_a_node_after_generate_parks_its_sequence(
    placement: str,
) -> None:
    """When the generate node is not the last one, its sequences park on the stream's
    own buffer: a reader that stops holds a bounded number of outputs (not every token
    up to max_new_tokens), and the others go on."""
    models: list[Toy] = []
    gen = toy_node(models, placement=placement, max_new_tokens=3000, temperature=0.0, capacity=4)
    ident = df.map(lambda t: t, name="ident", capacity=4)
    async with df.Engine(df.Graph("g", gen >> ident), stream_buffer=4) as engine:
        stalled = engine.stream([1])
        first = await anext(stalled)
        with anyio.fail_after(20):
            others = await engine.run([2], max_new_tokens=200)
        held = sum(m.steps[(1,)] for m in models)
        await stalled.aclose()
    assert others == reference(gen, [2], max_new_tokens=200)
    assert first == reference(gen, [1], max_new_tokens=1)[0]
    assert held <= 40  # buffer, channel and late outputs; it stepped on with the others before


async def test_node_stats_count_each_input_once_whatever_n() -> None:
    """An early exit from an ``n = 3`` stream is one cancelled input, not three: the
    node's stats balance against ``items_in`` (``succeeded`` used to clamp to 0)."""
    models: list[Toy] = []
    gen = toy_node(models, max_batch=8, max_new_tokens=50, temperature=1.0)
    async with df.Engine(df.Graph("g", gen)) as engine:
        for i in range(4):
            async with contextlib.aclosing(engine.stream([i], n=3, seed=i, details=True)) as stream:
                await anext(stream)
        done = await engine.run([9], n=3, seed=1, details=True, max_new_tokens=3)
        # The last run's ticks reaped the closed streams' sequences before it ended.
        stats = engine.stats()["nodes"]["gen"]
    assert len(done) == 9
    assert stats["items_in"] == 5
    assert stats["cancelled"] == 4 and stats["failed"] == 0
    assert stats["succeeded"] == 1


async def test_scheduled_at_is_when_a_waiting_request_got_its_slot() -> None:
    models: list[Toy] = []
    node = toy_node(models, max_batch=1, max_new_tokens=100_000, max_new_tokens_limit=100_000)
    async with df.Engine(df.Graph("g", node), stream_buffer=100_000) as engine:
        first = engine.stream([5])
        await anext(first)
        second = engine.stream([6])
        assert second.scheduled_at is None  # not submitted yet
        got = anyio.Event()

        async def read_second() -> None:
            await anext(second)
            got.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_second)
            while second.request_id is None:  # submitted: it waits for the only slot
                await anyio.lowlevel.checkpoint()
            assert second.scheduled_at is None
            freed = time.perf_counter()
            await first.aclose()  # frees the slot
            await got.wait()
        await second.aclose()
    assert first.scheduled_at is not None and second.scheduled_at is not None
    assert first.scheduled_at < freed <= second.scheduled_at
