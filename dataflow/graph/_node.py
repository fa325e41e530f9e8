"""Node specifications: what a node computes and how it wants to be run.

A :class:`Node` is a pure description. It holds the body (a function, a generator, an
``async def``, an ``nn.Module`` or a class with ``setup()``) and options; the runtime
turns it into workers. Nothing here starts a thread or touches an event loop.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union, overload

from .._errors import GraphError

if TYPE_CHECKING:
    from ._graph import Chain

__all__ = ["Batch", "Node", "encode", "infer", "map", "merge", "shard"]

Kind = Literal["encode", "shard", "infer", "merge", "map"]
Mode = Literal["function", "generator", "async", "async_generator"]

PLACEMENTS = ("loop", "thread", "cuda", "ray", "auto")
_PLACEMENT_RE = re.compile(r"^(loop|thread|cuda|cuda:\d+|ray|auto)$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")

DEFAULT_CAPACITY = 16


@dataclass(frozen=True)
class Batch:
    """Dynamic batching options for an ``infer`` (or ``map``) node.

    The node collects up to ``max_size`` items, waiting at most ``max_wait`` seconds after
    the first one arrives, collates them, calls the body once and splits the output back
    to the requests.

    Attributes:
        max_size: the most items in one call of the body.
        max_wait: seconds to wait for a batch to fill once its first item is there.
        collate: ``"stack"`` (``torch.stack``), ``"pad"`` (pad 1-d tensors to the longest,
            the body receives ``(padded, lengths)``), ``"list"`` (a plain list), or a
            callable ``list -> batch``.
        split: a callable ``(output, n) -> list`` giving each item its output; the default
            unbinds dim 0 of a tensor (or of each tensor in a tuple) and indexes sequences.
        pad_value: the fill value for ``collate="pad"``.
    """

    max_size: int = 32
    max_wait: float = 0.005
    collate: str | Callable[[list[Any]], Any] = "stack"
    split: Callable[[Any, int], list[Any]] | None = None
    pad_value: float = 0

    def __post_init__(self) -> None:
        if not _is_int(self.max_size) or self.max_size < 1:
            raise GraphError(f"Batch.max_size must be an int >= 1, got {self.max_size!r}")
        if not _is_number(self.max_wait) or not 0 <= self.max_wait < math.inf:
            raise GraphError(f"Batch.max_wait must be seconds >= 0, got {self.max_wait!r}")
        if isinstance(self.collate, str) and self.collate not in ("stack", "pad", "list"):
            raise GraphError(
                f"Batch.collate must be 'stack', 'pad', 'list' or a callable, got {self.collate!r}"
            )
        if not isinstance(self.collate, str) and not callable(self.collate):
            raise GraphError(
                f"Batch.collate must be 'stack', 'pad', 'list' or a callable, got {self.collate!r}"
            )
        if self.split is not None and not callable(self.split):
            raise GraphError(f"Batch.split must be a callable or None, got {self.split!r}")


def _is_int(value: object) -> bool:
    # bool is an int subclass, but ``replicas=True`` is a mistake, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class BodyInfo:
    """What introspection of a node's body found."""

    mode: Mode
    params: frozenset[str]
    accepts_any_param: bool
    in_type: Any
    out_type: Any
    per_replica: bool  # a class: one instance per replica, with setup()/teardown()
    is_module: bool


class Node:
    """One node of a graph: a body plus the options that say how to run it.

    Create nodes with :func:`encode`, :func:`shard`, :func:`infer`, :func:`merge` or
    :func:`map`. Calling a node whose body is a plain function calls the function, so
    decorated functions stay testable on their own.
    """

    __slots__ = (
        "auto_named",
        "batch",
        "body",
        "capacity",
        "combine",
        "info",
        "kind",
        "name",
        "options",
        "ordered",
        "placement",
        "replicas",
        "threads",
        "timeout",
    )

    def __init__(
        self,
        kind: Kind,
        body: Any,
        *,
        name: str | None = None,
        placement: str = "loop",
        replicas: int = 1,
        capacity: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        batch: Batch | None = None,
        threads: int | None = None,
        combine: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.kind: Kind = kind
        self.body = body
        self.name: str = name if name is not None else _default_name(body)
        # Named after its body: a graph gives it a distinct name (``lambda_2``) if
        # another node already has this one.
        self.auto_named = name is None
        self.placement = placement
        self.replicas = replicas
        self.capacity = capacity
        self.ordered = ordered
        self.timeout = timeout
        self.batch = batch
        self.threads = threads
        self.combine = combine
        # Placement-specific settings (e.g. Ray actor resources) the graph layer keeps
        # but does not interpret.
        self.options: dict[str, Any] = dict(options or {})
        self._check_options()
        self.info: BodyInfo = _inspect_body(self)
        self._check_body()

    # -- composition -------------------------------------------------------------
    def __rshift__(self, other: Node | Chain) -> Chain:
        from ._graph import Chain

        return Chain((self,)) >> other

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A converter class (no __call__ of its own, e.g. ``str``) is called like a function.
        if self.info.per_replica:
            raise TypeError(
                f"node {self.name!r} wraps a class; it is instantiated per replica by the "
                "engine. Call an instance directly instead."
            )
        return self.body(*args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Node({self.kind}, {self.name!r}, placement={self.placement!r}, "
            f"replicas={self.replicas})"
        )

    @property
    def input_capacity(self) -> int:
        """The capacity of this node's input channel (items)."""
        if self.capacity is not None:
            return self.capacity
        if self.batch is not None:
            return max(DEFAULT_CAPACITY, 2 * self.batch.max_size)
        return DEFAULT_CAPACITY

    # -- validation --------------------------------------------------------------
    def _check_options(self) -> None:
        where = f"node {self.name!r}"
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise GraphError(
                f"invalid node name {self.name!r}: use letters, digits, '_', '.', '-'",
                nodes=(str(self.name),),
            )
        if not isinstance(self.placement, str) or not _PLACEMENT_RE.match(self.placement):
            raise GraphError(
                f"{where}: unknown placement {self.placement!r}; expected one of "
                f"'loop', 'thread', 'cuda', 'cuda:N', 'ray', 'auto'",
                nodes=(self.name,),
            )
        if not _is_int(self.replicas):
            raise GraphError(f"{where}: replicas must be an int", nodes=(self.name,))
        if self.replicas < 1:
            raise GraphError(f"{where}: replicas must be >= 1", nodes=(self.name,))
        if self.capacity is not None and (not _is_int(self.capacity) or self.capacity < 1):
            raise GraphError(f"{where}: capacity must be an int >= 1", nodes=(self.name,))
        # ``not timeout > 0`` also refuses NaN, which compares false with everything.
        if self.timeout is not None and (not _is_number(self.timeout) or not self.timeout > 0):
            raise GraphError(f"{where}: timeout must be seconds > 0", nodes=(self.name,))
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise GraphError(f"{where}: threads must be an int >= 1", nodes=(self.name,))
        if not isinstance(self.ordered, bool):
            raise GraphError(f"{where}: ordered must be True or False", nodes=(self.name,))
        if self.batch is not None:
            if not isinstance(self.batch, Batch):
                raise GraphError(f"{where}: batch must be a df.Batch", nodes=(self.name,))
            if self.kind not in ("infer", "map"):
                raise GraphError(
                    f"{where}: batch= is for infer and map nodes, not {self.kind}",
                    nodes=(self.name,),
                )

    def _check_body(self) -> None:
        where = f"node {self.name!r}"
        mode = self.info.mode
        if mode in ("async", "async_generator") and self.placement not in ("loop", "auto"):
            raise GraphError(
                f"{where}: an async body runs on the event loop; use placement='loop' "
                f"(got {self.placement!r})",
                nodes=(self.name,),
            )
        if self.batch is not None and mode in ("generator", "async_generator"):
            raise GraphError(
                f"{where}: a generator body cannot be batched; drop batch= or return "
                "the whole output",
                nodes=(self.name,),
            )
        if self.kind in ("shard", "merge") and mode in ("generator", "async_generator"):
            raise GraphError(
                f"{where}: a {self.kind} body must return its result, not yield it",
                nodes=(self.name,),
            )


def _default_name(body: Any) -> str:
    while isinstance(body, functools.partial):
        body = body.func
    name = getattr(body, "__name__", None)
    if name is None:
        name = type(body).__name__
    return str(name).strip("<>").replace(" ", "_") or "node"


def _call_target(body: Any) -> Callable[..., Any] | None:
    """The function whose signature describes a call of the body."""
    if inspect.isclass(body):
        forward = getattr(body, "forward", None)
        if _is_module_class(body) and forward is not None:
            return forward  # type: ignore[no-any-return]
        # ``getattr(cls, "__call__")`` would find ``type.__call__`` (which builds an
        # instance) on every class, so look for a ``__call__`` the class itself defines.
        if _instances_callable(body):
            return body.__call__
        if hasattr(body, "setup") or hasattr(body, "teardown"):
            # setup() asks for one instance per replica, but with no __call__ it would
            # be taken for a converter below and setup() would silently never run.
            return None
        # A class whose instances are not callable (``str``, a dataclass) is itself the
        # function: each item is converted by calling the class.
        return body
    if (
        inspect.isfunction(body)
        or inspect.ismethod(body)
        or inspect.isbuiltin(body)
        or isinstance(body, functools.partial)
    ):
        # inspect sees through partials: their signature and whether they wrap an
        # ``async def`` or a generator, which ``type(body).__call__`` would hide.
        return body
    if _is_module(body):
        return body.forward  # type: ignore[no-any-return]
    if callable(body):
        return type(body).__call__
    return None


def _instances_callable(cls: type) -> bool:
    """Whether instances of ``cls`` are callable: a ``__call__`` the class (not ``type``)
    defines, looked up in the class hierarchy below ``object``."""
    return any("__call__" in vars(klass) for klass in cls.__mro__[:-1])


def _is_module(obj: Any) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _is_module_class(cls: type) -> bool:
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and issubclass(cls, torch.nn.Module)


def _inspect_body(node: Node) -> BodyInfo:
    body = node.body
    if body is None or not callable(body):
        raise GraphError(
            f"node {node.name!r}: body {body!r} is not callable; pass a function, an "
            "nn.Module, or a class whose instances are callable",
            nodes=(node.name,),
        )
    target = _call_target(body)
    if target is None:
        raise GraphError(
            f"node {node.name!r}: class {body.__name__} has setup()/teardown() but no "
            "__call__ (or forward) to call once set up",
            nodes=(node.name,),
        )
    # The target is an unbound ``__call__``/``forward`` whose first parameter is ``self``.
    bound_self = target is not body
    if inspect.isasyncgenfunction(target):
        mode: Mode = "async_generator"
    elif inspect.iscoroutinefunction(target):
        mode = "async"
    elif inspect.isgeneratorfunction(target):
        mode = "generator"
    else:
        mode = "function"

    params: set[str] = set()
    accepts_any = False
    in_type: Any = Any
    out_type: Any = Any
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        plist = list(sig.parameters.values())
        if bound_self and plist and not inspect.ismethod(target):
            plist = plist[1:]  # self
        first = True
        for p in plist:
            if p.kind is p.VAR_KEYWORD:
                accepts_any = True
            elif p.kind is p.VAR_POSITIONAL or (
                first and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ):
                first = False
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                params.add(p.name)
        hints = _type_hints(target)
        positional = [p for p in plist if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if positional:
            in_type = hints.get(positional[0].name, Any)
        out_type = hints.get("return", Any)
        if mode in ("generator", "async_generator"):
            out_type = _element_type(out_type)
    if inspect.isclass(body) and target is body:
        # Calling the class builds an instance of it, even for builtins such as ``int``
        # whose signature inspect cannot read.
        out_type = body
    return BodyInfo(
        mode=mode,
        params=frozenset(params),
        accepts_any_param=accepts_any,
        in_type=in_type,
        out_type=out_type,
        per_replica=inspect.isclass(body) and (_instances_callable(body) or _is_module_class(body)),
        is_module=_is_module(body) or (inspect.isclass(body) and _is_module_class(body)),
    )


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: no check rather than a crash
        return {}


def _element_type(tp: Any) -> Any:
    """``Iterator[T]``, ``Iterable[T]``, ``list[T]``, ``Generator[T, ...]`` → ``T``."""
    import typing

    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin is None or not args:
        return Any
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        return Union[args] if len(set(args)) > 1 else args[0]  # noqa: UP007
    return args[0]


# -- constructors -------------------------------------------------------------------

_Decorator = Callable[[Any], Node]

_DEFAULT_PLACEMENT: dict[Kind, str] = {
    "encode": "loop",
    "shard": "loop",
    "merge": "loop",
    "map": "loop",
    "infer": "auto",
}


_OPTIONS = frozenset(
    {
        "name",
        "placement",
        "replicas",
        "capacity",
        "ordered",
        "timeout",
        "batch",
        "threads",
        "combine",
        "options",
    }
)


def _make(kind: Kind, body: Any, options: dict[str, Any]) -> Node | _Decorator:
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise GraphError(
            f"df.{kind}: unknown option(s) {', '.join(unknown)}; accepted: "
            f"{', '.join(sorted(_OPTIONS - {'combine'}))} (placement-specific settings go "
            "in options={...})"
        )
    options.setdefault("placement", _DEFAULT_PLACEMENT[kind])
    if body is None:

        def decorate(fn: Any) -> Node:
            return Node(kind, fn, **options)

        return decorate
    return Node(kind, body, **options)


@overload
def encode(body: None = None, /, **options: Any) -> _Decorator: ...
@overload
def encode(body: Any, /, **options: Any) -> Node: ...
def encode(body: Any = None, /, **options: Any) -> Node | _Decorator:
    """An encode node: turns raw input (text, bytes) into tensors.

    Usable as ``@df.encode``, ``@df.encode(name=..., placement=...)`` or
    ``df.encode(fn)``. Options: ``name``, ``placement`` (default ``"loop"``),
    ``replicas``, ``capacity``, ``ordered``, ``timeout``, ``threads``.
    """
    return _make("encode", body, options)


@overload
def shard(body: None = None, /, **options: Any) -> _Decorator: ...
@overload
def shard(body: Any, /, **options: Any) -> Node: ...
def shard(body: Any = None, /, **options: Any) -> Node | _Decorator:
    """A shard node: its body returns a sequence of k parts; each part travels on alone,
    tagged (request, index, k), until a :func:`merge` downstream gathers all k."""
    return _make("shard", body, options)


@overload
def infer(body: None = None, /, **options: Any) -> _Decorator: ...
@overload
def infer(body: Any, /, **options: Any) -> Node: ...
def infer(body: Any = None, /, **options: Any) -> Node | _Decorator:
    """An infer node: runs a model or a model stage.

    The body may be a function, an ``nn.Module`` (called under ``torch.inference_mode``)
    or a class with ``setup()``/``teardown()`` instantiated once per replica. Default
    placement ``"auto"`` (CUDA when available, else a thread). ``batch=df.Batch(...)``
    turns on dynamic batching.
    """
    return _make("infer", body, options)


@overload
def map(body: None = None, /, **options: Any) -> _Decorator: ...
@overload
def map(body: Any, /, **options: Any) -> Node: ...
def map(body: Any = None, /, **options: Any) -> Node | _Decorator:
    """A plain transformation node (default placement ``"loop"``)."""
    return _make("map", body, options)


COMBINERS = ("concat", "stack", "sum", "mean", "list")


@overload
def merge(body: None = None, /, **options: Any) -> _Decorator | Node: ...
@overload
def merge(body: Any, /, **options: Any) -> Node: ...
def merge(body: Any = None, /, **options: Any) -> Node | _Decorator:
    """A merge node: gathers the parts of one request and combines them.

    After a shard it receives the k parts in index order; after a fan-out it receives one
    item from each upstream node, in the order the upstreams were given. Either pass a
    body ``parts -> result`` or a built-in combiner: ``df.merge("concat")`` (``torch.cat``
    along ``dim``, or list concatenation), ``"stack"``, ``"sum"``, ``"mean"``, ``"list"``.
    """
    combine = options.pop("combine", None)
    dim = options.pop("dim", 0)
    if isinstance(body, str):
        body, combine = None, body
    if combine is not None:
        if combine not in COMBINERS:
            raise GraphError(
                f"unknown merge combiner {combine!r}; expected one of {', '.join(COMBINERS)} "
                "or a callable body"
            )
        from ._combine import combiner

        options.setdefault("name", f"merge_{combine}")
        options["combine"] = combine
        return _make("merge", combiner(combine, dim), options)
    return _make("merge", body, options)
