"""Trains the byte-level LSTM language model (the seed document's architecture).

Usage::

    python examples/train_lstm_lm.py --minutes 4

Writes fp16 weights (config and metrics in the safetensors metadata) to
``graphs/weights/lstm_lm.safetensors`` and the loss curve to ``docs/training/lstm_lm.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from graphs._lstm_model import KIND, LSTMConfig, LSTMLanguageModel, save_lstm_lm
from graphs._training import TrainResult, add_training_args, train


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_args(
        parser,
        minutes=4.0,
        lr=1e-2,
        out="graphs/weights/lstm_lm.safetensors",
        curve="docs/training/lstm_lm.json",
        eval_every=100,
    )
    defaults = LSTMConfig()
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    parser.add_argument("--hidden-dim", type=int, default=defaults.hidden_dim)
    parser.add_argument("--n-layers", type=int, default=defaults.n_layers)
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--context", type=int, default=defaults.context, help="BPTT window")
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
    config = LSTMConfig(
        embedding_dim=args.embedding_dim,
        hidden_dim=args.hidden_dim,
        n_layers=args.n_layers,
        dropout=args.dropout,
        context=args.context,
    )
    model = LSTMLanguageModel(config)

    def save(path: Path, metadata: dict[str, str]) -> int:
        return save_lstm_lm(model, path, metadata)

    argv_list = list(sys.argv[1:] if argv is None else argv)
    return train(
        model,
        args,
        kind=KIND,
        context=config.context,
        config=asdict(config),
        bf16=not args.no_bf16,
        save=save,
        command=["python", "examples/train_lstm_lm.py", *argv_list],
    )


if __name__ == "__main__":
    main()
