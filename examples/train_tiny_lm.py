"""Trains the tiny byte-level transformer served by ``graphs/tiny_lm.py``.

Usage::

    python examples/train_tiny_lm.py --minutes 5

Writes fp16 weights (config and metrics in the safetensors metadata) and the loss curve
to a new pair of files, ``runs/tiny_lm-YYYYmmdd-HHMMSS.safetensors`` and ``.json``: the
shipped weights are never overwritten unless named. To replace them::

    python examples/train_tiny_lm.py --out graphs/weights/tiny_lm.safetensors \
        --curve docs/training/tiny_lm.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from graphs._tiny_lm_model import KIND, TinyLM, TinyLMConfig, save_tiny_lm
from graphs._training import TrainResult, parse_trainer_args, train_model

# A new file per run: the shipped weights (graphs/weights/) change only when --out says so.
RUN = time.strftime("runs/tiny_lm-%Y%m%d-%H%M%S", time.gmtime())


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    defaults = TinyLMConfig()
    parser.add_argument("--d-model", type=int, default=defaults.d_model)
    parser.add_argument("--n-layers", type=int, default=defaults.n_layers)
    parser.add_argument("--n-heads", type=int, default=defaults.n_heads)
    parser.add_argument("--context", type=int, default=defaults.context)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    return parse_trainer_args(
        argv,
        __doc__.split("\n\n")[0],
        _add_model_args,
        minutes=5.0,
        lr=3e-3,
        out=f"{RUN}.safetensors",
        curve=f"{RUN}.json",
        eval_every=100,
    )


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Trains and saves the tiny transformer; ``argv`` is ``sys.argv[1:]`` when None."""
    args = parse_args(argv)
    config = TinyLMConfig(
        d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, context=args.context
    )
    return train_model(
        args,
        argv,
        script="examples/train_tiny_lm.py",
        kind=KIND,
        config=config,
        model_class=TinyLM,
        save=save_tiny_lm,
    )


if __name__ == "__main__":
    main()
