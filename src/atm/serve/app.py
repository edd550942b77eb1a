"""The ``atm serve`` app: OpenAI- and Ollama-compatible routes plus ``/v1/advice``, in front of engines.

``create_app(settings)`` wires the pieces of ``atm.serve.api`` together: state on
``app.state.atm`` (``ServeState``: settings, served models, metrics), engines started in the
lifespan, the ``Gate`` middleware (API key, body limit, metrics) and CORS, the routers and the
error handlers. OpenAI-shaped errors (``{"error": {"message", "type", "param", "code"}}``; Ollama
routes answer Ollama's ``{"error": "..."}``).

Robustness rules (each has a test in ``tests/serve/test_serve_robustness.py``):
- bodies are read with a size limit (413) and parsed strictly (malformed JSON 400, wrong types /
  missing fields / empty messages 400, unknown model 404 naming the served ones);
- ``max_tokens`` <= 0 or over the context is 400, a prompt over the context is 400;
- more requests than slots + queue get 429 with Retry-After; an engine that is (re)starting or
  dies under a request gives 503 with Retry-After, never a hang;
- a client that disconnects cancels its generation (the upstream connection is closed, which
  llama-server notices and stops decoding);
- nothing a client sends can raise out of a handler: unexpected errors are a generic 500 with a
  request id (the details go to the server log, ``tests/serve/test_serve_errors.py``).
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI

from atm import __version__
from atm.serve.settings import ServeSettings


def create_app(settings: ServeSettings, served: dict | None = None) -> FastAPI:
    """The FastAPI app for ``settings``. ``served`` (name -> ServedModel) overrides resolution
    from ``settings.models`` (tests and embedding)."""
    from atm.serve.api import ROUTERS, errors
    from atm.serve.api.deps import ServeState
    from atm.serve.api.metrics import Metrics
    from atm.serve.api.middleware import Gate
    from atm.serve.models import resolve

    if served is None:
        served = {spec.name: resolve(spec, settings) for spec in settings.models}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            results = await asyncio.gather(*(m.engine.start() for m in served.values()), return_exceptions=True)
            for res in results:
                if isinstance(res, BaseException):
                    raise res
            yield
        finally:
            await asyncio.gather(*(m.engine.stop() for m in served.values()), return_exceptions=True)

    app = FastAPI(title="atm serve", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    state = ServeState(settings=settings, served=served, metrics=Metrics())
    app.state.atm = state

    app.add_middleware(Gate, settings=settings, metrics=state.metrics)
    if settings.cors_origins:  # added last = outermost: answers preflights before the key check
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
