"""The training loop both byte-level trainers share (``examples/train_*_lm.py``).

The trainers differ only in the model they build and whether they use bf16 autocast, so the
loop, schedule, evaluation, progress display and output files live here once. Budgets are in
*training* seconds: time spent on periodic validation is not charged to ``--minutes``, so a
run's quality does not depend on how often it was asked to report.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from graphs._corpus import eval_windows, iter_windows, load_corpus

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "TrainResult",
    "add_training_args",
    "bits_per_byte",
    "cosine_lr",
    "evaluate",
    "parse_trainer_args",
    "train",
    "train_model",
]

#: Learning rate at the end of the cosine, as a fraction of the peak.
MIN_LR_RATIO = 0.1
#: Bytes per window-batch when evaluating; bounds evaluation memory, not its result.
EVAL_BATCH = 128

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")
ModelT = TypeVar("ModelT", bound=nn.Module)


def add_training_args(
    parser: argparse.ArgumentParser,
    *,
    minutes: float,
    lr: float,
    out: str,
    curve: str,
    eval_every: int,
) -> None:
    """Adds the options both trainers share, with per-model defaults.

    Args:
        parser: the trainer's parser.
        minutes: default training-time budget.
        lr: default peak learning rate.
        out: default weights path.
        curve: default loss-curve path.
        eval_every: default steps between validation passes.
    """
    parser.add_argument("--minutes", type=float, default=minutes, help="training-time budget")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch", type=int, default=32, help="windows per step")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="on weight matrices")
    parser.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    parser.add_argument("--seed", type=int, default=0, help="seeds init and data order")
    parser.add_argument("--out", type=Path, default=Path(out), help="weights file to write")
    parser.add_argument("--curve", type=Path, default=Path(curve), help="loss-curve JSON")
    parser.add_argument("--max-files", type=int, default=None, help="read only N stdlib files")
    parser.add_argument("--eval-every", type=int, default=eval_every, help="steps per val pass")
    parser.add_argument("--eval-windows", type=int, default=2048, help="final val windows")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")


def parse_trainer_args(
    argv: Sequence[str] | None,
    description: str,
    add_model_args: Callable[[argparse.ArgumentParser], None],
    *,
    minutes: float,
    lr: float,
    out: str,
    curve: str,
    eval_every: int,
) -> argparse.Namespace:
    """Parses a trainer's command line: the shared options, the model's, then ``--no-bf16``.

    Args:
        argv: the options (without the program name); ``sys.argv[1:]`` when None.
        description: the ``--help`` description.
        add_model_args: adds the model's shape options to the parser.
        minutes, lr, out, curve, eval_every: per-model defaults, see :func:`add_training_args`.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(description=description)
    add_training_args(parser, minutes=minutes, lr=lr, out=out, curve=curve, eval_every=eval_every)
    add_model_args(parser)
    parser.add_argument(
        "--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast"
    )
    return parser.parse_args(argv)


def train_model(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    *,
    script: str,
    kind: str,
    config: ConfigT,
    model_class: Callable[[ConfigT], ModelT],
    save: Callable[[ModelT, Path, dict[str, str]], int],
) -> TrainResult:
    """A trainer's ``main`` after parsing: seeds, builds the model, and runs :func:`train`.

    Args:
        args: from :func:`parse_trainer_args`.
        argv: the options as given to ``main`` (``sys.argv[1:]`` when None), recorded with
            the results.
        script: the trainer's path, as the recorded command runs it.
        kind: the model family.
        config: the model config (a dataclass with a ``context`` field: the training window).
        model_class: builds the model from ``config``.
        save: writes ``model``'s weights with the given metadata; returns the file size.

    Returns:
        The run's figures.
    """
    torch.manual_seed(args.seed)
    model = model_class(config)
    fields = asdict(config)

    def save_model(path: Path, metadata: dict[str, str]) -> int:
        return save(model, path, metadata)

    argv_list = list(sys.argv[1:] if argv is None else argv)
    return train(
        model,
        args,
        kind=kind,
        context=int(fields["context"]),
        config=fields,
        bf16=not args.no_bf16,
        save=save_model,
        command=["python", script, *argv_list],
    )


def bits_per_byte(nats: float) -> float:
    """Converts a mean cross-entropy in nats per byte to bits per byte."""
    return nats / math.log(2)


def cosine_lr(peak: float, step: int, progress: float, warmup: int) -> float:
    """The learning rate: linear warm-up over ``warmup`` steps, then a cosine to 10% of peak.

    Args:
        peak: the peak learning rate.
        step: steps taken so far.
        progress: the fraction of the budget used, 0..1 (by steps or by time, whichever is
            further along, so a time-budgeted run still ends its cosine on time).
        warmup: warm-up length in steps.

    Returns:
        The learning rate for the next step.
    """
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    scale = MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * cosine
    return peak * scale * min(1.0, (step + 1) / max(warmup, 1))


def evaluate(model: nn.Module, windows: torch.Tensor) -> tuple[float, float]:
    """Measures a model on fixed windows, in float32 and eval mode.

    Args:
        model: maps ids ``[B, T]`` to logits ``[B, T, 256]``.
        windows: ``[N, T + 1]`` byte windows.

    Returns:
        ``(bits_per_byte, next_byte_accuracy)`` averaged over every predicted position.
    """
    was_training = model.training
    model.eval()
    total_nats, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for chunk in torch.split(windows, EVAL_BATCH):
            logits: torch.Tensor = model(chunk[:, :-1])
            targets = chunk[:, 1:]
            total_nats += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
            )
            correct += int((logits.argmax(dim=-1) == targets).sum())
            count += targets.numel()
    model.train(was_training)
    return bits_per_byte(total_nats / count), correct / count


def _round_to_fp16(model: nn.Module) -> None:
    # The weights ship in fp16; evaluating the rounded weights makes the reported number the
    # one a user of the file will measure, not a slightly better fp32 one.
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        val_bits_per_byte: held-out bits/byte of the saved (fp16-rounded) weights.
        val_accuracy: held-out next-byte accuracy of the saved weights.
        steps: optimizer steps taken.
        train_seconds: time spent in training steps.
        wall_seconds: total time, loading and evaluation included.
        file_bytes: size of the weights file.
        points: the loss curve.
    """

    val_bits_per_byte: float
    val_accuracy: float
    steps: int
    train_seconds: float
    wall_seconds: float
    file_bytes: int
    points: list[dict[str, float]] = field(default_factory=list)


def train(
    model: nn.Module,
    args: argparse.Namespace,
    *,
    kind: str,
    context: int,
    config: dict[str, Any],
    bf16: bool,
    save: Callable[[Path, dict[str, str]], int],
    command: Sequence[str],
) -> TrainResult:
    """Trains ``model`` on the stdlib corpus, then saves the weights and the loss curve.

    Args:
        model: the model, freshly initialised; maps ids ``[B, T]`` to logits ``[B, T, 256]``.
        args: the parsed options of :func:`add_training_args`.
        kind: the model family, for the curve file.
        context: the training window length.
        config: the model config, for the curve file.
        bf16: run forward and backward under bf16 autocast (the optimizer state and master
            weights stay float32).
        save: writes the weights with the given metadata to a path; returns the file size.
        command: the command line that started the run, stored with the results.

    Returns:
        The run's figures.

    Raises:
        ValueError: when neither ``--minutes`` nor ``--steps`` bounds the run.
    """
    if args.steps is None and args.minutes is None:
        raise ValueError("give --minutes or --steps (or both)")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    corpus = load_corpus(max_files=args.max_files)
    batches = iter_windows(corpus.train, args.batch, context, args.seed)
    # A small fixed slice for progress reports; the full --eval-windows set only at the end.
    probe = eval_windows(corpus.val, min(64, args.eval_windows), context)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    budget_s = None if args.minutes is None else args.minutes * 60.0

    def fraction_done(step: int, train_s: float) -> float:
        by_steps = step / args.steps if args.steps else 0.0
        by_time = train_s / budget_s if budget_s else 0.0
        return max(by_steps, by_time)

    console = Console(stderr=True)
    console.print(
        f"[bold]{kind}[/]: {sum(p.numel() for p in model.parameters()):,} params; "
        f"{corpus.describe()}"
    )

    points: list[dict[str, float]] = []
    step, train_s, window_nats, window_steps = 0, 0.0, 0.0, 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    model.train()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(kind, total=1.0, status="")
        while True:
            done = fraction_done(step, train_s)
            if done >= 1.0:
                break
            lr = cosine_lr(args.lr, step, done, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tick = time.perf_counter()
            window = next(batches)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits: torch.Tensor = model(window[:, :-1])
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            train_s += time.perf_counter() - tick
            step += 1
            window_nats += loss.detach().item()
            window_steps += 1
            progress.update(
                task, completed=min(fraction_done(step, train_s), 1.0), status=f"step {step}"
            )
            if step % args.eval_every == 0 or step == args.steps:
                val_bpb, val_acc = evaluate(model, probe)
                point = {
                    "step": float(step),
                    "train_seconds": round(train_s, 2),
                    "lr": lr,
                    "train_bits_per_byte": bits_per_byte(window_nats / window_steps),
                    "val_bits_per_byte": val_bpb,
                    "val_accuracy": val_acc,
                }
                points.append(point)
                window_nats, window_steps = 0.0, 0
                progress.console.print(
                    f"step {step:5d}  {train_s:6.1f}s  train {point['train_bits_per_byte']:.3f}"
                    f"  val {val_bpb:.3f} bits/byte  acc {val_acc:.3f}"
                )

    _round_to_fp16(model)
    final_windows = eval_windows(corpus.val, args.eval_windows, context)
    val_bpb, val_acc = evaluate(model, final_windows)
    command_line = shlex.join(command)
    metadata = {
        "val_bits_per_byte": f"{val_bpb:.4f}",
        "val_accuracy": f"{val_acc:.4f}",
        "val_bytes": str(final_windows.shape[0] * context),
        "steps": str(step),
        "train_seconds": f"{train_s:.1f}",
        "batch": str(args.batch),
        "seed": str(args.seed),
        "command": command_line,
        "corpus": corpus.describe(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    file_bytes = save(args.out, metadata)
    wall_s = time.perf_counter() - started
    result = TrainResult(val_bpb, val_acc, step, train_s, wall_s, file_bytes, points)
    args.curve.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "kind": kind,
        "config": config,
        **metadata,
        "wall_seconds": f"{wall_s:.1f}",
        "file_bytes": file_bytes,
        "weights": str(args.out),
        "points": points,
    }
    args.curve.write_text(json.dumps(summary, indent=1) + "\n")
    console.print(
        f"saved {args.out} ({file_bytes:,} B): held-out {val_bpb:.4f} bits/byte, "
        f"accuracy {val_acc:.4f}, {step} steps, {train_s:.0f}s training, {wall_s:.0f}s wall"
    )
    return result
