"""Trains the tiny byte-level transformer served by ``graphs/tiny_lm.py``.

Usage::

    python examples/train_tiny_lm.py --minutes 5

Writes fp16 weights (config and metrics in the safetensors metadata) to
``graphs/weights/tiny_lm.safetensors`` and the loss curve to ``docs/training/tiny_lm.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from graphs._tiny_lm_model import KIND, TinyLM, TinyLMConfig, save_tiny_lm
from graphs._training import TrainResult, add_training_args, train


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_args(
        parser,
        minutes=5.0,
        lr=3e-3,
        out="graphs/weights/tiny_lm.safetensors",
        curve="docs/training/tiny_lm.json",
        eval_every=100,
    )
    defaults = TinyLMConfig()
    parser.add_argument("--d-model", type=int, default=defaults.d_model)
    parser.add_argument("--n-layers", type=int, default=defaults.n_layers)
    parser.add_argument("--n-heads", type=int, default=defaults.n_heads)
    parser.add_argument("--context", type=int, default=defaults.context)
    parser.add_argument(
        "--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Trains and saves the model.

    Args:
        argv: the options (without the program name); ``sys.argv[1:]`` when None.

    Returns:
        The run's figures.
    """
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    config = TinyLMConfig(
        d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, context=args.context
    )
    model = TinyLM(config)

    def save(path: Path, metadata: dict[str, str]) -> int:
        return save_tiny_lm(model, path, metadata)

    argv_list = list(sys.argv[1:] if argv is None else argv)
    return train(
        model,
        args,
        kind=KIND,
        context=config.context,
        config=asdict(config),
        bf16=not args.no_bf16,
        save=save,
        command=["python", "examples/train_tiny_lm.py", *argv_list],
    )


if __name__ == "__main__":
    main()
