"""Operations: ``/health`` (engine states; 503 while any is not ready), ``/metrics`` (Prometheus,
``atm.serve.api.metrics``) and ``/``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from starlette.responses import JSONResponse, Response

from atm import __version__
from atm.serve.api.deps import ServeState, serve_state

router = APIRouter()


@router.get("/health")
async def health(st: ServeState = Depends(serve_state)):
    engines = [m.engine.describe() for m in st.served.values()]
    ok = all(e["state"] == "ready" for e in engines)
    body = {"status": "ok" if ok else "degraded", "version": __version__,
            "uptime_s": round(time.time() - st.started, 1), "models": engines}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def prom(st: ServeState = Depends(serve_state)):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics = st.metrics
    for name, m in st.served.items():
        metrics.inflight.labels(name).set(m.engine.inflight)
        metrics.ready.labels(name).set(1 if m.engine.ready else 0)
        metrics.restarts.labels(name).set(m.engine.restarts)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/")
async def root(st: ServeState = Depends(serve_state)):
    return {"name": "atm serve", "version": __version__, "models": list(st.served),
            "openai": "/v1", "ollama": "/api", "advice": "/v1/advice", "docs": "/docs"}
