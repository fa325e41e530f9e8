"""Admission for the server: a 429's ``Retry-After`` from the recent drain rate, and the
server's deadline as a ceiling that a client may only shorten."""

from __future__ import annotations

import time
from collections import deque

from ..engine import Engine

__all__ = ["DrainRate", "ceiling"]

WINDOW_S = 10.0  # the drain rate is measured over this much recent time
MAX_RETRY_S = 60.0


def ceiling(server: float | None, client: float | None) -> float | None:
    """The deadline of a request: the client's, but never beyond the server's."""
    if client is None:
        return server
    if server is None:
        return client
    return min(server, client)


class DrainRate:
    """How fast a model's requests end, sampled from its engine's counters.

    ``retry_after()`` answers a rejected client: the time for the requests in flight to
    free one place per client rejected in the last second, at the rate they ended over
    the last ``WINDOW_S`` seconds (``fallback`` when nothing ended recently).
    """

    def __init__(self, engine: Engine, fallback: float) -> None:
        self.engine = engine
        self.fallback = fallback
        self._samples: deque[tuple[float, int]] = deque()  # (time, requests ended so far)
        self._rejected: deque[float] = deque()

    def _ended(self) -> int:
        c = self.engine.counters
        return c.succeeded + c.failed + c.cancelled

    def sample(self, now: float | None = None) -> None:
        """Record the counters (cheap; at most every 0.25 s is kept)."""
        now = time.monotonic() if now is None else now
        samples = self._samples
        if samples and now - samples[-1][0] < 0.25:
            return
        samples.append((now, self._ended()))
        while samples and now - samples[0][0] > WINDOW_S:
            samples.popleft()

    def rate(self, now: float | None = None) -> float:
        """Requests ended per second over the recent window (0.0 when unknown)."""
        now = time.monotonic() if now is None else now
        self.sample(now)
        if not self._samples:
            return 0.0
        t0, ended0 = self._samples[0]
        span = now - t0
        done = self._ended() - ended0
        return done / span if span > 0.05 and done > 0 else 0.0

    def retry_after(self, now: float | None = None) -> float:
        """Seconds a rejected client should wait (at least 0.05, at most 60)."""
        now = time.monotonic() if now is None else now
        rejected = self._rejected
        rejected.append(now)
        while rejected and now - rejected[0] > 1.0:
            rejected.popleft()
        rate = self.rate(now)
        if rate <= 0:
            return self.fallback
        return min(MAX_RETRY_S, max(0.05, len(rejected) / rate))
