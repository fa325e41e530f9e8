"""Loading Hugging Face checkpoints from local directories only (never a hub)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .._errors import GraphError

__all__ = ["check_checkpoint", "load_model", "load_tokenizer", "offline", "resolve_dtype"]

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def offline() -> None:
    """Keeps transformers and huggingface_hub off the network in this process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def check_checkpoint(where: str, path: str | os.PathLike[str], *, tokenizer: bool) -> Path:
    """The checkpoint directory, checked for the files loading needs.

    Raises:
        GraphError: the directory, its ``config.json``, its weights or (with ``tokenizer``)
            its tokenizer files are missing; the message names what is missing.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise GraphError(
            f"{where}: {str(path)!r} is not a local checkpoint directory (models are never "
            "downloaded: pass a directory holding config.json and the weights)"
        )
    if not (root / "config.json").is_file():
        raise GraphError(f"{where}: missing file {root / 'config.json'}")
    if not any((root / f).is_file() for f in WEIGHT_FILES):
        raise GraphError(
            f"{where}: no weights in {root}: expected one of {', '.join(WEIGHT_FILES)}"
        )
    if tokenizer and not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise GraphError(
            f"{where}: no tokenizer in {root}: expected one of {', '.join(TOKENIZER_FILES)} "
            "(or pass tokenizer=)"
        )
    return root


def resolve_dtype(where: str, dtype: Any, cuda: bool) -> torch.dtype:
    """``dtype`` as a torch dtype; the default is float32 on CPU and float16 on CUDA.

    Raises:
        GraphError: an unknown dtype.
    """
    if dtype is None:
        return torch.float16 if cuda else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise GraphError(
        f"{where}: dtype must be a torch dtype or one of {', '.join(sorted(DTYPES))}, got {dtype!r}"
    )


def load_tokenizer(where: str, path: str | os.PathLike[str]) -> Any:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)`` with a clear error."""
    offline()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise GraphError(f"{where}: could not load the tokenizer from {path}: {exc}") from exc


def load_model(
    where: str, path: str | os.PathLike[str], dtype: torch.dtype, device: torch.device, auto: Any
) -> Any:
    """``auto.from_pretrained(path, dtype=..., local_files_only=True)``, on ``device``, eval."""
    offline()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model = auto.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise GraphError(f"{where}: could not load the model from {path}: {exc}") from exc
    return model.to(device).eval()
