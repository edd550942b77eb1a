"""ASGI middleware of ``atm serve``: the API key, the body-size limit and per-route metrics.

Pure ASGI (no per-request task, streams untouched): ``Gate`` answers 401 (missing or wrong key on
any route but ``/health``), 400 (bad Content-Length) and 413 (a declared body over
``max_body_bytes``) before a route runs, and observes every response's status and latency.
"""

from __future__ import annotations

import hmac
import logging
import time

from atm.serve.api.errors import error_body
from atm.serve.api.metrics import Metrics
from atm.serve.settings import ServeSettings

# route labels of the metrics (anything else is "other", so a scan cannot blow up the label set)
log = logging.getLogger("atm.serve.requests")  # one line per request: `atm serve` shows it (INFO)

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/advice", "/api/chat",
          "/api/generate", "/api/tags", "/api/show", "/api/ps", "/api/version", "/health", "/metrics")


class Gate:
    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app = app
        self.key = settings.resolved_api_key()
        self.limit = settings.max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else ("/v1/models" if path.startswith("/v1/models/") else "other")
        t0 = time.perf_counter()
        status_box = [500]

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                self._observe(route, status_box[0], t0)
                log.info("%s %s %d %.0f ms", scope.get("method", ""), path, status_box[0],
                         (time.perf_counter() - t0) * 1000)
            await send(message)

        if self.key and path != "/health":
            auth = ""
            for k, v in scope.get("headers") or ():
                if k == b"authorization":
                    auth = v.decode("latin-1")
                    break
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.key.encode()):
                return await self._reply(send_wrapped, path, 401,
                                         "missing or wrong API key: send `Authorization: Bearer KEY`",
                                         "authentication_error", {"WWW-Authenticate": "Bearer"})
        for k, v in scope.get("headers") or ():
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return await self._reply(send_wrapped, path, 400, "invalid Content-Length header")
                if n > self.limit:
                    return await self._reply(send_wrapped, path, 413,
                                             f"request body of {n} bytes is over the limit of {self.limit}",
                                             "request_too_large")
                break
        try:
            await self.app(scope, receive, send_wrapped)
        except Exception:  # pragma: no cover - handlers catch everything; this is the last net
            self._observe(route, 500, t0)
            raise

    def _observe(self, route: str, status: int, t0: float) -> None:
        m = self.metrics
        m.requests.labels(route, str(status)).inc()
        if status >= 400:
            m.errors.labels(route, str(status)).inc()
        m.latency.labels(route).observe(time.perf_counter() - t0)

    async def _reply(self, send, path, status, message, type="invalid_request_error", headers=None):
        body = error_body(path, status, message, type)
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})
