"""Trains the byte-level LSTM language model (the seed document's architecture).

Usage::

    python examples/train_lstm_lm.py --minutes 4

Writes fp16 weights (config and metrics in the safetensors metadata) and the loss curve
to a new pair of files, ``runs/lstm_lm-YYYYmmdd-HHMMSS.safetensors`` and ``.json``: the
shipped weights are never overwritten unless named. To replace them::

    python examples/train_lstm_lm.py --out graphs/weights/lstm_lm.safetensors \
        --curve docs/training/lstm_lm.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from graphs._lstm_model import KIND, LSTMConfig, LSTMLanguageModel, save_lstm_lm
from graphs._training import TrainResult, parse_trainer_args, train_model

# A new file per run: the shipped weights (graphs/weights/) change only when --out says so.
RUN = time.strftime("runs/lstm_lm-%Y%m%d-%H%M%S", time.gmtime())


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    defaults = LSTMConfig()
    parser.add_argument("--embedding-dim", type=int, default=defaults.embedding_dim)
    parser.add_argument("--hidden-dim", type=int, default=defaults.hidden_dim)
    parser.add_argument("--n-layers", type=int, default=defaults.n_layers)
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--context", type=int, default=defaults.context, help="BPTT window")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    return parse_trainer_args(
        argv,
        __doc__.split("\n\n")[0],
        _add_model_args,
        minutes=4.0,
        lr=1e-2,
        out=f"{RUN}.safetensors",
        curve=f"{RUN}.json",
        eval_every=100,
    )


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Trains and saves the LSTM; ``argv`` is ``sys.argv[1:]`` when None."""
    args = parse_args(argv)
    config = LSTMConfig(
        embedding_dim=args.embedding_dim,
        hidden_dim=args.hidden_dim,
        n_layers=args.n_layers,
        dropout=args.dropout,
        context=args.context,
    )
    return train_model(
        args,
        argv,
        script="examples/train_lstm_lm.py",
        kind=KIND,
        config=config,
        model_class=LSTMLanguageModel,
        save=save_lstm_lm,
    )


if __name__ == "__main__":
    main()
