"""The exceptions dataflow raises.

Every error derives from one root, so ``except df.DataflowError`` catches them all::

    DataflowError
    ├── GraphError        the graph is invalid; raised before anything runs
    ├── NodeError         a node failed for one request (names the node, chains the cause)
    ├── Overloaded        admission refused: the engine is at ``max_in_flight``
    ├── EngineClosed      the engine is not running (not started yet, or closed)
    └── InvalidRequest    a request's input or parameters are wrong (also a ValueError)

Deadlines raise the built-in ``TimeoutError``; cancelling the caller raises the event
loop's own cancellation exception.
"""

from __future__ import annotations

__all__ = [
    "DataflowError",
    "EngineClosed",
    "GraphError",
    "InvalidRequest",
    "NodeError",
    "Overloaded",
]


class DataflowError(Exception):
    """Root of every exception raised by dataflow."""


class GraphError(DataflowError):
    """The graph is invalid. Raised while building or validating, before anything runs.

    Attributes:
        nodes: the names of the nodes the problem concerns.
    """

    def __init__(self, message: str, *, nodes: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.nodes = nodes


class NodeError(DataflowError):
    """A node's body raised while processing one request; only that request fails.

    The original exception is chained as ``__cause__`` with its traceback.

    Attributes:
        node: the name of the node that failed.
        request_id: the id of the request it failed for (None: the node failed to start,
            its constructor or ``setup()`` raised).
    """

    def __init__(self, node: str, request_id: int | None, cause: BaseException) -> None:
        what = "could not start" if request_id is None else f"failed for request {request_id}"
        super().__init__(f"node {node!r} {what}: {type(cause).__name__}: {cause}")
        self.node = node
        self.request_id = request_id

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_node_error, (self.node, self.request_id, str(self)))


def _rebuild_node_error(node: str, request_id: int | None, message: str) -> NodeError:
    err = NodeError.__new__(NodeError)
    DataflowError.__init__(err, message)
    err.node = node
    err.request_id = request_id
    return err


class Overloaded(DataflowError):
    """The engine refused a request because ``max_in_flight`` requests are running.

    Raised by ``run(..., wait=False)`` and ``stream(..., wait=False)``; the default is
    to wait for room instead.
    """


class EngineClosed(DataflowError):
    """The engine is not accepting requests: it was never started, or it is closing or
    closed. Use ``async with Engine(graph) as engine:`` and submit inside the block."""


class InvalidRequest(DataflowError, ValueError):
    """A request's input or parameters are not acceptable (for example a parameter that no
    node of the graph declares). Raised for that request only; the engine keeps serving."""
