"""Order across replicas: outputs of an ordered, replicated node leave in input order.

Each input gets a sequence number when taken. The oldest unfinished one (the head)
emits as it goes, so a generator at the head streams; later ones hold their outputs
until they become the head. At most ``_window`` inputs are in progress.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ._request import Item

if TYPE_CHECKING:
    from ._backend import Backend

__all__ = ["OrderedOutputs"]


class _Slot:
    """The outputs of one input of an ordered, replicated node."""

    __slots__ = ("done", "live", "outs", "waiters")

    def __init__(self, live: bool) -> None:
        self.outs: list[Item] = []
        self.done = False
        self.live = live  # emits directly: every earlier input is out
        self.waiters: deque[Any] = deque()  # its producer, waiting for it to go live


class OrderedOutputs:
    """The reorder state and its methods, mixed into ``NodeRunner``."""

    backend: Backend
    _seq: int
    _head: int
    _slots: dict[int, _Slot]
    _flushing: bool
    _window_waiters: deque[Any]

    emit: Callable[[Item], Awaitable[None]]  # NodeRunner.emit

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
