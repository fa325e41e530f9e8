"""HFStepModel on its own: batched steps agree with full forwards whatever joins and leaves."""

from __future__ import annotations

import random
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import torch

from dataflow.hf import HFStepModel, _step

from ._checkpoints import build


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoModelForCausalLM

    path = build(str(request.param), tmp_path_factory.mktemp("step"))
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def full(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]  # type: ignore[no-any-return]


@pytest.mark.parametrize("capacity", [4, 64])
def test_random_joins_leaves_and_parking_match_full_forwards(
    model: Any, capacity: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # capacity 4: the columns shift left and the buffers grow many times over
    monkeypatch.setattr(_step, "_MIN_CAPACITY", capacity)
    rng = random.Random(capacity)
    step = HFStepModel(model, max_batch=6, max_positions=96)
    seqs: dict[int, list[int]] = {}
    checks = 0
    for tick in range(45):
        free = [s for s in range(6) if s not in seqs]
        joins = rng.sample(free, k=min(len(free), rng.choice([0, 0, 1, 2])))
        prompts = [[rng.randrange(5, 300) for _ in range(rng.randint(1, 12))] for _ in joins]
        if len(joins) > 1:
            logits = step.prefill_many(joins, prompts)
        elif joins:
            logits = step.prefill(joins[0], prompts[0])[None]
        for row, (slot, prompt) in enumerate(zip(joins, prompts, strict=True)):
            seqs[slot] = list(prompt)
            torch.testing.assert_close(logits[row], full(model, prompt), atol=1e-4, rtol=1e-4)
        # the others sit this tick out; with few stepping, their windows are gathered
        share = rng.choice([0.85, 0.85, 0.3])
        running = [s for s in seqs if rng.random() < share]
        if tick % 7 == 0:
            rng.shuffle(running)  # a new order repacks too
        if running:
            tokens = [rng.randrange(5, 300) for _ in running]
            logits = step.step(running, tokens)
            for row, (slot, token) in enumerate(zip(running, tokens, strict=True)):
                seqs[slot].append(token)
                expected = full(model, seqs[slot])
                torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)
                checks += 1
        for slot in [s for s in seqs if len(seqs[s]) > 40 or rng.random() < 0.08]:
            step.free(slot)
            del seqs[slot]
    assert checks > 80
    for slot in list(seqs):
        step.free(slot)
    assert step.cached_slots() == []  # every cache released
    step.close()


def test_bad_slots_are_refused(model: Any) -> None:
    step = HFStepModel(model, max_batch=2)
    with pytest.raises(ValueError, match="out of range"):
        step.prefill(2, [1, 2])
    with pytest.raises(ValueError, match="not prefilled"):
        step.step([0], [1])
    assert not hasattr(step, "max_positions")
