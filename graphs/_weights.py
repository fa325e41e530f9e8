"""The weights file format of the ready graphs: fp16 safetensors, self-describing.

A file carries everything needed to rebuild its model: the metadata holds the model kind and
its config as JSON, so loading needs no code-side defaults that could drift from what was
trained. Training facts (held-out bits/byte, steps, the exact command) ride along so a
weights file can be traced back to the run that made it.

Weights are stored in float16 to halve the file; they are upcast to float32 on load because
CPU inference in fp16 is slow and fp16 accumulation would break the cache-equivalence
guarantees the serving code is tested against.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ["FORMAT_VERSION", "load_model", "read_metadata", "read_weights", "save_weights"]

FORMAT_VERSION = "1"

ModelT = TypeVar("ModelT", bound=torch.nn.Module)


def save_weights(
    module: torch.nn.Module,
    path: str | Path,
    *,
    kind: str,
    config: Mapping[str, Any],
    extra: Mapping[str, str] | None = None,
) -> int:
    """Writes ``module``'s parameters as fp16 safetensors with a self-describing header.

    Args:
        module: the model; its ``state_dict`` is saved (buffers marked non-persistent, such
            as RoPE tables, are rebuilt from the config instead).
        path: the file to write; parent directories are created.
        kind: the model family, checked on load (``"tiny_lm"``, ``"lstm_lm"``).
        config: the model's constructor arguments, stored as JSON.
        extra: further string metadata (metrics, command line).

    Returns:
        The size of the written file in bytes.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.detach().to("cpu", torch.float16).contiguous()
        for name, tensor in module.state_dict().items()
    }
    metadata = {"format": FORMAT_VERSION, "kind": kind, "config": json.dumps(dict(config))}
    metadata.update(extra or {})
    save_file(tensors, str(target), metadata=metadata)
    return target.stat().st_size


def read_metadata(path: str | Path) -> dict[str, str]:
    """Returns the string metadata of a weights file without loading its tensors."""
    with safe_open(str(path), framework="pt") as handle:
        metadata: dict[str, str] | None = handle.metadata()
    return dict(metadata or {})


def read_weights(
    path: str | Path, kind: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """Reads a weights file written by :func:`save_weights`.

    Args:
        path: the file.
        kind: the model family the caller expects.

    Returns:
        ``(config, state_dict, metadata)`` with the tensors upcast to float32.

    Raises:
        ValueError: when the file is of another kind or format.
    """
    metadata = read_metadata(path)
    if metadata.get("kind") != kind or metadata.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path} holds kind={metadata.get('kind')!r} format={metadata.get('format')!r}, "
            f"expected kind={kind!r} format={FORMAT_VERSION!r}"
        )
    config: dict[str, Any] = json.loads(metadata["config"])
    state = {name: t.float() for name, t in load_file(str(path)).items()}
    return config, state, metadata


def load_model(
    path: str | Path,
    kind: str,
    build: Callable[[dict[str, Any]], ModelT],
    device: str | torch.device = "cpu",
) -> ModelT:
    """Rebuilds a model from a weights file alone, in float32 eval mode.

    Args:
        path: a file written by :func:`save_weights`.
        kind: the model family the caller expects.
        build: makes the (untrained) model from the config stored in the file.
        device: where to place the model.

    Returns:
        The model with the file's weights loaded.

    Raises:
        ValueError: when the file is of another kind or format.
    """
    config, state, _ = read_weights(path, kind)
    model = build(config)
    model.load_state_dict(state)
    return model.to(device).eval()
