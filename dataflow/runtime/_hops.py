"""Hops: how items move from one node to the next.

``advance`` runs idle simple nodes in the producer's task (chaining while idle);
``deliver_nowait`` enqueues what fits; ``deliver`` waits for room (the slow path).
"""

from __future__ import annotations

from ._channel import Channel
from ._request import Item, Sink

__all__ = ["Advanced", "Output", "advance", "deliver", "deliver_nowait"]

Output = tuple[Channel[Item] | Sink, int]  # (where to, port at the receiving node)
Advanced = tuple[list[Item], Channel[Item] | Sink, int]


def advance(items: list[Item], dest: Channel[Item] | Sink, port: int) -> Advanced:
    """Run idle downstream nodes on ``items`` in the current task.

    While the next node's only worker is parked on an empty input, a hop through its
    channel would only wake it to do what can be done right here; so its body runs now
    and the items move on to its output. This stops at a node that is busy, has items
    queued, or is not simple, and returns what is left to enqueue there (Flink chains
    operators statically; this chains them only while they are idle, so queues,
    capacities and backpressure are untouched under load).
    """
    while items and type(dest) is Channel:
        runner = dest.consumer
        if runner is None or not runner.inline_sync or not runner.parked or len(dest):
            break
        dest.stats.items += len(items)  # they crossed the edge, if not the queue
        items = runner.inline(items)
        if not items:
            break
        dest, port = runner.outputs[0]
    return items, dest, port


def deliver_nowait(items: list[Item], dest: Channel[Item] | Sink, port: int) -> bool:
    """Enqueue ``items`` at ``dest`` if there is room for all; otherwise enqueue what fits
    and leave the rest in ``items`` (removing what was enqueued) and return False."""
    if port:
        for it in items:
            it.port = port
    if type(dest) is Channel:
        if dest.broken:
            return False  # let the slow path raise BrokenChannel
        room = dest.capacity - len(dest)
        if len(items) <= room:
            dest.put_many(items)
            return True
        if room > 0:
            dest.put_many(items[:room])
            del items[:room]
        return False
    while items:
        if not dest.put_nowait(items[0]):
            return False
        del items[0]
    return True


async def deliver(items: list[Item], dest: Channel[Item] | Sink) -> None:
    """Send ``items`` to ``dest`` one by one, waiting for room (the slow path)."""
    for it in items:
        await dest.send(it)
