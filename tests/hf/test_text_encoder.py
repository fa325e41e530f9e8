"""hf.text_encoder: pooled sentence vectors through tokenize >> windows >> encoder >> pool."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch

import dataflow as df
from dataflow import hf

from ._checkpoints import build_encoder

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_encoder(tmp_path_factory.mktemp("enc"))


def reference(path: Path, texts: list[str], pooling: str) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = model(**enc).last_hidden_state
    if pooling == "cls":
        return torch.nn.functional.normalize(states[:, 0], dim=1)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=1)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
async def test_vectors_equal_the_reference_in_order(checkpoint: Path, pooling: str) -> None:
    texts = ["def main(argv):", "class reader", "the quick brown fox", "import os"]
    chain = hf.text_encoder(checkpoint, pooling=pooling, max_batch=3)
    async with df.Engine(df.Graph("enc", chain)) as engine:
        as_list = await engine.run(texts)
        single = await engine.run(texts[2])
        assert engine.stats()["nodes"]["encoder"]["items_in"] == 5
    expected = reference(checkpoint, texts, pooling)
    torch.testing.assert_close(as_list, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single, expected[2], atol=1e-5, rtol=1e-5)


async def test_long_text_is_windowed_and_unnormalized_mean_is_a_token_mean(
    checkpoint: Path,
) -> None:
    text = "for i in range ( 10 ) : total += i * i " * 6
    chain = hf.text_encoder(checkpoint, normalize=False, window=16, overlap=4)
    async with df.Engine(df.Graph("enc", chain)) as engine:
        vec = await engine.run(text)
        assert engine.stats()["nodes"]["encoder"]["items_in"] > 3
        with pytest.raises(df.InvalidRequest, match="bert: input must be"):
            await engine.run(42)
        # Text that cannot be UTF-8 is the caller's error, not the tokenizer's TypeError.
        with pytest.raises(df.InvalidRequest, match="bert: the text is not valid Unicode"):
            await engine.run("a\ud800")
        with pytest.raises(df.InvalidRequest, match="bert: text 1 is not valid Unicode"):
            await engine.run(["fine", "\udfff"])
    assert vec.shape == (32,) and abs(float(vec.norm()) - 1.0) > 1e-3


def test_bad_options_and_missing_files(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(df.GraphError, match="pooling"):
        hf.text_encoder(checkpoint, pooling="max")
    with pytest.raises(df.GraphError, match="overlap"):
        hf.text_encoder(checkpoint, window=16, overlap=20)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(df.GraphError, match="no tokenizer"):
        hf.text_encoder(tmp_path)
