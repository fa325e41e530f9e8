"""The bounded channel: capacity, end of stream, broken peer, cancellation safety, stats."""

from __future__ import annotations

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from anyio.lowlevel import checkpoint

from dataflow.runtime import BrokenChannel, Channel, EndOfChannel, current_backend

pytestmark = pytest.mark.anyio


def _channel(capacity: int = 2, senders: int = 1) -> Channel[int]:
    return Channel(current_backend(), capacity, senders=senders, name="test")


async def test_put_nowait_respects_capacity() -> None:
    ch = _channel(2)
    assert ch.put_nowait(1)
    assert ch.put_nowait(2)
    assert not ch.put_nowait(3)
    assert ch.take(10) == [1, 2]
    assert ch.put_nowait(3)


async def test_take_is_fifo_and_bounded_by_limit() -> None:
    ch = _channel(5)
    for i in range(5):
        ch.put_nowait(i)
    assert ch.take(2) == [0, 1]
    assert ch.take(10) == [2, 3, 4]
    assert ch.take(10) == []


async def test_unget_puts_taken_items_back_in_front_and_wakes_a_receiver() -> None:
    ch = _channel(5)
    for i in range(5):
        ch.put_nowait(i)
    taken = ch.take(4)
    ch.unget(taken[2:])  # the last two taken go back, before what is still there
    assert ch.stats.items == 2
    got: list[int] = []

    async def receiver() -> None:
        await ch.wait_readable()
        got.extend(ch.take(10))

    assert ch.take(10) == [2, 3, 4]  # empty now: the receiver parks
    async with anyio.create_task_group() as tg:
        tg.start_soon(receiver)
        await wait_all_tasks_blocked()
        ch.unget([7, 8])
    assert got == [7, 8]


async def test_send_waits_for_room_and_resumes_when_taken() -> None:
    ch = _channel(1)
    ch.put_nowait(0)
    sent = anyio.Event()

    async def sender() -> None:
        await ch.send(1)
        sent.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        await wait_all_tasks_blocked()
        assert not sent.is_set()
        assert len(ch) == 1
        assert ch.take(1) == [0]
        await sent.wait()
    assert ch.take(1) == [1]
    assert ch.stats.blocked_s > 0


async def test_receiver_sees_end_after_drain() -> None:
    ch = _channel(4)
    ch.put_nowait(1)
    ch.close_sender()
    assert await ch.receive() == 1
    with pytest.raises(EndOfChannel):
        await ch.receive()


async def test_end_waits_for_every_sender() -> None:
    ch = _channel(4, senders=2)
    ch.close_sender()
    assert not ch.closed
    ch.put_nowait(7)
    ch.close_sender()
    assert ch.closed
    assert await ch.receive() == 7
    assert not await ch.wait_readable()


async def test_parked_receiver_wakes_on_close() -> None:
    ch = _channel(1)
    result: list[bool] = []

    async def receiver() -> None:
        result.append(await ch.wait_readable())

    async with anyio.create_task_group() as tg:
        tg.start_soon(receiver)
        await wait_all_tasks_blocked()
        ch.close_sender()
    assert result == [False]
    assert ch.stats.starved_s > 0


async def test_send_to_broken_channel_raises() -> None:
    ch = _channel(1)
    ch.put_nowait(0)
    errors: list[BaseException] = []

    async def sender() -> None:
        try:
            await ch.send(1)
        except BrokenChannel as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)
        await wait_all_tasks_blocked()
        ch.close_receiver()
    assert len(errors) == 1
    assert not ch.put_nowait(2)


async def test_cancelled_send_does_not_enqueue() -> None:
    ch = _channel(1)
    ch.put_nowait(0)
    with anyio.move_on_after(0):
        await ch.send(1)
    assert ch.take(10) == [0]
    assert ch.take(10) == []


async def test_cancel_during_receive_buffered() -> None:
    """An item arriving while its receiver is being cancelled stays in the channel: the
    next receiver gets it (anyio's test of the same name, for our channel)."""
    ch = _channel(4)
    received: list[int] = []

    async def receiver() -> None:
        received.append(await ch.receive())

    async with anyio.create_task_group() as tg:
        tg.start_soon(receiver)
        await wait_all_tasks_blocked()
        # Wake the receiver with an item and cancel it before it can run.
        ch.put_nowait(42)
        tg.cancel_scope.cancel()
    # Either the receiver got it before the cancellation landed, or it is still there:
    # never lost, never twice.
    assert received + ch.take(10) == [42]


async def test_cancelled_woken_receiver_passes_the_wake_on() -> None:
    """Two receivers parked, one item, the woken one cancelled: the other still gets it."""
    ch = _channel(4)
    got: list[int] = []
    arrived = anyio.Event()

    async def receiver() -> None:
        got.append(await ch.receive())
        arrived.set()

    async with anyio.create_task_group() as outer:
        async with anyio.create_task_group() as doomed:
            doomed.start_soon(receiver)
            await wait_all_tasks_blocked()
            outer.start_soon(receiver)
            await wait_all_tasks_blocked()
            ch.put_nowait(5)  # wakes the first parked receiver (the doomed one)
            doomed.cancel_scope.cancel()
        # Whichever receiver ends up with it, the item arrives (a lost wake would hang).
        with anyio.fail_after(5):
            await arrived.wait()
        outer.cancel_scope.cancel()
    assert got == [5]


async def test_many_senders_and_receivers_lose_and_duplicate_nothing() -> None:
    ch = _channel(3, senders=4)
    received: list[int] = []

    async def sender(base: int) -> None:
        for i in range(200):
            await ch.send(base + i)
        ch.close_sender()

    async def receiver() -> None:
        while True:
            try:
                received.append(await ch.receive())
            except EndOfChannel:
                return

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(receiver)
        for s in range(4):
            tg.start_soon(sender, s * 1000)
    assert sorted(received) == sorted(s * 1000 + i for s in range(4) for i in range(200))


async def test_random_cancellations_keep_every_item_exactly_once() -> None:
    """Senders and receivers cancelled at random points: what was sent is received once."""
    import random

    rng = random.Random(7)
    ch = _channel(2)
    sent: list[int] = []
    received: list[int] = []

    async def sender(start: int) -> None:
        for i in range(start, start + 50):
            with anyio.move_on_after(0 if rng.random() < 0.3 else 10):
                await ch.send(i)
                sent.append(i)

    async def receiver() -> None:
        while True:
            with anyio.move_on_after(0 if rng.random() < 0.3 else 10):
                received.append(await ch.receive())

    async with anyio.create_task_group() as tg:
        tg.start_soon(receiver)
        tg.start_soon(receiver)
        async with anyio.create_task_group() as senders:
            for k in range(3):
                senders.start_soon(sender, k * 100)
        while len(ch):
            await checkpoint()
        tg.cancel_scope.cancel()
    received += ch.take(100)
    assert sorted(received) == sorted(sent)
    assert len(set(received)) == len(received)


async def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        _channel(0)
