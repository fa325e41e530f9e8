"""The byte-level models behind the ready graphs: slot caches, shipped weights, trainers.

The property that matters for serving is that decoding through a slot cache, one batched
step at a time with sequences of different lengths sharing a step, gives the same logits as
running the model over each sequence from scratch.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from graphs._lstm_model import LSTMLanguageModel, load_lstm_lm
from graphs._slots import generate
from graphs._tiny_lm_model import TinyLM, load_tiny_lm
from graphs._weights import read_metadata

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "graphs" / "weights"
ATOL = 1e-4
SMALL = {
    "train_tiny_lm": ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--context", "32"],
    "train_lstm_lm": ["--embedding-dim", "16", "--hidden-dim", "32", "--context", "32"],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Batch-1 decoding ops are too small to split across threads; on a busy 2-core machine
    # the intra-op synchronisation made these tests several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> TinyLM:
    return load_tiny_lm(WEIGHTS / "tiny_lm.safetensors")


@pytest.fixture(scope="module")
def lstm() -> LSTMLanguageModel:
    return load_lstm_lm(WEIGHTS / "lstm_lm.safetensors")


def _bytes(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(32, 127, (n,), generator=generator).tolist()


def _last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(torch.tensor([ids]))
    return logits[0, -1]


def test_tiny_lm_prefill_then_steps_match_full_forward(tiny: TinyLM) -> None:
    seq = _bytes(30, seed=1)
    cache = tiny.new_cache(max_batch=2)
    slot = cache.acquire()
    torch.testing.assert_close(
        cache.prefill(slot, seq[:7]), _last_logits(tiny, seq[:7]), atol=ATOL, rtol=0
    )
    with torch.no_grad():
        full = tiny(torch.tensor([seq]))[0]
    for n in range(7, len(seq)):
        torch.testing.assert_close(cache.step([slot], [seq[n]])[0], full[n], atol=ATOL, rtol=0)


def test_tiny_lm_slots_of_different_lengths_step_together_and_slide(tiny: TinyLM) -> None:
    context = tiny.config.context
    source = {3: _bytes(context + 40, seed=2), 1: _bytes(context + 40, seed=3)}
    # Slot 3 starts near the end of its window so it slides mid-run; slot 1 stays short.
    start = {3: context - 5, 1: 9}
    cache = tiny.new_cache(max_batch=4)
    # Per slot, the windows the cache held: (ids, logits returned while that window grew).
    segments: dict[int, list[tuple[list[int], list[torch.Tensor]]]] = {}
    for slot, n in start.items():
        cache.prefill(slot, source[slot][:n])
        segments[slot] = [(source[slot][:n], [])]
    slots = [3, 1]
    for i in range(16):
        new = [source[s][start[s] + i] for s in slots]
        out = cache.step(slots, new)
        for row, slot in enumerate(slots):
            ids, outputs = segments[slot][-1]
            if len(ids) == context:
                # The documented slide: keep the last context // 2 ids, then append.
                ids, outputs = ids[-(context // 2) :], []
                segments[slot].append((ids, outputs))
            ids.append(new[row])
            outputs.append(out[row])
            assert cache.length(slot) == len(ids)
    assert len(segments[3]) == 2, "slot 3 should have slid past the context"
    for slot in slots:
        for ids, outputs in segments[slot]:
            with torch.no_grad():
                full = tiny(torch.tensor([ids]))[0]
            expected = full[len(ids) - len(outputs) :]
            torch.testing.assert_close(torch.stack(outputs), expected, atol=ATOL, rtol=0)


def test_tiny_lm_prefill_keeps_last_context_ids(tiny: TinyLM) -> None:
    context = tiny.config.context
    prompt = _bytes(context + 50, seed=4)
    cache = tiny.new_cache(max_batch=1)
    logits = cache.prefill(0, prompt)
    assert cache.length(0) == context
    torch.testing.assert_close(logits, _last_logits(tiny, prompt[-context:]), atol=ATOL, rtol=0)


def test_lstm_slots_of_different_lengths_step_together_past_context(
    lstm: LSTMLanguageModel,
) -> None:
    context = lstm.config.context
    a, b = _bytes(context + 40, seed=5), _bytes(60, seed=6)
    cache = lstm.new_cache(max_batch=3)
    torch.testing.assert_close(
        cache.prefill(2, a[: context - 10]),
        _last_logits(lstm, a[: context - 10]),
        atol=ATOL,
        rtol=0,
    )
    cache.prefill(0, b[:5])
    with torch.no_grad():
        full_a, full_b = lstm(torch.tensor([a]))[0], lstm(torch.tensor([b]))[0]
    # The recurrent state has no window: slot 2 runs 10 bytes past the training context.
    for i in range(20):
        out = cache.step([2, 0], [a[context - 10 + i], b[5 + i]])
        torch.testing.assert_close(out[0], full_a[context - 10 + i], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[1], full_b[5 + i], atol=ATOL, rtol=0)
    assert cache.length(2) == context + 10


@pytest.mark.parametrize("which", ["tiny", "lstm"])
def test_prefill_many_equals_prefill_per_slot(
    which: str, tiny: TinyLM, lstm: LSTMLanguageModel
) -> None:
    model: TinyLM | LSTMLanguageModel = tiny if which == "tiny" else lstm
    context = tiny.config.context
    # Different lengths (one past the tiny LM's context), slots out of order.
    prompts = {5: _bytes(3, seed=10), 0: _bytes(40, seed=11), 2: _bytes(1, seed=12)}
    prompts[6] = _bytes(context + 9, seed=13)
    slots = list(prompts)
    one, many = model.new_cache(max_batch=8), model.new_cache(max_batch=8)
    # Stale state in the batched cache's slots must not leak into the new prompts.
    many.prefill(2, _bytes(60, seed=14))
    expected = torch.stack([one.prefill(s, prompts[s]) for s in slots])
    got = many.prefill_many(slots, [prompts[s] for s in slots])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    for slot in slots:
        assert many.length(slot) == one.length(slot)
    # The states are equal too: the following steps agree.
    for i in range(3):
        new = [(7 * i + s) % 256 for s in slots]
        torch.testing.assert_close(many.step(slots, new), one.step(slots, new), atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        many.prefill_many([1, 1], [[1], [2]])
    with pytest.raises(ValueError):
        many.prefill_many([1], [[]])
    assert many.prefill_many([], []).shape == (0, 256)


@pytest.mark.parametrize("which", ["tiny", "lstm"])
def test_freed_slot_is_reused_cleanly_and_misuse_is_refused(
    which: str, tiny: TinyLM, lstm: LSTMLanguageModel
) -> None:
    model: TinyLM | LSTMLanguageModel = tiny if which == "tiny" else lstm
    cache = model.new_cache(max_batch=2)
    first, second = cache.acquire(), cache.acquire()
    assert (first, second) == (0, 1)
    with pytest.raises(RuntimeError, match="free one first"):
        cache.acquire()
    cache.prefill(first, _bytes(50, seed=7))
    cache.free(first)
    assert cache.acquire() == first
    prompt = _bytes(12, seed=8)
    torch.testing.assert_close(
        cache.prefill(first, prompt), _last_logits(model, prompt), atol=ATOL, rtol=0
    )
    with pytest.raises(ValueError, match="prefill it"):
        cache.step([second], [65])
    with pytest.raises(ValueError, match="repeat"):
        cache.step([first, first], [65, 66])
    with pytest.raises(ValueError, match=r"0\.\.255"):
        cache.step([first], [256])
    with pytest.raises(ValueError, match="out of range"):
        cache.prefill(2, [65])


@pytest.mark.parametrize(
    ("name", "loader"),
    [("tiny_lm", load_tiny_lm), ("lstm_lm", load_lstm_lm)],
)
def test_shipped_weights_load_from_metadata_alone(
    name: str, loader: Callable[[Path], torch.nn.Module]
) -> None:
    path = WEIGHTS / f"{name}.safetensors"
    metadata = read_metadata(path)
    assert metadata["kind"] == name
    assert float(metadata["val_bits_per_byte"]) < 3.0
    model = loader(path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    logits = _last_logits(model, list(b"def main("))
    assert logits.shape == (256,)
    assert torch.isfinite(logits).all()


def test_generate_streams_bytes_and_frees_its_slot(tiny: TinyLM) -> None:
    cache = tiny.new_cache(max_batch=1)
    out = bytes(generate(cache, b"def main(", 16, temperature=0.8, seed=1))
    assert len(out) == 16
    assert cache.acquire() == 0


def _load_script(name: str) -> ModuleType:
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("script", "loader"),
    [("train_tiny_lm", load_tiny_lm), ("train_lstm_lm", load_lstm_lm)],
)
def test_training_script_runs_end_to_end(
    script: str, loader: Callable[[Path], torch.nn.Module], tmp_path: Path
) -> None:
    threads = torch.get_num_threads()
    out, curve = tmp_path / "w.safetensors", tmp_path / "curve.json"
    argv = [
        "--steps",
        "3",
        "--max-files",
        "5",
        "--batch",
        "4",
        "--eval-windows",
        "4",
        "--threads",
        "1",
    ]
    # A narrow model keeps the test fast; the loop, files and metadata are the same code.
    argv += SMALL[script]
    try:
        result = _load_script(script).main([*argv, "--out", str(out), "--curve", str(curve)])
    finally:
        torch.set_num_threads(threads)
    assert result.steps == 3
    metadata = read_metadata(out)
    assert metadata["steps"] == "3"
    assert "--max-files 5" in metadata["command"]
    summary = json.loads(curve.read_text())
    assert summary["points"][-1]["step"] == 3
    logits = _last_logits(loader(out), [65, 66])
    assert torch.isfinite(logits).all()
