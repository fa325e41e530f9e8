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
from collections import deque
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
        # At most one call is submitted to the thread at a time: a call abandoned by its
        # request keeps the thread busy until it returns, and later calls wait here, on
        # the loop, where their own request's end can still stop them.
        self._busy = False
        self._idle: deque[Any] = deque()
        self._thread_error: BaseException | None = None

    async def start(self) -> None:
        thread = threading.Thread(
            target=self._main, name=f"dataflow:{self.node.name}:{self.index}", daemon=True
        )
        thread.start()  # raises if the thread cannot start: nothing to stop then
        self._thread = thread
        await super().start()

    def _main(self) -> None:
        try:
            self.thread_init()
        except BaseException as exc:  # every call fails with it, start-up first
            self._thread_error = exc
        get = self._queue.get
        while True:
            call = get()
            if call is None:
                return
            if self._thread_error is not None and not call.cancelled:
                call.fn, call.args = _raise, (self._thread_error,)
            call.run()

    def thread_init(self) -> None:
        """Runs first in the replica's thread: per-thread settings live here."""
        if self.intra_op_threads is not None:
            # torch's intra-op thread count is per thread: set it where the work runs.
            import torch

            torch.set_num_threads(self.intra_op_threads)

    @property
    def busy(self) -> bool:
        """A call is in the thread (possibly one whose request already ended)."""
        return self._busy

    def _done(self) -> None:
        self._busy = False
        if self._idle:
            self.backend.wake(self._idle)

    async def _submit(
        self, call: ThreadCall, abandon: Callable[[Callable[[], None]], None] | None = None
    ) -> Any:
        while self._busy:
            await self.backend.park(self._idle)
        self._busy = True
        call.on_done = self._done
        return await self.backend.call_in_thread(self._queue.put, call, abandon)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._submit(ThreadCall(fn, args))

    async def call_until(
        self, value: Any, kw: dict[str, Any], abandon: Callable[[Callable[[], None]], None]
    ) -> Any:
        """:meth:`call`, but the wait ends with ``Abandoned`` when ``abandon``'s hook
        is called (the thread still finishes the call)."""
        assert self.body is not None
        return await self._submit(ThreadCall(_call_kw, (self.body, value, kw)), abandon)

    async def stop(self) -> None:
        """Tear the body down in its thread and join it, within :attr:`grace` seconds;
        a body still running then leaves its (daemon) thread behind and sets
        :attr:`stuck`."""
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        with anyio.CancelScope(shield=True):
            try:
                with anyio.move_on_after(self.grace) as scope:
                    await super().stop()
                    try:
                        await self._run(lambda: None)  # everything submitted has run
                    except Exception:  # the thread's own start-up error
                        pass
                if scope.cancelled_caught:
                    self.stuck = True
            finally:
                self._queue.put(None)
                if not self.stuck:
                    thread.join()  # it has nothing left to do but return


def _raise(error: BaseException) -> None:
    raise error
