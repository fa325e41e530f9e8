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

import anyio

from ...graph import Node
from .._backend import Backend, ThreadCall
from ._base import Replica, _call_kw

__all__ = ["ThreadReplica", "default_intra_op_threads"]


def default_intra_op_threads(thread_replicas: int) -> int:
    """Cores shared evenly among all thread replicas of a graph (at least one each)."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, thread_replicas))


class ThreadReplica(Replica):
    """A replica whose body lives and runs in its own long-lived thread."""

    def __init__(
        self,
        node: Node,
        index: int,
        backend: Backend,
        *,
        owns_setup: bool,
        intra_op_threads: int | None,
    ) -> None:
        super().__init__(node, index, owns_setup=owns_setup)
        self.backend = backend
        self.intra_op_threads = intra_op_threads
        self._queue: queue.SimpleQueue[ThreadCall | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._thread = threading.Thread(
            target=self._main, name=f"dataflow:{self.node.name}:{self.index}", daemon=True
        )
        self._thread.start()
        await super().start()

    def _main(self) -> None:
        self.thread_init()
        get = self._queue.get
        while True:
            call = get()
            if call is None:
                return
            call.run()

    def thread_init(self) -> None:
        """Runs first in the replica's thread: per-thread settings live here."""
        if self.intra_op_threads is not None:
            # torch's intra-op thread count is per thread: set it where the work runs.
            import torch

            torch.set_num_threads(self.intra_op_threads)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.backend.call_in_thread(self._queue.put, ThreadCall(fn, args))

    async def call_until(
        self, value: Any, kw: dict[str, Any], abandon: Callable[[Callable[[], None]], None]
    ) -> Any:
        """:meth:`call`, but the wait ends with ``Abandoned`` when ``abandon``'s hook
        is called (the thread still finishes the call)."""
        assert self.body is not None
        call = ThreadCall(_call_kw, (self.body, value, kw))
        return await self.backend.call_in_thread(self._queue.put, call, abandon)

    async def stop(self) -> None:
        """Tear the body down in its thread, let queued calls finish, join the thread."""
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        with anyio.CancelScope(shield=True):
            try:
                await super().stop()
                await self._run(lambda: None)  # everything queued before has run
            finally:
                self._queue.put(None)
                thread.join()
