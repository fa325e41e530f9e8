"""Order across replicas: outputs of an ordered, replicated node leave in input order.

Per request (the general path): an input whose request has no earlier input still
going out on this node emits as it goes, so every request's generator streams at once,
whatever other requests do; a later input of the same request holds its outputs (at
most its stream's buffer, then its producer waits) until the earlier one is out, then
takes over. Requests never wait for each other (``map(ordered=True)`` orders results
itself).

Per batch (the batching path, where one call mixes requests): each batch gets a sequence
number when taken; the oldest unfinished one (the head) emits, later ones deposit their
outputs when done. At most ``_window`` inputs (or batches) are in progress either way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ._request import Item, Request

if TYPE_CHECKING:
    from ._backend import Backend

__all__ = ["OrderedOutputs"]


class _Slot:
    """The outputs of one input of an ordered, replicated node."""

    __slots__ = ("done", "live", "next", "outs", "waiters")

    def __init__(self, live: bool) -> None:
        self.outs: list[Item] = []
        self.done = False
        self.live = live  # emits directly: every earlier input is out
        self.waiters: deque[Any] = deque()  # its producer, waiting for it to go live
        self.next: _Slot | None = None  # the same request's next input on this node


class OrderedOutputs:
    """The reorder state and its methods, mixed into ``NodeRunner``."""

    backend: Backend
    _seq: int
    _head: int
    _slots: dict[int, _Slot]
    _flushing: bool
    _window_waiters: deque[Any]
    _tails: dict[int, _Slot]  # per request: the slot of its newest input (general path)
    _open: int  # inputs taken and not yet out (general path)

    emit: Callable[[Item], Awaitable[None]]  # NodeRunner.emit

    # -- per request (general path) ----------------------------------------------------
    def _open_slot(self, req: Request) -> _Slot:
        """A slot for a new input of ``req``: live unless an earlier input of the same
        request is still going out here (then it follows that one)."""
        tail = self._tails.get(req.id)
        slot = _Slot(live=tail is None)
        if tail is not None:
            tail.next = slot
        self._tails[req.id] = slot
        self._open += 1
        return slot

    async def _close_slot(self, req: Request, slot: _Slot) -> None:
        """``slot``'s input is done. If it was live, the request's next input takes
        over: its held outputs go out, then it emits as it goes (or, done too, hands on)."""
        slot.done = True
        if not slot.live:
            return  # its predecessor hands over when it is out
        while True:
            self._open -= 1
            self.backend.wake_all(self._window_waiters)
            nxt = slot.next
            if nxt is None:
                if self._tails.get(req.id) is slot:
                    del self._tails[req.id]
                return
            while nxt.outs:  # its producer may add more meanwhile: until none is left
                await self.emit(nxt.outs.pop(0))
            nxt.live = True
            if nxt.waiters:
                self.backend.wake_all(nxt.waiters)
            if not nxt.done:
                return
            slot = nxt

    # -- per batch (batching path) -------------------------------------------------------
    def _open_seq(self) -> tuple[int, _Slot]:
        seq = self._seq
        self._seq += 1
        slot = self._slots[seq] = _Slot(live=seq == self._head)
        return seq, slot

    async def _deposit(self, seq: int, outs: list[Item]) -> None:
        """Hand in the whole output of input ``seq`` (a batch worker's way)."""
        slot = self._slots.get(seq)
        if slot is None:
            slot = self._slots[seq] = _Slot(live=False)
        slot.outs.extend(outs)
        slot.done = True
        if seq == self._head:
            await self._advance()

    async def _advance(self) -> None:
        """Flush finished inputs from the head on; make the next unfinished one live."""
        if self._flushing:
            return  # the task already flushing will get there
        self._flushing = True
        try:
            while (slot := self._slots.get(self._head)) is not None:
                while slot.outs:
                    await self.emit(slot.outs.pop(0))
                if not slot.done:
                    slot.live = True
                    if slot.waiters:
                        self.backend.wake_all(slot.waiters)
                    break
                del self._slots[self._head]
                self._head += 1
                self.backend.wake_all(self._window_waiters)
        finally:
            self._flushing = False
