"""One graph, in-process or on a Ray cluster: only the placement changes.

    python examples/ray_cluster.py                      # local Ray instance (started here)
    python examples/ray_cluster.py --address auto       # the cluster `ray start --head` runs
    python examples/ray_cluster.py --placement thread   # the same graph without Ray

A tokenizer runs on the event loop; an embedding model (an ``nn.Module`` class whose
``setup()`` builds the weights once per actor) runs batched in two replicas; a generator
node streams words back. With ``--placement ray`` each replica is a Ray actor and tensors
travel through Ray's object store; the engine, its channels and its backpressure stay
in this process and event loop. Needs the extra: ``pip install 'dataflow-engine[ray]'``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

import anyio
import torch
from torch import nn

import dataflow as df

VOCAB = 1000
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


@df.encode
def tokenize(text: str) -> torch.Tensor:
    """Bytes of each word hashed into a small vocabulary (a stand-in tokenizer)."""
    ids = [sum(word.encode()) % VOCAB for word in text.split()] or [0]
    return torch.tensor(ids, dtype=torch.long)


class Embed(nn.Module):
    """Mean of learned word vectors; ``setup()`` makes the weights where the replica runs."""

    def __init__(self) -> None:
        super().__init__()
        self.table: nn.Embedding | None = None

    def setup(self) -> None:
        torch.manual_seed(0)  # every replica, in every actor, holds the same weights
        self.table = nn.Embedding(VOCAB, 16)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, lengths = batch  # collate="pad": padded ids and each row's length
        assert self.table is not None
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        vectors: torch.Tensor = self.table(ids) * mask[..., None]
        return vectors.sum(1) / lengths[:, None]


def describe(vector: torch.Tensor) -> Iterator[str]:
    """A generator node: streams the three nearest 'words' of the embedding."""
    for index in vector.abs().topk(3).indices.tolist():
        yield WORDS[index % len(WORDS)]


def build(placement: str, address: str | None) -> df.Graph:
    ray_opts: dict[str, Any] = {"num_cpus": 1, "max_in_flight": 2, "max_restarts": 1}
    if address is not None:
        ray_opts["address"] = address
    opts = ray_opts if placement == "ray" else {}
    # The light generator reserves no CPU, so that the whole graph fits on two cores.
    light = {**opts, "num_cpus": 0} if placement == "ray" else {}
    embed = df.infer(
        Embed,
        name="embed",
        placement=placement,
        replicas=2,
        batch=df.Batch(max_size=16, max_wait=0.002, collate="pad"),
        options=opts,
    )
    words = df.map(describe, name="describe", placement=placement, options=light)
    return df.Graph("ray-cluster", tokenize >> embed >> words)


async def main(placement: str, address: str | None, n: int) -> None:
    graph = build(placement, address)
    start = time.perf_counter()
    async with df.Engine(graph, max_in_flight=64) as engine:
        print(f"started {placement!r} replicas in {time.perf_counter() - start:.1f} s")
        print("stream:", " ".join([w async for w in engine.stream("the quick brown fox")]))
        texts = [" ".join(WORDS[: 1 + i % len(WORDS)]) for i in range(n)]
        start = time.perf_counter()
        count = 0
        async for _ in engine.map(texts):
            count += 1
        elapsed = time.perf_counter() - start
        print(f"{count} requests in {elapsed:.2f} s ({count / elapsed:.0f}/s)")
        for name, node in engine.stats()["nodes"].items():
            print(f"  {name:<10} items_out={node['items_out']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--placement", choices=["ray", "thread"], default="ray")
    parser.add_argument("--address", default=None, help="a Ray cluster, e.g. 'auto'")
    parser.add_argument("-n", type=int, default=200, help="requests for the batch run")
    args = parser.parse_args()
    anyio.run(main, args.placement, args.address, args.n)
