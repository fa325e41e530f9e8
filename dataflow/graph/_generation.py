"""Continuous batching, described: the step-model protocol and the ``generate`` node.

A *step model* keeps one decoding state (a KV cache row, an LSTM state) per *slot*. The
runtime (``dataflow.runtime._generation``) drives it: a new request is prefilled into a
free slot, then every running sequence advances by one token per ``step`` call, batched;
a sequence that finishes, fails or is cancelled leaves and its slot is freed. Sampling
(temperature, top-k, a seeded generator per request), stop sequences, end-of-sequence
tokens and incremental UTF-8 decoding belong to the runtime, so a model only maps token
ids to logits.

``generate(factory)`` wraps the factory in a node of kind ``infer`` whose body is a
generator (so the graph streams). The engine runs it with continuous batching; calling
an instance of the node's body directly runs one sequence at a time (the reference the
batched runtime must agree with).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, overload

from .._errors import GraphError, InvalidRequest
from ._node import Node

__all__ = ["GenerationBody", "GenerationConfig", "SamplingParams", "StepModel", "generate"]

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256


class StepModel(Protocol):
    """A model that decodes many sequences at once, one slot each.

    Slots are ``0 .. max_batch - 1``; the runtime assigns them. All calls for one model
    instance come from one thread (the replica's), one at a time.
    """

    def prefill(self, slot: int, prompt: Sequence[int]) -> Any:
        """(Re)start ``slot`` from ``prompt`` (at least one token id); return the logits
        ``[V]`` of the token that follows it."""
        ...

    def step(self, slots: Sequence[int], last_tokens: Sequence[int]) -> Any:
        """Append ``last_tokens[i]`` to ``slots[i]`` for every i in one batched call;
        return logits ``[len(slots), V]``, row i for ``slots[i]``."""
        ...

    def free(self, slot: int) -> None:
        """Release ``slot``'s state; it may be prefilled again later."""
        ...

    # Optional, not part of the protocol's required members: a model may also define
    # ``prefill_many(slots, prompts) -> logits [len(slots), V]``, equal to ``prefill`` per
    # slot but in one batched call. The runtime then prefills all sequences that join in
    # a tick at once, and falls back to ``prefill`` per slot if it raises.


StepModelFactory = Callable[[int], StepModel]
Decode = Literal["bytes"] | Callable[[int], bytes] | None


@dataclass(frozen=True)
class GenerationConfig:
    """A ``generate`` node's settings (``node.options["generation"]``).

    Attributes:
        factory: ``factory(max_batch) -> StepModel``, called once per replica in the
            replica's own thread when the engine starts.
        max_batch: the most sequences one replica runs at once (its slots).
        max_new_tokens: tokens generated when a request does not say.
        max_new_tokens_limit: the most a request may ask for.
        temperature: the default sampling temperature (0 = greedy).
        top_k: the default top-k (0 = no limit).
        eos: token ids that end a sequence (not emitted).
        decode: ``None`` emits token ids (ints); ``"bytes"`` treats token ``i`` as byte
            ``i``; a callable maps a token id to its bytes. With a decoder the node emits
            ``str`` chunks decoded incrementally as UTF-8, so no chunk splits a character.
    """

    factory: StepModelFactory
    max_batch: int = 32
    max_new_tokens: int = 64
    max_new_tokens_limit: int = 4096
    temperature: float = 1.0
    top_k: int = 0
    eos: tuple[int, ...] = ()
    decode: Decode = None

    @property
    def emits_text(self) -> bool:
        return self.decode is not None


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation parameters, checked (see :meth:`from_request`)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]

    @classmethod
    def from_request(
        cls,
        config: GenerationConfig,
        node: str,
        *,
        max_new_tokens: Any = None,
        temperature: Any = None,
        top_k: Any = None,
        seed: Any = None,
        stop: Any = None,
    ) -> SamplingParams:
        """Check a request's parameters against the node's limits.

        Raises:
            InvalidRequest: a parameter has the wrong type or is out of range; the
                message names the parameter and the node.
        """
        where = f"node {node!r}"
        if max_new_tokens is None:
            max_new_tokens = config.max_new_tokens
        limit = config.max_new_tokens_limit
        if not _is_int(max_new_tokens) or not 1 <= max_new_tokens <= limit:
            raise InvalidRequest(
                f"{where}: max_new_tokens must be an int in 1..{limit}, got {max_new_tokens!r}"
            )
        if temperature is None:
            temperature = config.temperature
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, int | float)
            or not math.isfinite(temperature)
            or temperature < 0
        ):
            raise InvalidRequest(
                f"{where}: temperature must be a finite number >= 0 (0 = greedy), "
                f"got {temperature!r}"
            )
        if top_k is None:
            top_k = config.top_k
        if not _is_int(top_k) or top_k < 0:
            raise InvalidRequest(f"{where}: top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
            raise InvalidRequest(f"{where}: seed must be an int in 0..2**63-1, got {seed!r}")
        return cls(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_k=int(top_k),
            seed=None if seed is None else int(seed),
            stop=_check_stop(config, where, stop),
        )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_stop(config: GenerationConfig, where: str, stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest(f"{where}: stop must be a string or a list of strings, got {stop!r}")
    if not stops:
        return ()
    if not config.emits_text:
        raise InvalidRequest(
            f"{where}: stop sequences need a node that decodes text (generate(decode=...))"
        )
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"{where}: at most {MAX_STOP_SEQUENCES} stop sequences")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
        raise InvalidRequest(
            f"{where}: each stop sequence must have 1..{MAX_STOP_LENGTH} characters"
        )
    return tuple(stops)


def prompt_ids(node: str, prompt: Any) -> list[int]:
    """A prompt as token ids: a sequence of ints, ``bytes`` (byte ids), a 1-d tensor, or
    ``str`` (its UTF-8 bytes).

    Raises:
        InvalidRequest: the prompt is empty or not made of non-negative ints.
    """
    where = f"node {node!r}"
    if isinstance(prompt, str):
        prompt = prompt.encode("utf-8")
    if isinstance(prompt, bytes | bytearray):
        ids = list(prompt)
    else:
        tolist = getattr(prompt, "tolist", None)
        if callable(tolist):  # a tensor or an array
            prompt = tolist()
        if not isinstance(prompt, list | tuple) or not all(_is_int(t) and t >= 0 for t in prompt):
            raise InvalidRequest(
                f"{where}: a prompt is token ids (ints >= 0), bytes or str; "
                f"got {type(prompt).__name__}"
            )
        ids = list(prompt)
    if not ids:
        raise InvalidRequest(f"{where}: the prompt is empty; give at least one token")
    return ids


class GenerationBody:
    """The body of a ``generate`` node: one step model per replica.

    The engine instantiates it once per replica in the replica's thread (so the factory
    loads weights where they are used) and drives ``self.model`` with continuous
    batching. Calling an instance generates one sequence on its own, slot 0.
    """

    config: ClassVar[GenerationConfig]
    node_name: ClassVar[str]

    def __init__(self) -> None:
        self.model: StepModel = self.config.factory(self.config.max_batch)

    def teardown(self) -> None:
        close = getattr(self.model, "close", None)
        if callable(close):
            close()

    def __call__(
        self,
        prompt: Any,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Iterator[Any]:
        """Generate one sequence unbatched: the outputs the batched runtime also gives.

        Raises:
            InvalidRequest: bad parameters or an empty prompt.
        """
        from ..runtime._generation import generate_one

        params = SamplingParams.from_request(
            self.config,
            self.node_name,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            stop=stop,
        )
        yield from generate_one(self.model, self.config, prompt_ids(self.node_name, prompt), params)


_Decorator = Callable[[StepModelFactory], Node]


@overload
def generate(model: None = None, /, **options: Any) -> _Decorator: ...
@overload
def generate(model: StepModelFactory, /, **options: Any) -> Node: ...
def generate(model: StepModelFactory | None = None, /, **options: Any) -> Node | _Decorator:
    """A continuous-batching ``infer`` node over a step model.

    Usable as ``df.generate(factory, max_batch=32)`` or as a class decorator
    ``@df.generate(max_batch=8)`` on a :class:`StepModel` class whose constructor takes
    ``max_batch``. Each request's input is its prompt (token ids, ``bytes`` or ``str``);
    the node emits one output per generated token (an int, or a ``str`` chunk with
    ``decode``), so the graph streams.

    Args:
        model: ``factory(max_batch) -> StepModel``.
        **options: the :class:`GenerationConfig` fields (``max_batch``,
            ``max_new_tokens``, ``max_new_tokens_limit``, ``temperature``, ``top_k``,
            ``eos``, ``decode``) and the node options ``name``, ``placement`` (default
            ``"auto"``), ``replicas``, ``capacity``, ``threads``.

    Per-request parameters (``engine.stream(prompt, max_new_tokens=..., ...)``):
    ``max_new_tokens``, ``temperature``, ``top_k``, ``seed`` (same seed and prompt give
    the same output, whatever else shares the batch) and ``stop`` (a string or list of
    strings that end the text; not emitted).

    Raises:
        GraphError: an option is unknown or out of range.
    """
    if model is None:

        def decorate(factory: StepModelFactory) -> Node:
            return generate(factory, **options)

        return decorate
    node_options = {
        key: options.pop(key)
        for key in ("name", "placement", "replicas", "capacity", "threads")
        if key in options
    }
    config = _config(model, options, node_options.get("name"))
    name = node_options.pop("name", None) or _factory_name(model)
    body = type(
        f"Generate_{name}".replace("-", "_").replace(".", "_"),
        (GenerationBody,),
        {"config": config, "node_name": name, "__module__": __name__},
    )
    node_options.setdefault("placement", "auto")
    return Node("infer", body, name=name, options={"generation": config}, **node_options)


def _factory_name(model: Any) -> str:
    name = getattr(model, "__name__", None) or type(model).__name__
    name = str(name).strip("<>").replace(" ", "_")
    return "generate" if name in ("lambda", "function", "") else name


def _config(model: Any, options: dict[str, Any], name: str | None) -> GenerationConfig:
    where = f"generate node {name or _factory_name(model)!r}"
    if not callable(model):
        raise GraphError(f"{where}: the model must be a callable factory(max_batch) -> StepModel")
    known = {
        "max_batch",
        "max_new_tokens",
        "max_new_tokens_limit",
        "temperature",
        "top_k",
        "eos",
        "decode",
    }
    unknown = sorted(set(options) - known)
    if unknown:
        raise GraphError(
            f"{where}: unknown option(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(sorted(known))} or name, placement, replicas, capacity, threads"
        )
    eos = options.pop("eos", ())
    if eos is None:
        eos = ()
    elif _is_int(eos):
        eos = (eos,)
    if not isinstance(eos, tuple | list) or not all(_is_int(t) and t >= 0 for t in eos):
        raise GraphError(f"{where}: eos must be a token id or a list of token ids")
    decode = options.get("decode")
    if not (decode is None or decode == "bytes" or callable(decode)):
        raise GraphError(f"{where}: decode must be None, 'bytes' or a callable token -> bytes")
    for key in ("max_batch", "max_new_tokens", "max_new_tokens_limit"):
        value = options.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            raise GraphError(f"{where}: {key} must be an int >= 1, got {value!r}")
    config = GenerationConfig(model, eos=tuple(eos), **options)
    if config.max_new_tokens > config.max_new_tokens_limit:
        raise GraphError(f"{where}: max_new_tokens exceeds max_new_tokens_limit")
    t = config.temperature
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
        raise GraphError(f"{where}: temperature must be a finite number >= 0")
    if not _is_int(config.top_k) or config.top_k < 0:
        raise GraphError(f"{where}: top_k must be an int >= 0")
    return config
