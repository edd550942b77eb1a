"""Errors as clients see them: OpenAI-shaped on OpenAI routes, Ollama-shaped on ``/api/``.

OpenAI routes answer ``{"error": {"message", "type", "param", "code"}}``, Ollama routes
``{"error": "..."}``. ``install(app)`` registers the handlers: ``ApiError`` (raised by the
routes), ``EngineError`` (raised by engines, with Retry-After on 429/503), FastAPI's request
validation, Starlette's 404/405, and the last net: any other exception is logged with a request
id and answered with a generic 500 carrying only that id (an exception's text can hold paths,
prompts or keys).
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import Any

from atm.serve.engines import EngineError

log = logging.getLogger(__name__)

try:  # orjson is ~5x faster on the hot path (every chunk of every stream)
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


class ApiError(Exception):
    """A client error the routes raise: status, message, OpenAI error type, the offending param."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}


def is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_body(path: str, status: int, message: str, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> bytes:
    if is_ollama(path):
        return dumps({"error": message})
    return dumps({"error": {"message": message, "type": type, "param": param,
                            "code": code if code is not None else status}})


def error_response(path: str, status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None, headers: dict | None = None):
    from starlette.responses import Response

    return Response(error_body(path, status, message, type, param, code), status_code=status,
                    media_type="application/json", headers=headers)


def retry_headers(exc: EngineError) -> dict[str, str]:
    if exc.retry_after is not None:
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return {}


def install(app) -> None:
    """Register the error handlers on ``app``."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request.url.path, exc.status, exc.message, exc.type, exc.param, exc.code,
                              exc.headers)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return error_response(request.url.path, exc.status, exc.message, exc.type, exc.param,
                              headers=retry_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(request.url.path, 400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(
                   exc.status_code, str(exc.detail))
        return error_response(request.url.path, exc.status_code, msg,
                              "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # the last net: a body, not a crash
        rid = uuid.uuid4().hex
        log.error("request %s: %s %s failed", rid, request.method, request.url.path,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return error_response(request.url.path, 500,
                              f"internal server error (request id {rid}); the server log has the details",
                              "server_error", headers={"X-Request-ID": rid})
