"""The seed document's pipeline as a graph: preprocess → distribute → run sub-models in
parallel threads → pass data between them → merge.

A byte-level text encoder split into two sub-models: ``stage1`` (embedding + convolution)
runs on two thread replicas, ``stage2`` (projection) batches windows from all requests.
Long texts are sharded into 32-byte windows that travel independently and are merged
back (mean-pooled, normalised) per request. Weights are seeded, not trained: the graph
shows the engine's mechanics, not a model's quality.

    dataflow run graphs/pipeline_demo.py
"""

from __future__ import annotations

import torch
from torch import nn

import dataflow as df

__all__ = ["EXAMPLE_INPUTS", "build"]

EXAMPLE_INPUTS = [
    "def main(argv):",
    "import asyncio, torch",
    "Backpressure suspends the producer all the way back to the caller. " * 3,
]


class Stage1(nn.Module):
    """Bytes → features: embedding then a 1-d convolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).transpose(0, 1).unsqueeze(0)  # [1, dim, L]
        return torch.relu(self.conv(x)).squeeze(0).mean(dim=1)  # [dim]


def build(window: int = 32, dim: int = 64, replicas: int = 2, seed: int = 0) -> df.Graph:
    """The demo graph. ``window``: bytes per shard; ``dim``: feature size."""
    torch.manual_seed(seed)
    stage1_model = Stage1(dim)
    projection = nn.Linear(dim, dim)

    @df.encode
    def to_bytes(text: str) -> torch.Tensor:
        data = text.encode("utf-8")
        if not data:
            raise ValueError("empty text")
        return torch.tensor(list(data), dtype=torch.long)

    @df.shard
    def windows(ids: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(ids, window))

    stage1 = df.infer(stage1_model, name="stage1", placement="thread", replicas=replicas)
    stage2 = df.infer(
        projection,
        name="stage2",
        placement="thread",
        batch=df.Batch(max_size=16, max_wait=0.002),
    )

    @df.merge
    def pool(parts: list[torch.Tensor]) -> torch.Tensor:
        return nn.functional.normalize(torch.stack(parts).mean(dim=0), dim=0)

    return df.Graph("pipeline_demo", to_bytes >> windows >> stage1 >> stage2 >> pool)
