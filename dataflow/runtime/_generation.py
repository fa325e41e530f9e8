"""Continuous batching: one running batch of sequences per replica, advanced a token a step.

Each replica of a ``generate`` node runs two tasks. The *admitter* takes requests from
the node's input while the replica has free slots (so waiting requests stay in the
bounded input channel). The *stepper* repeats a *tick*: free the slots of sequences that
left, prefill the sequences that joined (in one ``prefill_many`` call when the model has
one) and sample their first tokens, then step every running sequence, the new ones
included, once in one batched call, and sample a token for each. Each part is one call
into the replica's thread, so the event loop stays free; the joins' first tokens are
delivered between the two, so a new request waits for one prefill, not a prefill and a
step. Back on the loop, each token is checked (end token, stop sequence,
``max_new_tokens``), decoded and emitted to its request at once.

A request asks for ``n`` sequences (default 1); each is a row of its own, with its own
slot and seed stream, and they join as slots free up. Prompts are encoded (chat template,
``encode``) in the replica's thread at their first prefill, once per request.

A sequence leaves when it finishes, fails, or its request ended (cancelled, deadline): it
is dropped from the next tick and its slot freed in that tick, so no token is computed
for it afterwards. A slow reader parks only its own request's sequences: all sequences of
one streaming request (``n > 1``, or several inputs after a shard) share its stream buffer,
so they share one count of outputs emitted and one ``on_consume`` hook (a ``_Group``);
once the stream holds ``stream_buffer`` outputs its reader has not taken, each of them
sits out the ticks (an output computed in the same tick is held, not emitted) until the
reader catches up. Emitting into the exit never waits on a reader, so the batch, and the
other requests on the node, never stall. A generate node that is not the graph's last
node cannot count its outputs in the stream (the nodes after it may yield any number per
token): its sequences park while the stream's buffer itself is full. When sequences wait
for a slot, parked ones give theirs up (``_Worker._evict``) and later rejoin with one
prefill of prompt + tokens so far.
"""

from __future__ import annotations

import contextlib
import heapq
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
import torch

from .._errors import DataflowError
from ..graph._generation import (
    GenerationConfig,
    SamplingParams,
    StepModel,
    _max_positions,
    register_unbatched,
)
from ._request import PENDING, Item, Request, Sink
from ._sampling import Decoding, sample
from .executors import LoopReplica

if TYPE_CHECKING:
    from ._worker import NodeRunner

__all__ = ["Decoding", "generate_one", "run_generation_worker", "sample"]


def _row(logits: Any) -> torch.Tensor:
    return torch.as_tensor(logits).reshape(1, -1)


def _matrix(logits: Any, n: int) -> torch.Tensor:
    t = torch.as_tensor(logits)
    if t.dim() != 2 or t.shape[0] != n:
        raise ValueError(f"step returned logits of shape {tuple(t.shape)} for {n} slots")
    return t


def generate_one(
    model: StepModel,
    config: GenerationConfig,
    ids: list[int],
    params: SamplingParams,
    index: int = 0,
) -> Iterator[Any]:
    """One sequence, unbatched, in slot 0: the reference the batched runtime matches."""
    decoding = Decoding(config, params, index, len(ids))
    advance = decoding.advance_chunk if params.details else decoding.advance
    logits = _row(model.prefill(0, ids))
    try:
        while True:
            token = sample(logits, [decoding])[0]
            out, done = advance(token)
            if out is not None:
                yield out
            if done:
                return
            logits = _matrix(model.step([0], [token]), 1)
    finally:
        model.free(0)


register_unbatched(generate_one)


# -- the batched runtime ---------------------------------------------------------------


class _Origin:
    """One admitted input and what its ``n`` sequences share: the request, the tag,
    the prompt (encoded in the replica's thread at the first prefill), the parameters and
    the output index counter."""

    __slots__ = ("counted", "emitted", "error", "ids", "params", "req", "tag", "value")

    def __init__(self, it: Item, params: SamplingParams) -> None:
        self.req = it.req
        self.tag = it.tag
        self.value = it.value
        self.params = params
        self.ids: list[int] | None = None
        self.error: BaseException | None = None
        self.emitted = 0
        self.counted = False  # its end is in the node's stats (once, whatever n is)

    def prepare(self, config: GenerationConfig, max_positions: int | None) -> None:
        """Encode the prompt and fit the parameters to the model's context (thread)."""
        if self.ids is not None or self.error is not None:
            return
        try:
            ids = config.prompt_ids(self.value)
            self.params = self.params.fit(config.node, len(ids), max_positions)
        except Exception as exc:
            self.error = exc
            return
        self.ids = ids
        self.value = None


class _Group:
    """The sequences of one streaming request on this node, across its replicas.

    They share the request's stream buffer, so they share one count of outputs emitted
    and one ``on_consume`` hook on the request: when the buffer is full every one of them
    parks (or holds its output), and a read wakes the workers of those waiting.
    """

    __slots__ = ("emitted", "req", "waiting", "workers")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.emitted = 0
        self.waiting: set[_Seq] = set()  # parked, or holding outputs for the reader
        self.workers: set[_Worker] = set()  # those that wake when the request ends

    @staticmethod
    def of(req: Request) -> _Group | None:
        """The request's group (created on first use, then found as the request's
        ``on_consume`` hook); None for a ``run()`` request, whose outputs are not
        bounded by a reader."""
        if not req.streaming:
            return None
        group = req.on_consume
        if not isinstance(group, _Group):
            group = _Group(req)
            req.on_consume = group
        return group

    def room(self, exact: bool) -> int:
        """How many more outputs the stream takes now. ``exact`` for a node feeding the
        exit: its outputs emitted but not yet read (in the buffer or on their way to
        it) count. Otherwise its outputs become the stream's through other nodes, which
        may yield any number per token, so only the stream's buffer itself counts."""
        req = self.req
        if exact:
            return req.buffer_limit - (self.emitted - req.consumed)
        return req.buffer_limit - len(req.outputs)

    def __call__(self, req: Request) -> None:
        """The request's ``on_consume`` hook: the reader took an output, so wake
        whoever waits for room."""
        if self.waiting:
            for worker in {s.worker for s in self.waiting}:
                if self.room(worker.feeds_exit) > 0:
                    worker.wake()


class _Seq:
    """A sequence: its origin, slot, decoding state and outputs held for the reader."""

    __slots__ = (
        "decoding",
        "details",
        "evicted",
        "finished",
        "group",
        "history",
        "last",
        "origin",
        "parked",
        "pending",
        "req",
        "resume",
        "slot",
        "worker",
    )

    def __init__(
        self, worker: _Worker, origin: _Origin, group: _Group | None, slot: int, dec: Decoding
    ) -> None:
        self.worker = worker
        self.origin = origin
        self.req = origin.req
        self.group = group
        self.slot = slot
        self.decoding = dec
        self.details = origin.params.details
        self.last = 0
        self.parked = False  # sits out the ticks until its reader makes room
        self.evicted = False  # parked and gave up its slot to a waiting sequence
        self.finished = False  # done, its slot freed; still holding outputs
        self.pending: list[Item] = []  # outputs waiting for room in the stream
        self.history: list[int] = []  # tokens sampled so far (to rebuild an evicted slot)
        self.resume: list[int] | None = None  # prefill ids when rejoining after eviction

    def prefill_ids(self) -> list[int]:
        return self.resume if self.resume is not None else self.origin.ids  # type: ignore[return-value]


_TickResult = tuple[list[BaseException | None], BaseException | None, list[int]]


def _tick(
    model: StepModel,
    frees: list[int],
    joins: list[_Seq],
    active: list[_Seq],
    last: list[int],
    config: GenerationConfig,
    max_positions: int | None,
) -> _TickResult:
    """One step, in the replica's thread: free, encode and prefill, step, sample.

    Returns the join errors (one per join), the step error, and one token per surviving
    row: first the joins that prefilled, then the active sequences (absent if the step
    failed).
    """
    for slot in frees:
        with contextlib.suppress(Exception):  # its request has ended: nobody to tell
            model.free(slot)
    mats: list[torch.Tensor] = []
    rows: list[Decoding] = []
    join_errors: list[BaseException | None] = [None] * len(joins)
    good: list[int] = []
    for k, seq in enumerate(joins):
        origin = seq.origin
        origin.prepare(config, max_positions)
        if origin.error is not None:
            join_errors[k] = origin.error
            continue
        assert origin.ids is not None
        seq.decoding.prompt_tokens = len(origin.ids)
        seq.decoding.max_new_tokens = origin.params.max_new_tokens
        good.append(k)
    batched = _prefill_many(model, [joins[k] for k in good])
    if batched is not None:
        mats.append(batched)
        rows.extend(joins[k].decoding for k in good)
    else:
        for k in good:
            seq = joins[k]
            try:
                mats.append(_row(model.prefill(seq.slot, seq.prefill_ids())))
            except Exception as exc:
                join_errors[k] = exc
                continue
            rows.append(seq.decoding)
    step_error: BaseException | None = None
    if active:
        try:
            mats.append(_matrix(model.step([s.slot for s in active], last), len(active)))
            rows.extend(s.decoding for s in active)
        except Exception as exc:
            step_error = exc
    if not rows:
        return join_errors, step_error, []
    return join_errors, step_error, sample(torch.cat(mats) if len(mats) > 1 else mats[0], rows)


def _prefill_many(model: StepModel, joins: list[_Seq]) -> torch.Tensor | None:
    """All joins prefilled in one ``model.prefill_many`` call, when the model has one.

    Returns ``None`` to fall back to one ``prefill`` per join: there is no
    ``prefill_many``, fewer than two joins, or the batched call failed (each join is then
    prefilled, and fails, on its own, so one bad prompt fails only its own request).
    """
    prefill_many = getattr(model, "prefill_many", None)
    if prefill_many is None or len(joins) < 2:
        return None
    try:
        prompts = [s.prefill_ids() for s in joins]
        return _matrix(prefill_many([s.slot for s in joins], prompts), len(joins))
    except Exception:
        return None


class _Worker:
    """One replica's continuous-batching loop (admitter + stepper)."""

    def __init__(self, runner: NodeRunner, index: int) -> None:
        self.runner = runner
        self.index = index
        self.name = runner.name
        config: GenerationConfig = runner.node.options["generation"]
        self.config = config
        replica = runner.replica_objs[index]
        self.replica = replica
        # The node's body is a GenerationBody instance built in the replica's thread.
        self.model: StepModel = replica.body.model  # type: ignore[union-attr]
        self.max_positions = _max_positions(self.model)
        self.inline = isinstance(replica, LoopReplica)
        self.backend = runner.backend
        self.max_batch = config.max_batch
        # Whether this node's outputs go straight into the stream (see _Group.room).
        outputs = runner.outputs
        self.feeds_exit = len(outputs) == 1 and isinstance(outputs[0][0], Sink)
        # a heap: the lowest free slot first, so the running slots stay packed low
        # (a step model can then run rows 0..n-1 in place)
        self.free_slots = list(range(config.max_batch))
        self.running: dict[int, _Seq] = {}  # slot -> sequence (stepping or parked)
        self.joining: deque[tuple[_Origin, int]] = deque()  # sequences waiting for a slot
        self.rejoining: deque[_Seq] = deque()  # evicted sequences whose reader caught up
        self.waiting: set[_Seq] = set()  # parked or holding outputs (see _Group)
        self.to_free: list[int] = []  # slots to free at the start of the next tick
        self.closed = False  # the input ended
        self.evictions = 0  # parked sequences that gave their slot up
        self._waiters: deque[Any] = deque()  # the stepper, when idle
        self._admit_waiters: deque[Any] = deque()  # the admitter, when full

    def wake(self) -> None:
        if self._waiters:
            self.backend.wake(self._waiters)

    def _room(self) -> int:
        """Sequences the admitter may queue: parked ones count as free (see _evict)."""
        held = sum(1 for s in self.running.values() if not s.parked)
        return self.max_batch - held - len(self.joining) - len(self.rejoining)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._admit, name=f"dataflow:{self.name}:{self.index}:admit")
            try:
                await self._step_loop()
            finally:
                tg.cancel_scope.cancel()

    async def _admit(self) -> None:
        inbox = self.runner.inbox
        stats = self.runner.stats
        while True:
            room = self._room()
            if room <= 0:
                await self.backend.park(self._admit_waiters)
                continue
            items = inbox.take(room)
            if not items:
                if not await inbox.wait_readable():
                    self.closed = True
                    self.wake()
                    return
                continue
            stats.items_in += len(items)
            for it in items:
                self._admit_one(it)
            self.wake()

    def _admit_one(self, it: Item) -> None:
        req = it.req
        stats = self.runner.stats
        if req.state != PENDING:
            stats.cancelled += 1
            return
        try:
            params = SamplingParams.from_request(self.config, self.name, **self.runner._kwargs(req))
        except DataflowError as exc:
            stats.failed += 1
            req.fail(exc)
            return
        except Exception as exc:
            self.runner.fail_pending(req, exc)
            return
        origin = _Origin(it, params)
        req.outstanding += params.n - 1  # one per sequence, released as each one ends
        self.joining.extend((origin, i) for i in range(params.n))

    def _leave(self, seq: _Seq) -> None:
        del self.running[seq.slot]
        self.to_free.append(seq.slot)
        # The tick frees before it prefills, so the slot can be handed out at once.
        heapq.heappush(self.free_slots, seq.slot)
        if self._admit_waiters:
            self.backend.wake(self._admit_waiters)

    def _wait(self, seq: _Seq) -> None:
        """``seq`` waits for its reader: parked, or finished with outputs held."""
        group = seq.group
        assert group is not None
        self.waiting.add(seq)
        group.waiting.add(seq)
        if self not in group.workers:
            group.workers.add(self)
            # A request that ends while its sequence waits must still free its slot
            # promptly: its end wakes an idle stepper (once per request and replica).
            group.req.add_cleanup(self.wake)

    def _unwait(self, seq: _Seq) -> None:
        self.waiting.discard(seq)
        if seq.group is not None:
            seq.group.waiting.discard(seq)

    def _cancelled(self, origin: _Origin) -> None:
        """Count an input whose request ended before its sequences did (once per input,
        not per sequence, so the node's stats balance against ``items_in``)."""
        if not origin.counted:
            origin.counted = True
            self.runner.stats.cancelled += 1

    def _reap(self) -> None:
        """Drop sequences whose request ended (cancelled, deadline, failed elsewhere)."""
        for seq in [s for s in self.running.values() if s.req.state != PENDING]:
            self._cancelled(seq.origin)
            self._unwait(seq)
            self._leave(seq)
        for seq in [s for s in self.waiting if s.req.state != PENDING]:
            self._unwait(seq)

    async def _flush(self) -> None:
        """Hand waiting sequences' held outputs to readers that made room; resume the
        parked ones whose stream has room again."""
        for seq in list(self.waiting):
            group = seq.group
            assert group is not None
            req = seq.req
            exact = self.feeds_exit
            while seq.pending and req.state == PENDING and group.room(exact) > 0:
                group.emitted += exact
                await self.runner.emit(seq.pending.pop(0))
            if req.state != PENDING:
                self._unwait(seq)
            elif not seq.pending:
                if seq.finished:
                    self._unwait(seq)
                    req.release(1)
                elif group.room(exact) > 0:
                    seq.parked = False
                    self._unwait(seq)
                    if seq.evicted:
                        self.rejoining.append(seq)  # to be prefilled again, before new ones

    def _evict(self) -> None:
        """Slots for waiting sequences: parked ones give theirs up.

        A reader that stopped must not keep other requests out of a full batch. An
        evicted sequence keeps its decoding state and tokens; when its reader catches up
        it rejoins with one prefill of its prompt and tokens so far, which rebuilds its
        model state (recompute preemption), and goes on where it was.
        """
        wanted = len(self.joining) + len(self.rejoining) - len(self.free_slots)
        for seq in [s for s in self.running.values() if s.parked][:wanted]:
            if seq.req.state != PENDING:
                continue  # reaped before the next tick anyway
            del self.running[seq.slot]
            self.to_free.append(seq.slot)
            heapq.heappush(self.free_slots, seq.slot)
            seq.slot = -1
            seq.evicted = True
            self.evictions += 1

    def _take_joins(self) -> list[_Seq]:
        joins: list[_Seq] = []
        if len(self.free_slots) < len(self.joining) + len(self.rejoining):
            self._evict()
        while self.rejoining and self.free_slots:
            seq = self.rejoining.popleft()
            if seq.req.state != PENDING:
                continue
            seq.slot = heapq.heappop(self.free_slots)
            seq.evicted = False
            seq.resume = [*seq.prefill_ids(), *seq.history]
            self.running[seq.slot] = seq
            joins.append(seq)
        while self.joining and self.free_slots:
            origin, index = self.joining.popleft()
            req = origin.req
            if req.state != PENDING:
                self._cancelled(origin)
                continue
            try:
                dec = Decoding(self.config, origin.params, index)
            except Exception as exc:
                self._fail_origin(origin, exc)
                continue
            seq = _Seq(self, origin, _Group.of(req), heapq.heappop(self.free_slots), dec)
            if not req.scheduled_at:
                req.scheduled_at = time.perf_counter()  # its queue time ends here
            self.running[seq.slot] = seq
            joins.append(seq)
        if self._admit_waiters and self._room() > 0:
            self.backend.wake(self._admit_waiters)
        return joins

    async def _step_loop(self) -> None:
        while True:
            self._reap()
            if self.waiting:
                await self._flush()
            active = [s for s in self.running.values() if not s.parked]
            joins = self._take_joins()
            if not joins and not active:
                if self.to_free:
                    await self._run_tick([], [])
                    continue
                if self.closed and not (
                    self.running or self.joining or self.waiting or self.rejoining
                ):
                    return
                await self.backend.park(self._waiters)
                continue
            await self._run_tick(joins, active)
            if self.inline:
                await anyio.lowlevel.checkpoint()  # let readers and the admitter run

    async def _run_tick(self, joins: list[_Seq], active: list[_Seq]) -> None:
        """One tick. With joins, in two calls: prefill and sample the joins, deliver
        their first tokens at once (the first-token latency is one prefill, not a
        prefill plus a step), then step the running sequences and the joins together."""
        stats = self.runner.stats
        frees, self.to_free = self.to_free, []
        start = time.perf_counter()
        if joins:
            await self._call(frees, joins, [])
            frees = []
            # The joins that got their first token and go on join this tick's step.
            active = [
                s
                for s in (*active, *joins)
                if self.running.get(s.slot) is s and not s.parked and s.req.state == PENDING
            ]
        if active or frees:
            await self._call(frees, [], active)
        elapsed = time.perf_counter() - start
        stats.busy_s[self.index] += elapsed
        if joins or active:
            stats.service.append(elapsed)
            stats.batch_sizes[len(set(joins) | set(active))] += 1

    async def _call(self, frees: list[int], joins: list[_Seq], active: list[_Seq]) -> None:
        """Runs :func:`_tick` in the replica's thread, then fails or delivers each row."""
        last = [s.last for s in active]
        try:
            join_errors, step_error, tokens = await self.replica._run(
                _tick, self.model, frees, joins, active, last, self.config, self.max_positions
            )
        except Exception as exc:  # sampling failed (e.g. rows of different vocabularies)
            join_errors, step_error, tokens = [exc] * len(joins), exc, []
        rows: list[_Seq] = []
        for seq, err in zip(joins, join_errors, strict=True):
            if err is None:
                rows.append(seq)
            else:
                self._fail(seq, err)
        if step_error is not None:
            for seq in active:
                self._fail(seq, step_error)
        else:
            rows.extend(active)
        for seq in joins:
            seq.resume = None
        for seq, token in zip(rows, tokens, strict=True):
            await self._deliver(seq, token)

    def _fail(self, seq: _Seq, exc: BaseException) -> None:
        if self.running.get(seq.slot) is seq:
            self._leave(seq)
        self._fail_origin(seq.origin, exc)

    def _fail_origin(self, origin: _Origin, exc: BaseException) -> None:
        """Fail the request (counted once as failed), or count the input as cancelled
        if its request has already ended."""
        if origin.req.state == PENDING:
            origin.counted = True
            self.runner.fail_pending(origin.req, exc)
        else:
            self._cancelled(origin)

    async def _deliver(self, seq: _Seq, token: int) -> None:
        req = seq.req
        if req.state != PENDING:
            return  # ended during the tick; reaped before the next one
        try:
            if seq.details:
                out, done = seq.decoding.advance_chunk(token)
            else:
                out, done = seq.decoding.advance(token)
        except Exception as exc:
            self._fail(seq, exc)
            return
        seq.last = token
        seq.history.append(token)
        group = seq.group
        if out is not None:
            req.outstanding += 1
            origin = seq.origin
            index = origin.emitted
            origin.emitted = index + 1
            item = Item(req, out, (*origin.tag, (index, 0)))
            if group is None:
                await self.runner.emit(item)
            elif seq.pending or group.room(self.feeds_exit) <= 0:
                seq.pending.append(item)  # the stream is full: held until its reader reads
            else:
                group.emitted += self.feeds_exit
                await self.runner.emit(item)
        if done:
            if self.running.get(seq.slot) is seq:
                self._leave(seq)
            if seq.pending:
                seq.finished = True
                self._wait(seq)
            else:
                req.release(1)
        elif group is not None and (seq.pending or group.room(self.feeds_exit) <= 0):
            seq.parked = True
            self._wait(seq)
            if self._admit_waiters:
                self.backend.wake(self._admit_waiters)  # its slot can be taken now


async def run_generation_worker(runner: NodeRunner, index: int) -> None:
    """One replica's loop for a ``generate`` node, until its input ends and every
    sequence it admitted has left."""
    await _Worker(runner, index).run()
