"""Sampling in ``generate`` nodes: top-p, penalties, ``n`` sequences, logprobs, token
counts and finish reasons (``details=True`` outputs, ``df.Chunk``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
import torch

import dataflow as df
from dataflow.graph._generation import GenerationConfig, SamplingParams
from dataflow.runtime._sampling import Decoding, _top_p, sample

from .test_generation import Script

pytestmark = pytest.mark.anyio

VOCAB = 24
TABLE = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(1)) * 2


class Table:
    """``logits = TABLE[last token]``: the model's distribution is known exactly."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch

    def prefill(self, slot: int, prompt: Sequence[int]) -> torch.Tensor:
        return TABLE[prompt[-1] % VOCAB].clone()

    def step(self, slots: Sequence[int], last: Sequence[int]) -> torch.Tensor:
        return TABLE[torch.tensor(list(last)) % VOCAB]

    def free(self, slot: int) -> None:
        pass


def table_node(**options: Any) -> df.Node:
    options.setdefault("placement", "thread")
    return df.generate(Table, name="gen", max_batch=8, **options)


def script_node(text: str, **options: Any) -> df.Node:
    return df.generate(
        lambda max_batch: Script(max_batch, text),
        name="script",
        decode="bytes",
        temperature=0.0,
        **options,
    )


def reference(node: df.Node, prompt: Any, **params: Any) -> list[Any]:
    return list(node.body()(prompt, **params))


def by_index(chunks: list[df.Chunk]) -> dict[int, list[df.Chunk]]:
    out: dict[int, list[df.Chunk]] = {}
    for c in chunks:
        out.setdefault(c.index, []).append(c)
    return out


# -- top-p ---------------------------------------------------------------------------------


def nucleus_reference(logits: list[float], p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches ``p``."""
    z = max(logits)
    weights = [math.exp(x - z) for x in logits]
    total = sum(weights)
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    kept: set[int] = set()
    mass = 0.0
    for i in order:
        kept.add(i)
        mass += weights[i] / total
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_exactly_the_nucleus(p: float) -> None:
    x = TABLE[:4].clone()
    out = _top_p(x, [0, 2], [p, p], every=False)
    for row in range(4):
        kept = {i for i in range(VOCAB) if out[row, i] > -math.inf}
        if row in (0, 2):
            assert kept == nucleus_reference(x[row].tolist(), p), row
            assert torch.equal(out[row][list(kept)], x[row][list(kept)])  # unchanged logits
        else:
            assert torch.equal(out[row], x[row])  # rows without top_p are untouched


def decoding(**params: Any) -> Decoding:
    config = GenerationConfig(Table)
    defaults: dict[str, Any] = {"max_new_tokens": 100, "temperature": 1.0, "top_k": 0}
    defaults.update(params)
    seed = defaults.pop("seed", None)
    stop = defaults.pop("stop", ())
    return Decoding(config, SamplingParams(seed=seed, stop=stop, **defaults))


def test_top_p_sampling_draws_only_and_all_of_the_nucleus() -> None:
    logits = TABLE[1:2] / 2
    allowed = nucleus_reference(logits[0].tolist(), 0.5)
    seen = {sample(logits, [decoding(top_p=0.5, seed=s)])[0] for s in range(400)}
    assert seen == allowed
    assert len(allowed) > 1  # a real test of the distribution, not greedy by accident


def test_top_p_one_and_zero_penalties_are_exactly_the_default() -> None:
    logits = TABLE[:6]
    plain = [decoding(seed=i) for i in range(6)]
    explicit = [
        decoding(seed=i, top_p=1.0, presence_penalty=0.0, frequency_penalty=0.0) for i in range(6)
    ]
    for _ in range(5):
        assert sample(logits, plain) == sample(logits, explicit)
    assert all(d.counts is None for d in explicit)  # no penalty bookkeeping at all


# -- penalties -----------------------------------------------------------------------------


def test_penalties_subtract_presence_and_frequency_from_the_logits() -> None:
    logits = TABLE[5:6].clone()
    dec = decoding(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    history = [int(sample(logits, [dec])[0]) for _ in range(6)]
    counts = torch.zeros(VOCAB)
    for i, tok in enumerate(history):
        # The reference: greedy over logits - 0.5 * seen - 0.25 * count, tokens so far.
        expected = int((logits[0] - 0.5 * (counts > 0) - 0.25 * counts).argmax())
        assert tok == expected, i
        counts[tok] += 1
    assert dec.counts is not None and torch.equal(dec.counts, counts)
    assert len(set(history)) > 1  # the penalty moved greedy decoding off its first choice


async def test_penalties_change_the_output_and_stay_reproducible_batched() -> None:
    node = table_node(max_new_tokens=16, temperature=0.0)
    async with df.Engine(df.Graph("g", node)) as engine:
        plain = await engine.run([1])
        rep = await engine.run([1], frequency_penalty=1.5)
        pres = await engine.run([1], presence_penalty=2.0)
        async with anyio.create_task_group() as tg:
            out: dict[int, list[Any]] = {}

            async def one(i: int) -> None:
                out[i] = await engine.run(
                    [i], temperature=1.0, seed=i, presence_penalty=-1.0, frequency_penalty=0.7
                )

            for i in range(6):
                tg.start_soon(one, i)
    assert rep != plain and pres != plain
    assert rep == reference(node, [1], frequency_penalty=1.5)
    assert len(set(pres)) > len(set(plain))  # presence pushes towards new tokens
    for i in range(6):
        assert out[i] == reference(
            node, [i], temperature=1.0, seed=i, presence_penalty=-1.0, frequency_penalty=0.7
        )


async def test_seeded_top_p_alone_equals_batched() -> None:
    node = table_node(max_new_tokens=20, temperature=1.2)
    params = [
        {"seed": i, "top_p": p, "top_k": k} for i, (p, k) in enumerate([(0.5, 0), (0.9, 3)] * 3)
    ]
    async with df.Engine(df.Graph("g", node)) as engine:
        alone = [await engine.run([7], **p) for p in params]
        out: dict[int, list[Any]] = {}
        async with anyio.create_task_group() as tg:
            for i, p in enumerate(params):

                async def one(i: int = i, p: dict[str, Any] = p) -> None:
                    out[i] = await engine.run([7], **p)

                tg.start_soon(one)
    assert [out[i] for i in range(len(params))] == alone
    assert alone[0] == reference(node, [7], **params[0])
    assert len({tuple(a) for a in alone}) > 1


# -- n sequences, logprobs -----------------------------------------------------------------


async def test_n_sequences_are_distinct_and_each_reproducible() -> None:
    node = table_node(max_new_tokens=12, temperature=1.0)
    async with df.Engine(df.Graph("g", node)) as engine:
        chunks = [c async for c in engine.stream([3], n=3, seed=10, details=True)]
        singles = [await engine.run([3], seed=10 + i) for i in range(3)]
        again = await engine.run([3], n=3, seed=10, details=True)
    seqs = by_index(chunks)
    assert sorted(seqs) == [0, 1, 2]
    tokens = {i: [t for c in cs for t in c.token_ids] for i, cs in seqs.items()}
    for i in range(3):
        assert tokens[i] == singles[i]  # sequence i is the request with seed + i
        assert [c.finish_reason for c in seqs[i]] == [None] * 11 + ["length"]
    assert len({tuple(t) for t in tokens.values()}) == 3
    assert sorted(again, key=lambda c: c.index) == sorted(chunks, key=lambda c: c.index)
    assert all(isinstance(c, df.Chunk) and c.text == "" for c in chunks)  # no decoder


async def test_logprobs_are_the_models_log_softmax_whatever_the_sampling() -> None:
    node = table_node(max_new_tokens=10)
    async with df.Engine(df.Graph("g", node)) as engine:
        chunks = await engine.run(
            [5], details=True, logprobs=3, temperature=2.0, top_k=4, top_p=0.8, seed=1
        )
        none = await engine.run([5], details=True, logprobs=0, temperature=0.0)
        without = await engine.run([5], details=True, temperature=0.0)
    prev = 5
    for chunk in chunks:
        assert chunk.logprobs is not None and len(chunk.logprobs) == len(chunk.token_ids) == 1
        lp = chunk.logprobs[0]
        expected = torch.log_softmax(TABLE[prev].float(), dim=-1)
        assert lp.id == chunk.token_ids[0]
        assert lp.logprob == pytest.approx(expected[lp.id].item(), abs=1e-5)
        values, ids = expected.topk(3)
        assert [t[1] for t in lp.top] == ids.tolist()
        assert [t[2] for t in lp.top] == pytest.approx(values.tolist(), abs=1e-5)
        prev = lp.id
    assert all(c.logprobs is not None and c.logprobs[0].top == () for c in none)
    assert all(c.logprobs is None for c in without)


# -- token counts and finish reasons -------------------------------------------------------


async def test_completion_tokens_count_tokens_not_chunks() -> None:
    node = script_node("éééé", max_new_tokens=8)
    async with df.Engine(df.Graph("g", node)) as engine:
        chunks = await engine.run("xy", details=True, logprobs=1)
        plain = await engine.run("xy")
    assert plain == ["é"] * 4  # the default outputs are unchanged
    assert [c.text for c in chunks] == ["é"] * 4
    assert [len(c.token_ids) for c in chunks] == [2] * 4  # two byte tokens per character
    assert [c.completion_tokens for c in chunks] == [2, 4, 6, 8]
    assert all(c.prompt_tokens == 2 for c in chunks)
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]
    lps = [lp for c in chunks for lp in c.logprobs or ()]
    assert [lp.token for lp in lps] == ["\ufffd"] * 8  # half a character: replaced


async def test_finish_reason_length_for_any_limit_and_stop_for_eos_and_stop_strings() -> None:
    default = script_node("abcdefgh", max_new_tokens=5)
    eos = df.generate(
        lambda b: Script(b, "abcdefgh"), name="s", decode="bytes", temperature=0.0, eos=ord("d")
    )
    async with df.Engine(df.Graph("g", default)) as engine:
        node_default = await engine.run("x", details=True)
        asked = await engine.run("x", details=True, max_new_tokens=3)
        stopped = await engine.run("x", details=True, stop="cd")
    async with df.Engine(df.Graph("g", eos)) as engine:
        ended = await engine.run("x", details=True)
    assert "".join(c.text for c in node_default) == "abcde"
    assert node_default[-1].finish_reason == "length"  # the node's own default limit
    assert node_default[-1].completion_tokens == 5
    assert asked[-1].finish_reason == "length" and asked[-1].completion_tokens == 3
    assert "".join(c.text for c in stopped) == "ab"
    assert stopped[-1].finish_reason == "stop" and stopped[-1].completion_tokens == 4
    assert "".join(c.text for c in ended) == "abc"
    assert ended[-1] == df.Chunk("", 0, (), None, "stop", 1, 4)  # eos counted, not listed
    for chunks in (node_default, asked, stopped, ended):
        assert [c.finish_reason is not None for c in chunks].count(True) == 1


class Context(Table):
    max_positions = 10


async def test_max_positions_rejects_what_cannot_fit_and_shrinks_the_default() -> None:
    node = df.generate(Context, name="ctx", max_new_tokens=20, temperature=0.0)
    async with df.Engine(df.Graph("g", node)) as engine:
        with pytest.raises(df.InvalidRequest, match=r"4 tokens.*max_new_tokens is 8.*10") as info:
            await engine.run([1, 2, 3, 4], max_new_tokens=8)
        assert "max_positions" in str(info.value)
        with pytest.raises(df.InvalidRequest, match="10"):
            await engine.run(list(range(10)))
        fitted = await engine.run([1, 2, 3, 4], details=True)
        ok = await engine.run([1, 2, 3, 4], max_new_tokens=6)
    assert fitted[-1].completion_tokens == 6 and fitted[-1].finish_reason == "length"
    assert len(ok) == 6


async def test_bad_sampling_parameters_are_clear_errors() -> None:
    node = table_node(max_new_tokens=4)
    async with df.Engine(df.Graph("g", node)) as engine:
        for params, match in [
            ({"top_p": 0}, "top_p"),
            ({"top_p": 1.5}, "top_p"),
            ({"top_p": "x"}, "top_p"),
            ({"n": 2}, "details"),
            ({"logprobs": 2}, "details"),
            ({"n": 0, "details": True}, "n must"),
            ({"n": 17, "details": True}, "n must"),
            ({"logprobs": 21, "details": True}, "logprobs"),
            ({"logprobs": -1, "details": True}, "logprobs"),
            ({"presence_penalty": 2.5}, "presence_penalty"),
            ({"frequency_penalty": math.inf}, "frequency_penalty"),
            ({"frequency_penalty": True}, "frequency_penalty"),
            ({"details": "yes"}, "details"),
        ]:
            with pytest.raises(df.InvalidRequest, match=match):
                await engine.run([1], **params)
        # What OpenAI-style clients send by default is accepted.
        out = await engine.run(
            [1], top_p=1, n=1, presence_penalty=0, frequency_penalty=0, temperature=0
        )
    assert out == reference(node, [1], temperature=0)
    with pytest.raises(df.GraphError, match="top_p"):
        df.generate(Table, top_p=0)
