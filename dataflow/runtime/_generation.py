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

A sequence leaves when it finishes, fails, or its request ended (cancelled, deadline): it
is dropped from the next tick and its slot freed in that tick, so no token is computed
for it afterwards. A slow reader parks only its own sequence: once a stream holds
``stream_buffer`` outputs its reader has not taken, the sequence sits out the ticks until
the reader catches up, so emitting never waits and the batch never stalls.
"""

from __future__ import annotations

import codecs
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import torch

from .._errors import DataflowError
from ..graph._generation import GenerationConfig, SamplingParams, StepModel, prompt_ids
from ._request import PENDING, Item, Request
from .executors import LoopReplica

if TYPE_CHECKING:
    from ._worker import NodeRunner

__all__ = ["Decoding", "generate_one", "run_generation_worker", "sample"]

_BYTES = [bytes((i,)) for i in range(256)]


class Decoding:
    """One sequence's sampling and output state: generator, UTF-8 decoder, stop matching.

    Shared by the batched runtime and the unbatched reference (:func:`generate_one`), so
    both turn the same logits into the same outputs.
    """

    __slots__ = (
        "count",
        "decoder",
        "eos",
        "generator",
        "held",
        "max_new_tokens",
        "stops",
        "temperature",
        "token_bytes",
        "top_k",
    )

    def __init__(self, config: GenerationConfig, params: SamplingParams) -> None:
        self.temperature = params.temperature
        self.top_k = params.top_k
        self.max_new_tokens = params.max_new_tokens
        self.eos = frozenset(config.eos)
        self.stops = params.stop
        self.count = 0
        self.held = ""  # decoded text withheld because it may begin a stop sequence
        # A seeded request gets its own generator: its draws depend only on its seed and
        # steps, so its text does not depend on which other requests share the batch.
        # Unseeded rows share one generator and are drawn together in one call.
        self.generator: torch.Generator | None = None
        if params.temperature > 0 and params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        decode = config.decode
        self.decoder: codecs.IncrementalDecoder | None = None
        self.token_bytes: Any = None
        if decode is not None:
            self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self.token_bytes = _byte_of if decode == "bytes" else decode

    def advance(self, token: int) -> tuple[Any, bool]:
        """Take the next sampled token: ``(output or None, finished)``.

        The output is the token itself, or with a decoder the text completed by it (never
        a partial UTF-8 character, never text that might start a stop sequence).
        """
        self.count += 1
        last = self.count >= self.max_new_tokens
        decoder = self.decoder
        if token in self.eos:
            return (self._flush() if decoder is not None else None), True
        if decoder is None:
            return token, last
        text = self.held + decoder.decode(self.token_bytes(token))
        stops = self.stops
        if stops:
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                self.held = ""
                return text[:cut] or None, True
        if last:
            self.held = ""
            return (text + decoder.decode(b"", final=True)) or None, True
        keep = _partial_stop(text, stops) if stops else 0
        if keep:
            self.held = text[-keep:]
            text = text[:-keep]
        else:
            self.held = ""
        return text or None, False

    def _flush(self) -> str | None:
        assert self.decoder is not None
        text = self.held + self.decoder.decode(b"", final=True)
        self.held = ""
        return text or None


def _byte_of(token: int) -> bytes:
    if not 0 <= token < 256:
        raise ValueError(f"decode='bytes' got token {token}, not a byte value")
    return _BYTES[token]


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that a stop sequence starts with."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


# The randomness of rows without a seed: one generator, one draw for all of them per tick.
_UNSEEDED = torch.Generator().manual_seed(secrets.randbits(63))


def sample(logits: torch.Tensor, rows: Sequence[Decoding]) -> list[int]:
    """One token per row of ``logits`` ``[N, V]``, each by its row's settings.

    Temperature 0 is greedy. Otherwise the Gumbel-max trick: ``argmax(logits / T + G)``
    with ``G = -log(E)``, ``E ~ Exp(1)``, restricted to the ``top_k`` largest logits. A
    seeded row draws ``E`` from its own generator, and every operation is per row (or
    exact), so its token does not depend on the other rows: batched sampling equals
    unbatched sampling. The rows without a seed draw ``E`` together in one vectorised call
    from a shared generator.
    """
    logits = logits.float()
    picked = logits.argmax(dim=-1)
    hot = [i for i, row in enumerate(rows) if row.temperature > 0]
    if not hot:
        return picked.tolist()
    n, vocab = len(hot), logits.shape[-1]
    every = n == len(rows)
    index = None if every else torch.tensor(hot)
    x = logits if index is None else logits.index_select(0, index)
    temps = torch.tensor([rows[i].temperature for i in hot], dtype=torch.float32)
    x = x / temps[:, None]
    ks = [rows[i].top_k for i in hot]
    limited = [0 < k < vocab for k in ks]
    if any(limited):
        kmax = max(k for k, lim in zip(ks, limited, strict=True) if lim)
        top = torch.topk(x, kmax, dim=-1).values
        kth = top.gather(
            1, torch.tensor([[k - 1 if lim else 0] for k, lim in zip(ks, limited, strict=True)])
        )
        kth = kth.masked_fill(~torch.tensor(limited)[:, None], -torch.inf)
        x = x.masked_fill(x < kth, -torch.inf)
    noise = torch.empty(n, vocab)
    unseeded: list[int] = []
    for j, i in enumerate(hot):
        generator = rows[i].generator
        if generator is None:
            unseeded.append(j)
            continue
        row = noise[j]
        row.exponential_(generator=generator)
        row.log_()  # per row, so the kernel sees the same data batched or not
    if len(unseeded) == n:
        noise.exponential_(generator=_UNSEEDED).log_()
    elif unseeded:
        block = torch.empty(len(unseeded), vocab).exponential_(generator=_UNSEEDED).log_()
        noise[torch.tensor(unseeded)] = block
    choice = (x - noise).argmax(dim=-1)
    if index is None:
        return choice.tolist()
    picked[index] = choice
    return picked.tolist()


def _row(logits: Any) -> torch.Tensor:
    return torch.as_tensor(logits).reshape(1, -1)


def _matrix(logits: Any, n: int) -> torch.Tensor:
    t = torch.as_tensor(logits)
    if t.dim() != 2 or t.shape[0] != n:
        raise ValueError(f"step returned logits of shape {tuple(t.shape)} for {n} slots")
    return t


def generate_one(
    model: StepModel, config: GenerationConfig, ids: list[int], params: SamplingParams
) -> Iterator[Any]:
    """One sequence, unbatched, in slot 0: the reference the batched runtime matches."""
    decoding = Decoding(config, params)
    logits = _row(model.prefill(0, ids))
    try:
        while True:
            token = sample(logits, [decoding])[0]
            out, done = decoding.advance(token)
            if out is not None:
                yield out
            if done:
                return
            logits = _matrix(model.step([0], [token]), 1)
    finally:
        model.free(0)


# -- the batched runtime ---------------------------------------------------------------


class _Seq:
    """A running sequence: its request, slot, decoding state and output count."""

    __slots__ = ("decoding", "emitted", "ids", "last", "parked", "req", "slot", "tag", "worker")

    def __init__(self, worker: _Worker, it: Item, slot: int, ids: list[int], dec: Decoding) -> None:
        self.worker = worker
        self.req = it.req
        self.tag = it.tag
        self.slot = slot
        self.ids = ids
        self.decoding = dec
        self.last = 0
        self.emitted = 0
        self.parked = False

    def on_consume(self, req: Request) -> None:
        """The reader took an output: resume once the stream has room again."""
        if self.parked and self.emitted - req.consumed < req.buffer_limit:
            self.parked = False
            req.on_consume = None
            self.worker.wake()


_TickResult = tuple[list[BaseException | None], BaseException | None, list[int]]


def _tick(
    model: StepModel,
    frees: list[int],
    joins: list[_Seq],
    active: list[_Seq],
    last: list[int],
) -> _TickResult:
    """One step, in the replica's thread: free, prefill, step, sample.

    Returns the prefill errors (one per join), the step error, and one token per
    surviving row: first the joins that prefilled, then the active sequences (absent if
    the step failed).
    """
    for slot in frees:
        with contextlib.suppress(Exception):  # its request has ended: nobody to tell
            model.free(slot)
    mats: list[torch.Tensor] = []
    rows: list[Decoding] = []
    join_errors: list[BaseException | None] = []
    batched = _prefill_many(model, joins)
    if batched is not None:
        mats.append(batched)
        rows.extend(seq.decoding for seq in joins)
        join_errors = [None] * len(joins)
    else:
        for seq in joins:
            try:
                mats.append(_row(model.prefill(seq.slot, seq.ids)))
            except Exception as exc:
                join_errors.append(exc)
                continue
            join_errors.append(None)
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
        return _matrix(prefill_many([s.slot for s in joins], [s.ids for s in joins]), len(joins))
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
        self.inline = isinstance(replica, LoopReplica)
        self.backend = runner.backend
        self.max_batch = config.max_batch
        self.free_slots = list(range(config.max_batch - 1, -1, -1))  # pop() = lowest
        self.running: dict[int, _Seq] = {}  # slot -> sequence (stepping or parked)
        self.joining: deque[Item] = deque()  # admitted, waiting for the next tick
        self.to_free: list[int] = []  # slots to free at the start of the next tick
        self.closed = False  # the input ended
        self._waiters: deque[Any] = deque()  # the stepper, when idle
        self._admit_waiters: deque[Any] = deque()  # the admitter, when full

    def wake(self) -> None:
        if self._waiters:
            self.backend.wake(self._waiters)

    def _room(self) -> int:
        return self.max_batch - len(self.running) - len(self.joining)

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
                if it.req.state != PENDING:
                    stats.cancelled += 1
                    continue
                self.joining.append(it)
                # A request that ends while its sequence is parked must still free its
                # slot promptly: its end wakes an idle stepper.
                it.req.add_cleanup(self.wake)
            self.wake()

    def _leave(self, seq: _Seq) -> None:
        del self.running[seq.slot]
        self.to_free.append(seq.slot)
        # The tick frees before it prefills, so the slot can be handed out at once.
        self.free_slots.append(seq.slot)
        seq.req.on_consume = None
        if self._admit_waiters:
            self.backend.wake(self._admit_waiters)

    def _reap(self) -> None:
        """Drop sequences whose request ended (cancelled, deadline, failed elsewhere)."""
        for seq in [s for s in self.running.values() if s.req.state != PENDING]:
            self.runner.stats.cancelled += 1
            self._leave(seq)

    def _take_joins(self) -> list[_Seq]:
        joins: list[_Seq] = []
        stats = self.runner.stats
        while self.joining and self.free_slots:
            it = self.joining.popleft()
            req = it.req
            if req.state != PENDING:
                stats.cancelled += 1
                continue
            try:
                params = SamplingParams.from_request(
                    self.config, self.name, **self.runner._kwargs(req)
                )
                ids = prompt_ids(self.name, it.value)
                dec = Decoding(self.config, params)
            except DataflowError as exc:
                stats.failed += 1
                req.fail(exc)
                continue
            except Exception as exc:
                self.runner.fail_pending(req, exc)
                continue
            seq = _Seq(self, it, self.free_slots.pop(), ids, dec)
            self.running[seq.slot] = seq
            joins.append(seq)
        if self._admit_waiters and self._room() > 0:
            self.backend.wake(self._admit_waiters)
        return joins

    async def _step_loop(self) -> None:
        while True:
            self._reap()
            active = [s for s in self.running.values() if not s.parked]
            joins = self._take_joins()
            if not joins and not active:
                if self.to_free:
                    await self._run_tick([], [])
                    continue
                if self.closed and not self.running and not self.joining:
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
                _tick, self.model, frees, joins, active, last
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
        for seq, token in zip(rows, tokens, strict=True):
            await self._deliver(seq, token)

    def _fail(self, seq: _Seq, exc: BaseException) -> None:
        if seq.slot in self.running:
            self._leave(seq)
        self.runner.fail_pending(seq.req, exc)

    async def _deliver(self, seq: _Seq, token: int) -> None:
        req = seq.req
        if req.state != PENDING:
            return  # ended during the tick; reaped before the next one
        try:
            out, done = seq.decoding.advance(token)
        except Exception as exc:
            self._fail(seq, exc)
            return
        seq.last = token
        if out is not None:
            req.outstanding += 1
            index = seq.emitted
            seq.emitted = index + 1
            await self.runner.emit(Item(req, out, (*seq.tag, (index, 0))))
        if done:
            if seq.slot in self.running:
                self._leave(seq)
            req.release(1)
        elif req.streaming and seq.emitted - req.consumed >= req.buffer_limit:
            seq.parked = True
            req.on_consume = seq.on_consume


async def run_generation_worker(runner: NodeRunner, index: int) -> None:
    """One replica's loop for a ``generate`` node, until its input ends and every
    sequence it admitted has left."""
    await _Worker(runner, index).run()
