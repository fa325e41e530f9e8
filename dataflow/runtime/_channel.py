"""A bounded, cancellation-safe channel that suspends only when it must.

Items sit in a deque. ``put_nowait``/``take`` never suspend; ``send`` and
``wait_readable`` park on a wait list only when the channel is full or empty. A wake-up
only tells a parked task to look again, so an item is never handed to a task that may be
cancelled before it runs: a cancelled ``send`` has not enqueued its item and a cancelled
receive has taken nothing, so nothing is lost or duplicated.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Generic, TypeVar

from ._backend import Backend

__all__ = ["BrokenChannel", "Channel", "ChannelStats", "EndOfChannel"]

T = TypeVar("T")


class EndOfChannel(Exception):
    """Every sender closed the channel and it is drained: a clean end."""


class BrokenChannel(Exception):
    """The receiving side went away; nothing more can be sent."""


class ChannelStats:
    """Counters a channel keeps; timing is taken only on the slow (waiting) paths."""

    __slots__ = ("blocked_s", "items", "max_depth", "starved_s")

    def __init__(self) -> None:
        self.items = 0
        self.blocked_s = 0.0
        self.starved_s = 0.0
        self.max_depth = 0


class Channel(Generic[T]):
    """A bounded FIFO between tasks of one event loop.

    Args:
        backend: the running loop's primitives.
        capacity: how many items it holds before ``send`` waits.
        senders: how many senders must call :meth:`close_sender` before receivers see
            the end.
        name: for stats and error messages.
    """

    __slots__ = (
        "_buf",
        "_recv_waiters",
        "_send_waiters",
        "backend",
        "broken",
        "capacity",
        "closed",
        "consumer",
        "name",
        "senders",
        "stats",
    )

    def __init__(
        self, backend: Backend, capacity: int, *, senders: int = 1, name: str = ""
    ) -> None:
        if capacity < 1:
            raise ValueError("channel capacity must be >= 1")
        self.backend = backend
        self.capacity = capacity
        self.senders = senders
        self.name = name
        self.closed = senders == 0
        self.broken = False
        self._buf: deque[T] = deque()
        self._recv_waiters: deque[Any] = deque()
        self._send_waiters: deque[Any] = deque()
        self.stats = ChannelStats()
        # The node that may run items in the producer's task while it is idle.
        self.consumer: Any = None

    def __len__(self) -> int:
        return len(self._buf)

    # -- sending -------------------------------------------------------------------
    def put_nowait(self, item: T) -> bool:
        """Enqueue ``item`` if there is room; False (item not enqueued) if full."""
        buf = self._buf
        if len(buf) >= self.capacity or self.broken:
            return False
        buf.append(item)
        if self._recv_waiters:
            self.backend.wake(self._recv_waiters)
        return True

    def put_many(self, items: list[T]) -> None:
        """Enqueue ``items`` regardless of capacity (callers reserve room first)."""
        if not items or self.broken:
            return
        self._buf.extend(items)
        waiters = self._recv_waiters
        if waiters:
            wake = self.backend.wake
            for _ in range(len(items)):
                if not wake(waiters):
                    break

    async def send(self, item: T) -> None:
        """Enqueue ``item``, waiting for room. Cancellation leaves it not enqueued.

        Raises:
            BrokenChannel: the receiving side was closed.
        """
        buf = self._buf
        while len(buf) >= self.capacity:
            if self.broken:
                raise BrokenChannel(self.name)
            start = time.perf_counter()
            try:
                await self.backend.park(self._send_waiters)
            finally:
                self.stats.blocked_s += time.perf_counter() - start
        if self.broken:
            raise BrokenChannel(self.name)
        buf.append(item)
        if self._recv_waiters:
            self.backend.wake(self._recv_waiters)
        if len(buf) < self.capacity and self._send_waiters:
            # A cancelled sender may have passed its wake to us; keep the chain going.
            self.backend.wake(self._send_waiters)

    def close_sender(self) -> None:
        """One sender is done; after the last one, receivers see the end once drained."""
        if self.senders > 0:
            self.senders -= 1
        if self.senders == 0 and not self.closed:
            self.closed = True
            self.backend.wake_all(self._recv_waiters)

    def close_receiver(self) -> None:
        """The receiving side is gone: pending and future sends raise BrokenChannel."""
        self.broken = True
        self._buf.clear()
        self.backend.wake_all(self._send_waiters)

    # -- receiving -----------------------------------------------------------------
    def take(self, limit: int) -> list[T]:
        """Take up to ``limit`` items without waiting (possibly none)."""
        buf = self._buf
        n = len(buf)
        if n == 0:
            return []
        if n > self.stats.max_depth:
            self.stats.max_depth = n
        if n <= limit:
            items = list(buf)
            buf.clear()
        else:
            n = limit
            items = [buf.popleft() for _ in range(limit)]
        self.stats.items += n
        waiters = self._send_waiters
        if waiters:
            wake = self.backend.wake
            for _ in range(n):
                if not wake(waiters):
                    break
        return items

    def unget(self, items: list[T]) -> None:
        """Put ``items`` -- the last ones :meth:`take` gave, in order -- back in front,
        to be taken first next time (by any receiver: a waiting one is woken)."""
        if not items or self.broken:
            return
        self._buf.extendleft(reversed(items))
        self.stats.items -= len(items)
        if self._recv_waiters:
            self.backend.wake(self._recv_waiters)

    async def wait_readable(self) -> bool:
        """Wait until an item is there or the channel ended; False at the end."""
        while not self._buf:
            if self.closed:
                return False
            start = time.perf_counter()
            try:
                await self.backend.park(self._recv_waiters)
            finally:
                self.stats.starved_s += time.perf_counter() - start
        if len(self._buf) > 1 and self._recv_waiters:
            self.backend.wake(self._recv_waiters)  # more than one item: share the work
        return True

    async def receive(self) -> T:
        """Receive one item, waiting if needed.

        Raises:
            EndOfChannel: every sender closed and nothing is left.
        """
        while True:
            items = self.take(1)
            if items:
                return items[0]
            if not await self.wait_readable():
                raise EndOfChannel(self.name)
