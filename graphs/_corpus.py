"""The byte-level training corpus shared by the model trainers: Python's own standard library.

Every machine with Python has it, so the ready graphs can be retrained anywhere without a
download. Test suites are left out because they are dominated by repetitive assertion code
that would teach the models an unrepresentative dialect of Python.

The split is by file, not by offset, so held-out bytes come from modules the model never saw;
a file's side of the split is decided by a hash of its relative path, which keeps the split
stable when files are added or removed elsewhere in the tree.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "EXCLUDED_DIRS",
    "Corpus",
    "eval_windows",
    "is_validation_file",
    "iter_windows",
    "load_corpus",
    "sample_windows",
    "stdlib_files",
]

#: Directory names skipped anywhere in the tree (``idle_test`` is idlelib's test suite;
#: ``lib2to3/tests``, ``ctypes/test``, ``unittest/test`` … are caught by the first two).
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})

# Files are joined with a blank line so a window that straddles two files still sees a line
# break at the seam, as it would between top-level statements.
_SEPARATOR = b"\n\n"


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Lists the standard library's ``.py`` files, test directories excluded.

    Args:
        root: the tree to scan; the running interpreter's stdlib by default.

    Returns:
        Paths relative to ``root``, sorted by their POSIX form so the order does not depend on
        the file system's directory order.
    """
    base = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files: list[Path] = []
    for directory, subdirs, names in os.walk(base):
        # Pruning in place keeps os.walk out of excluded trees; site-packages alone can hold
        # ten times more files than the stdlib.
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]
        relative = Path(directory).relative_to(base)
        files.extend(relative / name for name in names if name.endswith(".py"))
    return sorted(files, key=lambda p: p.as_posix())


def is_validation_file(relative: Path, fraction: float = 0.05) -> bool:
    """Says whether a file belongs to the held-out split.

    Args:
        relative: the file's path relative to the stdlib root.
        fraction: the share of files to hold out.

    Returns:
        True for about ``fraction`` of all paths, always the same ones.
    """
    digest = hashlib.sha256(relative.as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


@dataclass(frozen=True)
class Corpus:
    """The two splits as raw bytes, plus what they were built from.

    Attributes:
        train: the training bytes.
        val: the held-out bytes.
        n_train_files: how many files went into ``train``.
        n_val_files: how many files went into ``val``.
        root: the stdlib directory that was read.
    """

    train: bytes
    val: bytes
    n_train_files: int
    n_val_files: int
    root: str

    def describe(self) -> str:
        """Returns a one-line summary, stored with the weights so a number can be traced."""
        return (
            f"stdlib {self.root}: {self.n_train_files} train files ({len(self.train)} B), "
            f"{self.n_val_files} held-out files ({len(self.val)} B)"
        )


def load_corpus(
    max_files: int | None = None, val_fraction: float = 0.05, root: Path | None = None
) -> Corpus:
    """Reads the corpus and splits it.

    Args:
        max_files: read only the first ``max_files`` files (for quick tests).
        val_fraction: the share of files held out.
        root: the tree to read; the running interpreter's stdlib by default.

    Returns:
        The corpus. With very few files the hash split can leave one side empty; then the
        last file is held out (or, for a single file, its last ``val_fraction`` of bytes), so
        both splits are always non-empty.

    Raises:
        ValueError: when no file was found.
    """
    base = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = stdlib_files(base)
    if max_files is not None:
        files = files[:max_files]
    if not files:
        raise ValueError(f"no .py files found under {base}")
    val_files = [f for f in files if is_validation_file(f, val_fraction)]
    train_files = [f for f in files if not is_validation_file(f, val_fraction)]
    if not val_files and len(train_files) > 1:
        val_files = [train_files.pop()]
    if not train_files and len(val_files) > 1:
        train_files = [val_files.pop(0)]

    def read(paths: list[Path]) -> bytes:
        return _SEPARATOR.join((base / p).read_bytes() for p in paths)

    train, val = read(train_files), read(val_files)
    if not val or not train:
        data = train or val
        cut = int(len(data) * (1.0 - val_fraction))
        train, val = data[:cut], data[cut:]
    return Corpus(train, val, len(train_files), len(val_files), str(base))


def _as_tensor(data: bytes) -> torch.Tensor:
    # bytearray, not bytes: torch.frombuffer warns on read-only buffers, and the warning would
    # be an error under the test suite's filterwarnings.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def sample_windows(
    data: bytes | torch.Tensor, batch: int, context: int, generator: torch.Generator
) -> torch.Tensor:
    """Draws one batch of random windows.

    Args:
        data: the bytes (or a uint8 tensor of them, to avoid re-converting each call).
        batch: the number of windows.
        context: the model's context; each window holds ``context + 1`` bytes so that inputs
            are ``w[:, :-1]`` and targets ``w[:, 1:]``.
        generator: the source of randomness, for reproducible runs.

    Returns:
        A LongTensor of shape ``[batch, context + 1]``.

    Raises:
        ValueError: when ``data`` is shorter than one window.
    """
    flat = data if isinstance(data, torch.Tensor) else _as_tensor(data)
    span = context + 1
    if flat.numel() < span:
        raise ValueError(f"corpus has {flat.numel()} bytes, fewer than one window ({span})")
    starts = torch.randint(0, flat.numel() - span + 1, (batch,), generator=generator)
    offsets = starts[:, None] + torch.arange(span)[None, :]
    return flat[offsets].long()


def iter_windows(data: bytes, batch: int, context: int, seed: int) -> Iterator[torch.Tensor]:
    """Yields random ``[batch, context + 1]`` windows forever, reproducibly from ``seed``.

    Args:
        data: the bytes to draw from.
        batch: windows per batch.
        context: the model's context (each window is one byte longer).
        seed: seeds the private ``torch.Generator``; the global RNG is left alone.

    Yields:
        LongTensors of shape ``[batch, context + 1]``.
    """
    flat = _as_tensor(data)
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield sample_windows(flat, batch, context, generator)


def eval_windows(data: bytes, n: int, context: int) -> torch.Tensor:
    """Returns up to ``n`` evenly spaced, non-overlapping windows covering ``data``.

    A fixed set, not a random one, so validation losses from different runs and steps are
    comparable.

    Args:
        data: the held-out bytes.
        n: the most windows to return.
        context: the model's context (each window is one byte longer).

    Returns:
        A LongTensor of shape ``[min(n, len(data) // (context + 1)), context + 1]``.
    """
    flat = _as_tensor(data)
    span = context + 1
    available = flat.numel() // span
    count = min(n, available)
    if count == 0:
        raise ValueError(f"held-out split has {flat.numel()} bytes, fewer than one window")
    stride = available // count
    starts = torch.arange(count) * stride * span
    offsets = starts[:, None] + torch.arange(span)[None, :]
    return flat[offsets].long()
