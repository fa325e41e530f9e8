"""The few event-loop primitives the hot path needs, per backend.

anyio gives us task groups and cancel scopes, but its memory streams and events
checkpoint on every operation, which costs several times a raw ``asyncio.Queue`` hop.
Channels here suspend only when they must wait, so they need three primitives that map
straight onto each loop: *park* the current task on a wait list, *wake* one parked task,
and *call* a function in a thread and get its result back on the loop without polling
(or, from any thread, have a function run on the loop soon: :meth:`Backend.soon`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import sniffio

__all__ = [
    "Abandoned",
    "AsyncioBackend",
    "Backend",
    "ThreadCall",
    "TrioBackend",
    "current_backend",
]


class Abandoned(Exception):
    """The wait for a thread call was given up (its request ended); the call runs on."""


class ThreadCall:
    """One pending call into a worker thread; its outcome reaches the loop by callback."""

    __slots__ = ("args", "cancelled", "error", "fn", "on_done", "result", "waker")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.waker: Callable[[], None] | None = None
        # Set on the loop when nobody waits for the outcome any more: a call the thread
        # has not begun is then skipped (and its arguments dropped) when reached.
        self.cancelled = False
        # Called on the loop once the thread is done with the call (run or skipped),
        # whether or not anybody still waits for it.
        self.on_done: Callable[[], None] | None = None

    def run(self) -> None:
        """Run in the worker thread, then hand the outcome back to the loop."""
        if self.cancelled:
            self.args = ()
        else:
            try:
                self.result = self.fn(*self.args)
            except BaseException as exc:  # delivered to the awaiting task, re-raised there
                self.error = exc
        waker = self.waker
        if waker is not None:
            try:
                waker()
            except RuntimeError:
                pass  # the loop is gone (a call that outlived its engine's grace period)


class Backend:
    """Primitives for one running event loop."""

    name: str = "?"

    async def park(self, waiters: deque[Any]) -> None:
        """Suspend until :meth:`wake` picks this task from ``waiters``.

        Cancellation removes the task from ``waiters``; if it had already been woken, the
        wake is passed on to the next waiter so that no wake-up is lost.
        """
        raise NotImplementedError

    def wake(self, waiters: deque[Any]) -> bool:
        """Wake the first parked task of ``waiters``; False if there was none."""
        raise NotImplementedError

    def wake_all(self, waiters: deque[Any]) -> None:
        while self.wake(waiters):
            pass

    async def call_in_thread(
        self,
        submit: Callable[[ThreadCall], None],
        call: ThreadCall,
        abandon: Callable[[Callable[[], None]], None] | None = None,
    ) -> Any:
        """Hand ``call`` to a thread via ``submit`` and wait for its outcome.

        If the waiting task is cancelled, the thread still finishes the call; its result
        is discarded. ``abandon``, if given, receives a function that stops the wait at
        once with :class:`Abandoned` (cheaper than a cancel scope around the wait).
        """
        raise NotImplementedError

    def soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the loop soon; callable from any thread. Raises RuntimeError
        once the loop is gone."""
        raise NotImplementedError

    def time(self) -> float:
        raise NotImplementedError


class AsyncioBackend(Backend):
    name = "asyncio"

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()

    async def park(self, waiters: deque[Any]) -> None:
        fut = self.loop.create_future()
        waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.wake(waiters)  # woken, then cancelled: the wake belongs to another
            else:
                try:
                    waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def wake(self, waiters: deque[Any]) -> bool:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return True
        return False

    async def call_in_thread(
        self,
        submit: Callable[[ThreadCall], None],
        call: ThreadCall,
        abandon: Callable[[Callable[[], None]], None] | None = None,
    ) -> Any:
        loop = self.loop
        fut = loop.create_future()

        def resolved() -> None:
            if not fut.done():
                fut.set_result(None)
            if call.on_done is not None:
                call.on_done()

        def waker() -> None:
            loop.call_soon_threadsafe(resolved)

        call.waker = waker
        if abandon is not None:

            def give_up() -> None:
                if not fut.done():
                    fut.set_exception(Abandoned())

            abandon(give_up)
        submit(call)
        try:
            await fut
        except BaseException:
            call.cancelled = True  # not begun yet: the thread skips it
            raise
        if call.error is not None:
            raise call.error
        return call.result

    def soon(self, fn: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def time(self) -> float:
        return self.loop.time()


class TrioBackend(Backend):
    name = "trio"

    def __init__(self) -> None:
        import trio

        self._trio = trio
        self._lowlevel = trio.lowlevel
        self._token = trio.lowlevel.current_trio_token()

    async def park(self, waiters: deque[Any]) -> None:
        lowlevel = self._lowlevel
        task = lowlevel.current_task()
        waiters.append(task)

        def abort(_: Any) -> Any:
            try:
                waiters.remove(task)
            except ValueError:
                pass
            return lowlevel.Abort.SUCCEEDED

        await lowlevel.wait_task_rescheduled(abort)

    def wake(self, waiters: deque[Any]) -> bool:
        # trio never calls abort after a reschedule, so a woken task cannot lose its wake.
        if waiters:
            self._lowlevel.reschedule(waiters.popleft())
            return True
        return False

    async def call_in_thread(
        self,
        submit: Callable[[ThreadCall], None],
        call: ThreadCall,
        abandon: Callable[[Callable[[], None]], None] | None = None,
    ) -> Any:
        lowlevel = self._lowlevel
        task = lowlevel.current_task()
        # Every callback below runs on the trio thread, so a plain flag is enough.
        state = {"waiting": True}

        def resolved() -> None:
            if state["waiting"]:
                state["waiting"] = False
                lowlevel.reschedule(task)
            if call.on_done is not None:
                call.on_done()

        def abort(_: Any) -> Any:
            state["waiting"] = False
            return lowlevel.Abort.SUCCEEDED

        token = self._token

        def waker() -> None:
            token.run_sync_soon(resolved)

        call.waker = waker
        if abandon is not None:
            import outcome

            def give_up() -> None:
                if state["waiting"]:
                    state["waiting"] = False
                    lowlevel.reschedule(task, outcome.Error(Abandoned()))

            abandon(give_up)
        submit(call)
        try:
            await lowlevel.wait_task_rescheduled(abort)
        except BaseException:
            call.cancelled = True  # not begun yet: the thread skips it
            raise
        if call.error is not None:
            raise call.error
        return call.result

    def soon(self, fn: Callable[[], None]) -> None:
        try:
            self._token.run_sync_soon(fn)
        except self._trio.RunFinishedError as exc:
            raise RuntimeError("the trio run is over") from exc

    def time(self) -> float:
        return float(self._trio.current_time())


def current_backend() -> Backend:
    """The backend of the running event loop (asyncio, uvloop or trio)."""
    library = sniffio.current_async_library()
    if library == "trio":
        return TrioBackend()
    if library == "asyncio":
        return AsyncioBackend()
    raise RuntimeError(f"dataflow runs on asyncio or trio, not {library!r}")
