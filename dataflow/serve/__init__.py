"""Serving graphs over HTTP: an ASGI app, OpenAI-compatible (extra ``dataflow[serve]``).

``create_app(graphs)`` returns a Starlette app that starts its engines in the app's
lifespan and answers ``/v1/chat/completions`` and ``/v1/completions`` (server-sent events
with ``stream: true``), ``/v1/embeddings``, ``/v1/graphs/{name}/run``, ``/v1/models``,
``/v1/models/{id}``, ``/healthz`` and ``/metrics`` (see ``docs/serve.md``). Run it under
any ASGI server (``dataflow serve GRAPH`` uses uvicorn) or mount it in your own app. A
client that disconnects cancels its request; admission limits answer 429 with a
``Retry-After`` from the recent drain rate; every error is an OpenAI-style error object,
never a traceback.

Layers: ``_fields``/``_openai`` check request bodies (pure), ``_shapes`` writes response
bodies, ``_models`` knows each served graph's kind, ``_sequences`` runs prompts through an
engine (``df.Chunk`` token counts, coalesced frames), ``_completions`` is the two
generation routes, ``_limits``/``_auth``/``_shutdown`` admission, the API key and graceful
shutdown, ``_asgi`` writes responses and watches for disconnects, ``_metrics`` turns
``engine.stats()`` and request timings into Prometheus families, ``_app`` wires it up.
"""

from __future__ import annotations

from ._app import create_app
from ._errors import ApiError

__all__ = ["ApiError", "create_app"]
