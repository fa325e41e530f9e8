"""Serving graphs over HTTP: an ASGI app, OpenAI-compatible (extra ``dataflow[serve]``).

``create_app(graphs)`` returns a Starlette app that starts its engines in the app's
lifespan and answers ``/v1/completions`` (server-sent events with ``stream: true``),
``/v1/embeddings``, ``/v1/graphs/{name}/run``, ``/v1/models``, ``/healthz`` and
``/metrics``. Run it under any ASGI server (``dataflow serve GRAPH`` uses uvicorn) or mount
it in your own app. A client that disconnects cancels its request; admission limits answer
429 with ``Retry-After``; every error is an OpenAI-style error object, never a traceback.

Layers: ``_openai`` reads and writes the JSON shapes (pure), ``_asgi`` writes responses and
watches for disconnects, ``_metrics`` turns ``engine.stats()`` into Prometheus families,
``_app`` wires the routes to engines.
"""

from __future__ import annotations

from ._app import create_app
from ._errors import ApiError

__all__ = ["ApiError", "create_app"]
