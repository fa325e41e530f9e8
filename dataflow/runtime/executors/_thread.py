"""Thread placement: each replica owns one long-lived thread.

The thread is created when the engine starts and joined when it stops, so thread-local
state — torch's intra-op thread count, a CUDA stream, a model loaded by ``setup()`` —
stays put for the replica's whole life. Work goes in through a ``SimpleQueue``; results
come back through the loop's thread-safe callback, never by polling.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from .._backend import Backend, ThreadCall

__all__ = ["ThreadReplica", "default_intra_op_threads"]

_STOP = None


def default_intra_op_threads(thread_replicas: int) -> int:
    """Cores shared evenly among all thread replicas of a graph (at least one each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, thread_replicas))


class ThreadReplica:
    """A long-lived worker thread that runs calls handed to it, one at a time."""

    def __init__(self, backend: Backend, name: str, intra_op_threads: int | None) -> None:
        self.backend = backend
        self.name = name
        self.intra_op_threads = intra_op_threads
        self._queue: queue.SimpleQueue[ThreadCall | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        if self.intra_op_threads is not None:
            # torch's intra-op thread count is per thread: set it where the work runs.
            import torch

            torch.set_num_threads(self.intra_op_threads)
        get = self._queue.get
        while True:
            call = get()
            if call is None:
                return
            call.run()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in this replica's thread and return its result.

        Raises whatever ``fn`` raised. If the caller is cancelled the call still
        completes in the thread and its result is discarded.
        """
        return await self.backend.call_in_thread(self._queue.put, ThreadCall(fn, args))

    async def stop(self) -> None:
        """Let queued calls finish, then end and join the thread."""
        if self._stopped or self._thread is None:
            return
        self._stopped = True
        done = ThreadCall(lambda: None, ())
        try:
            await self.backend.call_in_thread(self._queue.put, done)
        finally:
            self._queue.put(_STOP)
            # The thread has run every call before the marker: joining takes no time,
            # unless a shielded cancellation cut the wait short.
            self._thread.join()
