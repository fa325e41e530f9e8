"""Structured logging with the standard :mod:`logging` module.

Every record the engine writes goes to the ``dataflow`` logger or a child of it and
carries ``request_id`` and ``node`` attributes (``None`` where a record is about neither),
so a formatter can always use ``%(request_id)s`` and ``%(node)s``. Nothing is printed by
default: the ``dataflow`` logger has a ``NullHandler``, as libraries should.

Levels:

* INFO on ``dataflow``: an engine started or stopped.
* DEBUG on ``dataflow.hop``: every hop of every request (entered, computed at a node,
  emitted, ended). Enabling it makes a starting engine attach a log-only tracer; with it
  off, nothing on the hot path looks at logging at all.

``configure(level, json=True)`` is a one-call setup for scripts and the CLI.
"""

from __future__ import annotations

import json as _json
import logging
import sys
from typing import IO, Any

__all__ = ["JsonFormatter", "configure", "hop_logger", "logger"]

_FIELDS = ("request_id", "node")
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
}


class _ContextFilter(logging.Filter):
    """Gives every record ``request_id`` and ``node`` (None when not set)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for field in _FIELDS:
            if not hasattr(record, field):
                setattr(record, field, None)
        return True


_logger = logging.getLogger("dataflow")
_logger.addHandler(logging.NullHandler())
_hop = logging.getLogger("dataflow.hop")
_FILTER = _ContextFilter()
_logger.addFilter(_FILTER)
_hop.addFilter(_FILTER)


def logger() -> logging.Logger:
    """The engine's ``dataflow`` logger."""
    return _logger


def hop_logger() -> logging.Logger:
    """The ``dataflow.hop`` logger: DEBUG records for each hop of each request."""
    return _hop


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, node and
    every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                out[key] = value
        for field in _FIELDS:
            out.setdefault(field, None)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _json.dumps(out, default=repr)


def configure(
    level: int | str = logging.INFO, *, json: bool = False, stream: IO[str] | None = None
) -> logging.Handler:
    """Print the engine's records to ``stream`` (stderr) at ``level``; returns the handler.

    ``level="DEBUG"`` logs every hop. Calling it again replaces the previous handler.
    """
    for handler in list(_logger.handlers):
        if getattr(handler, "_dataflow_configured", False):
            _logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_FILTER)
    handler.setFormatter(
        JsonFormatter()
        if json
        else logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s node=%(node)s] %(message)s"
        )
    )
    handler._dataflow_configured = True  # type: ignore[attr-defined]
    _logger.addHandler(handler)
    _logger.setLevel(level)
    return handler
