"""The ``atm serve`` API: OpenAI- and Ollama-compatible routes plus ``/v1/advice``, in front of engines.

``create_app(settings)`` returns a FastAPI app whose state lives on ``app.state`` (settings,
served models, metrics); engines start in the lifespan. In the style of vLLM's OpenAI server:
pydantic request models, OpenAI-shaped errors (``{"error": {"message", "type", "param", "code"}}``;
Ollama routes answer Ollama's ``{"error": "..."}``).

Robustness rules (each has a test in ``tests/serve/test_serve_robustness.py``):
- bodies are read with a size limit (413) and parsed strictly (malformed JSON 400, wrong types /
  missing fields / empty messages 400, unknown model 404 naming the served ones);
- ``max_tokens`` <= 0 or over the context is 400, a prompt over the context is 400;
- more requests than slots + queue get 429 with Retry-After; an engine that is (re)starting or
  dies under a request gives 503 with Retry-After, never a hang;
- a client that disconnects cancels its generation (the upstream connection is closed, which
  llama-server notices and stops decoding);
- nothing a client sends can raise out of a handler: unexpected errors are a 500 with a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import re
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Literal, Union

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from atm import __version__
from atm.serve.engines import EngineError
from atm.serve.settings import ServeSettings

try:  # orjson is ~5x faster on the hot path (every chunk of every stream)
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)
except ImportError:  # pragma: no cover
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

OLLAMA_VERSION = "0.12.0"  # the Ollama API level these routes follow
MAX_STOP = 16
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/advice", "/api/chat",
          "/api/generate", "/api/tags", "/api/show", "/api/ps", "/api/version", "/health", "/metrics")


# =============================================================================================
# errors


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}


def _is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_body(path: str, status: int, message: str, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None) -> bytes:
    if _is_ollama(path):
        return dumps({"error": message})
    return dumps({"error": {"message": message, "type": type, "param": param,
                            "code": code if code is not None else status}})


def _error_response(path: str, status: int, message: str, type: str = "invalid_request_error",
                    param: str | None = None, code: str | None = None, headers: dict | None = None):
    from starlette.responses import Response

    return Response(error_body(path, status, message, type, param, code), status_code=status,
                    media_type="application/json", headers=headers)


def _engine_error_headers(exc: EngineError) -> dict[str, str]:
    if exc.retry_after is not None:
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return {}


# =============================================================================================
# request models (strict: "1" is not a number, 1 is not a bool)


class _Req(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class TextPart(_Req):
    type: Literal["text"]
    text: str


class ChatMessage(_Req):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None


class JsonSchemaSpec(_Req):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama.cpp's json_object+schema


Stop = Union[str, list[str], None]


class _Sampling(_Req):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)
    json_schema: dict[str, Any] | None = None  # llama.cpp's extension, accepted as-is


class OllamaOptions(_Req):
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    num_predict: int | None = None
    stop: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = Field(default=None, ge=1)


class OllamaMessage(_Req):
    role: Literal["system", "user", "assistant"]
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None


class _OllamaBase(_Req):
    model: str = Field(min_length=1)
    stream: bool = True
    format: Union[Literal["", "json"], dict[str, Any], None] = None
    options: OllamaOptions | None = None
    keep_alive: Union[float, int, str, None] = None
    think: Union[bool, str, None] = None


class OllamaChatRequest(_OllamaBase):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=4096)
    tools: list[Any] | None = None


class OllamaGenerateRequest(_OllamaBase):
    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    raw: bool | None = None
    images: list[Any] | None = None
    context: list[int] | None = None


class OllamaShowRequest(_Req):
    model: str | None = None
    name: str | None = None  # older clients
    verbose: bool | None = None


KlineRow = Union[dict[str, Any], list[Any]]


class AdviceRequest(_Req):
    model: str = Field(min_length=1)
    klines: list[KlineRow] | None = Field(default=None, max_length=100_000)
    symbol: str | None = None
    time: Union[str, int, None] = None
    temperature: float = Field(default=0.0, ge=0, le=2)
    seed: int | None = None
    probs: bool = True
    max_tokens: int = Field(default=160, ge=8, le=1024)  # ~25 tokens + the whitespace the grammar allows


# =============================================================================================
# metrics


class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("atm_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.errors = Counter("atm_request_errors", "requests answered with an error status", ["route", "status"], registry=r)
        self.latency = Histogram("atm_request_latency_seconds", "request latency (to the last byte)",
                                 ["route"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("atm_time_to_first_token_seconds", "streaming: time to the first chunk",
                              ["model"], registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.prompt_tokens = Counter("atm_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.gen_tokens = Counter("atm_generated_tokens", "tokens generated", ["model"], registry=r)
        self.advice = Counter("atm_advice", "advice answers by validity and class", ["model", "advice"], registry=r)
        self.inflight = Gauge("atm_engine_inflight", "requests inside each engine", ["model"], registry=r)
        self.ready = Gauge("atm_engine_ready", "1 when the model's engine is ready", ["model"], registry=r)
        self.restarts = Gauge("atm_engine_restarts", "engine process restarts", ["model"], registry=r)
        self.disconnects = Counter("atm_client_disconnects", "generations cancelled because the client left", ["route"], registry=r)

    def usage(self, model: str, usage: dict | None) -> None:
        if not usage:
            return
        p, c = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        if p:
            self.prompt_tokens.labels(model).inc(p)
        if c:
            self.gen_tokens.labels(model).inc(c)


# =============================================================================================
# ASGI middleware: auth, body size, metrics (pure ASGI: no per-request task, streams untouched)


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


# =============================================================================================
# helpers


async def read_json(request, model_cls: type[BaseModel], limit: int):
    """The body, size-limited (413), parsed strictly into ``model_cls`` (400 with the reason)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", "request_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise ApiError(400, "empty request body: send a JSON object")
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> ApiError:
    errs = exc.errors(include_url=False)
    if errs and errs[0]["type"] == "json_invalid":
        return ApiError(400, f"malformed JSON body: {errs[0]['msg']}")
    if errs and errs[0]["type"] in ("model_type", "model_attributes_type") and not errs[0]["loc"]:
        return ApiError(400, "the request body must be a JSON object")
    # Union branches repeat the same location; report each location once
    seen, parts = set(), []
    for e in errs:
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("function-", "union[")))
        loc = re.sub(r"\.(str|list\[[^\]]*\]|dict\[[^\]]*\]|int|float|bool|none|literal\[[^\]]*\]|TextPart)(?=\.|$)", "", loc)
        if loc in seen:
            continue
        seen.add(loc)
        parts.append(f"{loc or 'body'}: {e['msg']}")
    first = errs[0]["loc"][0] if errs and errs[0]["loc"] else None
    return ApiError(400, "invalid request: " + "; ".join(parts[:5]), param=str(first) if first else None)


def _check_stop(stop: Stop) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"at most {MAX_STOP} stop sequences", param="stop")
    if any(s == "" for s in stops):
        raise ApiError(400, "stop sequences must not be empty strings", param="stop")
    return stops or None


def _check_schema(schema: Any, param: str) -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise ApiError(400, f"{param} must be a JSON object (a JSON Schema)", param=param)
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ApiError(400, f"{param} is not a valid JSON Schema: {exc.message}", param=param) from None
    for rx in _patterns(schema):
        try:
            re.compile(rx)
        except re.error as exc:
            raise ApiError(400, f"{param}: invalid pattern {rx!r}: {exc}", param=param) from None
    return schema


def _patterns(schema: Any):
    if isinstance(schema, dict):
        for k, v in schema.items():
            if k == "pattern" and isinstance(v, str):
                yield v
            elif k == "patternProperties" and isinstance(v, dict):
                yield from v.keys()
                for sub in v.values():
                    yield from _patterns(sub)
            else:
                yield from _patterns(v)
    elif isinstance(schema, list):
        for x in schema:
            yield from _patterns(x)


def _format_to_internal(rf: ResponseFormat | None, out: dict[str, Any]) -> None:
    if rf is None or rf.type == "text":
        return
    if rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ApiError(400, "response_format json_schema needs json_schema.schema",
                           param="response_format")
        out["json_schema"] = _check_schema(rf.json_schema.schema_, "response_format.json_schema.schema")
    elif rf.schema_ is not None:  # json_object with a schema (llama.cpp style)
        out["json_schema"] = _check_schema(rf.schema_, "response_format.schema")
    else:
        out["json_object"] = True


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


async def _until_disconnect(request) -> None:
    """Return when the client goes away (the body is already read, so only disconnect comes)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    pass


async def call_cancellable(request, coro):
    """Await ``coro`` unless the client disconnects first; then cancel it (stops generation)."""
    task = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone()


# =============================================================================================
# the app


def create_app(settings: ServeSettings, served: dict | None = None):
    """The FastAPI app for ``settings``. ``served`` (name -> ServedModel) overrides resolution
    from ``settings.models`` (tests and embedding)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse, Response, StreamingResponse

    from atm.serve.models import resolve

    if served is None:
        served = {}
        for spec in settings.models:
            served[spec.name] = resolve(spec, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        started = []
        try:
            results = await asyncio.gather(*(m.engine.start() for m in served.values()),
                                           return_exceptions=True)
            for m, res in zip(served.values(), results):
                if isinstance(res, BaseException):
                    raise res
                started.append(m)
            yield
        finally:
            await asyncio.gather(*(m.engine.stop() for m in served.values()), return_exceptions=True)

    app = FastAPI(title="atm serve", version=__version__, lifespan=lifespan, docs_url="/docs",
                  redoc_url=None)
    metrics = Metrics()
    app.state.settings = settings
    app.state.served = served
    app.state.metrics = metrics
    app.state.started = time.time()
    limit = settings.max_body_bytes

    app.add_middleware(Gate, settings=settings, metrics=metrics)
    if settings.cors_origins:  # added last = outermost: answers preflights before the key check
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])

    # ------------------------------------------------------------------ error handlers
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_response(request.url.path, exc.status, exc.message, exc.type, exc.param,
                               exc.code, exc.headers)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return _error_response(request.url.path, exc.status, exc.message, exc.type, exc.param,
                               headers=_engine_error_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _error_response(request.url.path, 400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_exc(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(
                   exc.status_code, str(exc.detail))
        return _error_response(request.url.path, exc.status_code, msg,
                               "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # the last net: a body, not a crash
        import traceback

        traceback.print_exception(exc)
        return _error_response(request.url.path, 500, f"internal error: {type(exc).__name__}: {exc}",
                               "server_error")

    # ------------------------------------------------------------------ shared pieces
    def get_served(name: str):
        m = served.get(name)
        if m is None:
            names = ", ".join(served) or "(none)"
            raise ApiError(404, f"model {name!r} is not served here; served models: {names}",
                           "not_found_error", param="model", code="model_not_found")
        return m

    def check_max_tokens(m, max_tokens: int | None, param: str = "max_tokens") -> int:
        n_ctx = m.engine.n_ctx
        if max_tokens is None:
            return min(settings.default_max_tokens, n_ctx) if n_ctx else settings.default_max_tokens
        if max_tokens <= 0:
            raise ApiError(400, f"{param} must be at least 1 (got {max_tokens})", param=param)
        if n_ctx and max_tokens > n_ctx:
            raise ApiError(400, f"{param}={max_tokens} is over the model's context of {n_ctx} tokens",
                           param=param)
        return max_tokens

    def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
        out = []
        for i, msg in enumerate(messages):
            content = msg.content
            if isinstance(content, list):
                content = "".join(p.text for p in content)
            if content is None:
                raise ApiError(400, f"messages.{i}.content is missing", param=f"messages.{i}.content")
            role = "system" if msg.role == "developer" else msg.role
            out.append({"role": role, "content": content})
        if not any(m["content"].strip() for m in out):
            raise ApiError(400, "messages are empty: no message has any content", param="messages")
        return out

    def sampling(req, internal: dict[str, Any]) -> dict[str, Any]:
        for k in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty"):
            v = getattr(req, k, None)
            if v is not None:
                internal[k] = v
        stops = _check_stop(req.stop)
        if stops:
            internal["stop"] = stops
        return internal

    async def run_engine(request, m, call, internal: dict[str, Any], route: str):
        engine = m.engine
        async with engine.admit():
            try:
                return await call_cancellable(request, call(internal))
            except ClientGone:
                metrics.disconnects.labels(route).inc()
                return Response(status_code=499)

    class Admission:
        """An engine admission held for the life of a streamed response; released exactly once."""

        def __init__(self, engine):
            self.cm = engine.admit()
            self.held = False

        async def enter(self):
            await self.cm.__aenter__()
            self.held = True

        async def release(self):
            if self.held:
                self.held = False
                await self.cm.__aexit__(None, None, None)

    class Stream(StreamingResponse):
        """Releases the admission and closes the engine stream however the response ends, even
        when the client leaves before the first chunk (the body generator never starts then)."""

        def __init__(self, content, stream, adm: "Admission", **kw):
            super().__init__(content, **kw)
            self._engine_stream, self._adm = stream, adm

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                with contextlib.suppress(BaseException):
                    await self._engine_stream.aclose()
                await self._adm.release()

    async def open_stream(m, call, internal: dict[str, Any]):
        """Admit and open the engine stream before answering 200, so errors get a status."""
        adm = Admission(m.engine)
        await adm.enter()
        try:
            stream = await call(internal)
        except BaseException:
            await adm.release()
            raise
        return stream, adm

    def openai_sse(m, stream, cm, t0: float) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            first = True
            try:
                async for chunk in stream:
                    if first:
                        metrics.ttft.labels(m.name).observe(time.perf_counter() - t0)
                        first = False
                    if chunk.get("usage"):
                        metrics.usage(m.name, chunk["usage"])
                    yield b"data: " + dumps(chunk) + b"\n\n"
                yield b"data: [DONE]\n\n"
            except EngineError as exc:
                yield b"data: " + dumps({"error": {"message": exc.message, "type": exc.type,
                                                   "code": exc.status}}) + b"\n\n"
            finally:
                with contextlib.suppress(BaseException):
                    await stream.aclose()
                await cm.release()
        return Stream(body(), stream, cm, media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ OpenAI
    @app.get("/v1/models")
    async def list_models():
        now = int(app.state.started)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": now, "owned_by": "atm",
             "meta": {"engine": m.kind, "n_ctx": m.engine.n_ctx, "quant": m.info.get("quant"),
                      "size": m.info.get("size"), "has_template": bool(m.template_yaml)}}
            for name, m in served.items()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        m = get_served(name)
        return {"id": name, "object": "model", "created": int(app.state.started), "owned_by": "atm",
                "meta": {"engine": m.kind, "n_ctx": m.engine.n_ctx}}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        req: ChatCompletionRequest = await read_json(request, ChatCompletionRequest, limit)
        m = get_served(req.model)
        if req.tools:
            raise ApiError(400, "tools / function calling are not supported by atm serve", param="tools")
        mt = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        internal: dict[str, Any] = {"model": m.name, "messages": chat_messages(req.messages),
                                    "max_tokens": check_max_tokens(m, mt)}
        sampling(req, internal)
        _format_to_internal(req.response_format, internal)
        if req.logprobs:
            internal["logprobs"] = True
            if req.top_logprobs is not None:
                internal["top_logprobs"] = req.top_logprobs
        if req.stream:
            if req.stream_options:
                internal["stream_options"] = req.stream_options
            stream, cm = await open_stream(m, m.engine.chat_stream, internal)
            return openai_sse(m, stream, cm, t0)
        return await json_reply(request, m, m.engine.chat, internal, "/v1/chat/completions")

    async def json_reply(request: Request, m, call, internal: dict[str, Any], path: str) -> Response:
        """The non-streaming tail shared by the OpenAI routes: run, count tokens, answer JSON."""
        resp = await run_engine(request, m, call, internal, path)
        if isinstance(resp, Response):
            return resp
        metrics.usage(m.name, resp.get("usage"))
        return Response(dumps(resp), media_type="application/json")

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        req: CompletionRequest = await read_json(request, CompletionRequest, limit)
        m = get_served(req.model)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "send one prompt per request (a string or a list of one string)",
                               param="prompt")
            prompt = prompt[0]
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if req.suffix:
            raise ApiError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        internal: dict[str, Any] = {"model": m.name, "prompt": prompt,
                                    "max_tokens": check_max_tokens(m, req.max_tokens)}
        sampling(req, internal)
        _format_to_internal(req.response_format, internal)
        if req.json_schema is not None and "json_schema" not in internal:
            internal["json_schema"] = _check_schema(req.json_schema, "json_schema")
        if req.logprobs is not None:
            internal["logprobs"] = req.logprobs
        if req.stream:
            stream, cm = await open_stream(m, m.engine.completion_stream, internal)
            return openai_sse(m, stream, cm, t0)
        return await json_reply(request, m, m.engine.completion, internal, "/v1/completions")

    # ------------------------------------------------------------------ advice
    @app.post("/v1/advice")
    async def advice(request: Request):
        from atm.serve import advice as adv

        req: AdviceRequest = await read_json(request, AdviceRequest, limit)
        m = get_served(req.model)
        t0 = time.perf_counter()
        try:
            result = await adv.advise(request, m, req, settings, call_cancellable)
        except ClientGone:
            metrics.disconnects.labels("/v1/advice").inc()
            return Response(status_code=499)
        except adv.AdviceInputError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        metrics.usage(m.name, result.get("usage"))
        metrics.advice.labels(m.name, result["advice"] if result["valid"] else "invalid").inc()
        result["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        return Response(dumps(result), media_type="application/json")

    # ------------------------------------------------------------------ Ollama
    def ollama_options(req: _OllamaBase, internal: dict[str, Any], m) -> None:
        o = req.options
        if o is not None:
            for k in ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty"):
                v = getattr(o, k)
                if v is not None:
                    internal[k] = v
            if o.stop:
                internal["stop"] = _check_stop(o.stop)
            if o.num_predict is not None:
                if o.num_predict in (-1, -2):
                    internal["max_tokens"] = check_max_tokens(m, None)
                else:
                    internal["max_tokens"] = check_max_tokens(m, o.num_predict, "options.num_predict")
        internal.setdefault("max_tokens", check_max_tokens(m, None))
        fmt = req.format
        if isinstance(fmt, dict):
            internal["json_schema"] = _check_schema(fmt, "format")
        elif fmt == "json":
            internal["json_object"] = True

    def ollama_final(m, resp: dict[str, Any], t_start: float, extra: dict[str, Any]) -> dict[str, Any]:
        usage = resp.get("usage") or {}
        choice = (resp.get("choices") or [{}])[0]
        total = int((time.perf_counter() - t_start) * 1e9)
        timings = resp.get("timings") or {}
        return {"model": m.name, "created_at": _now_iso(), **extra, "done": True,
                "done_reason": "length" if choice.get("finish_reason") == "length" else "stop",
                "total_duration": total, "load_duration": 0,
                "prompt_eval_count": usage.get("prompt_tokens", 0),
                "prompt_eval_duration": int(timings.get("prompt_ms", 0) * 1e6),
                "eval_count": usage.get("completion_tokens", 0),
                "eval_duration": int(timings.get("predicted_ms", 0) * 1e6)}

    def ndjson(m, stream, cm, t_start: float, chat: bool, as_chat: bool | None = None) -> StreamingResponse:
        """Ollama NDJSON from an engine stream; ``chat``: the engine stream is chat chunks (delta),
        ``as_chat``: answer /api/chat shapes (message) rather than /api/generate (response)."""
        as_chat = chat if as_chat is None else as_chat

        async def body() -> AsyncIterator[bytes]:
            last: dict[str, Any] = {}
            finish = None
            try:
                async for chunk in stream:
                    if chunk.get("usage"):
                        last["usage"] = chunk["usage"]
                        metrics.usage(m.name, chunk["usage"])
                    if chunk.get("timings"):
                        last["timings"] = chunk["timings"]
                    for ch in chunk.get("choices") or []:
                        finish = ch.get("finish_reason") or finish
                        text = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                        if text:
                            piece = ({"message": {"role": "assistant", "content": text}} if as_chat
                                     else {"response": text})
                            yield dumps({"model": m.name, "created_at": _now_iso(), **piece,
                                         "done": False}) + b"\n"
                final = ollama_final(m, {**last, "choices": [{"finish_reason": finish}]}, t_start,
                                     {"message": {"role": "assistant", "content": ""}} if as_chat
                                     else {"response": ""})
                yield dumps(final) + b"\n"
            except EngineError as exc:
                yield dumps({"error": exc.message}) + b"\n"
            finally:
                with contextlib.suppress(BaseException):
                    await stream.aclose()
                await cm.release()
        return Stream(body(), stream, cm, media_type="application/x-ndjson")

    @app.post("/api/chat")
    async def ollama_chat(request: Request):
        t0 = time.perf_counter()
        req: OllamaChatRequest = await read_json(request, OllamaChatRequest, limit)
        m = get_served(req.model)
        if req.tools:
            raise ApiError(400, "tools are not supported by atm serve")
        if any(msg.images for msg in req.messages):
            raise ApiError(400, "images are not supported by this model")
        if not req.messages:  # Ollama: an empty chat just loads the model
            return {"model": m.name, "created_at": _now_iso(),
                    "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"}
        messages = [{"role": x.role, "content": x.content} for x in req.messages]
        if not any(x["content"].strip() for x in messages):
            raise ApiError(400, "messages are empty: no message has any content")
        internal: dict[str, Any] = {"model": m.name, "messages": messages}
        ollama_options(req, internal, m)
        if req.stream:
            internal["stream_options"] = {"include_usage": True}
            stream, cm = await open_stream(m, m.engine.chat_stream, internal)
            return ndjson(m, stream, cm, t0, chat=True)
        resp = await run_engine(request, m, m.engine.chat, internal, "/api/chat")
        if isinstance(resp, Response):
            return resp
        metrics.usage(m.name, resp.get("usage"))
        text = resp["choices"][0]["message"].get("content") or ""
        return Response(dumps(ollama_final(m, resp, t0, {"message": {"role": "assistant", "content": text}})),
                        media_type="application/json")

    @app.post("/api/generate")
    async def ollama_generate(request: Request):
        t0 = time.perf_counter()
        req: OllamaGenerateRequest = await read_json(request, OllamaGenerateRequest, limit)
        m = get_served(req.model)
        if req.images:
            raise ApiError(400, "images are not supported by this model")
        if req.suffix:
            raise ApiError(400, "suffix (fill-in-the-middle) is not supported")
        if req.template:
            raise ApiError(400, "a per-request template is not supported: the model's own chat "
                                "template is used (or send raw=true with a formatted prompt)")
        if not req.prompt:
            return {"model": m.name, "created_at": _now_iso(), "response": "", "done": True,
                    "done_reason": "load"}
        internal: dict[str, Any] = {"model": m.name}
        if req.raw:
            internal["prompt"] = req.prompt
            call, scall = m.engine.completion, m.engine.completion_stream
        else:
            msgs = [{"role": "system", "content": req.system}] if req.system else []
            internal["messages"] = msgs + [{"role": "user", "content": req.prompt}]
            call, scall = m.engine.chat, m.engine.chat_stream
        ollama_options(req, internal, m)
        chat = not req.raw
        if req.stream:
            internal["stream_options"] = {"include_usage": True}
            stream, cm = await open_stream(m, scall, internal)
            return ndjson(m, stream, cm, t0, chat=chat, as_chat=False)
        resp = await run_engine(request, m, call, internal, "/api/generate")
        if isinstance(resp, Response):
            return resp
        metrics.usage(m.name, resp.get("usage"))
        ch = resp["choices"][0]
        text = (ch.get("message") or {}).get("content", "") if chat else ch.get("text", "")
        return Response(dumps(ollama_final(m, resp, t0, {"response": text or ""})),
                        media_type="application/json")

    def ollama_model_entry(name: str, m) -> dict[str, Any]:
        info = m.info
        return {"name": name, "model": name, "modified_at": info.get("modified_at") or _now_iso(),
                "size": info.get("size") or 0, "digest": info.get("digest") or "",
                "details": {"parent_model": "", "format": info.get("format", "gguf"),
                            "family": info.get("family", "llama"), "families": [info.get("family", "llama")],
                            "parameter_size": info.get("parameter_size", ""),
                            "quantization_level": info.get("quant") or ""}}

    @app.get("/api/tags")
    async def ollama_tags():
        return {"models": [ollama_model_entry(n, m) for n, m in served.items()]}

    @app.get("/api/ps")
    async def ollama_ps():
        return {"models": [{**ollama_model_entry(n, m), "expires_at": "0001-01-01T00:00:00Z",
                            "size_vram": 0, "context_length": m.engine.n_ctx}
                           for n, m in served.items() if m.engine.ready]}

    @app.post("/api/show")
    async def ollama_show(request: Request):
        req: OllamaShowRequest = await read_json(request, OllamaShowRequest, limit)
        name = req.model or req.name
        if not name:
            raise ApiError(400, "model is required")
        m = get_served(name)
        entry = ollama_model_entry(name, m)
        props = getattr(m.engine, "props", {}) or {}
        template = props.get("chat_template", "")
        params = f"num_ctx {m.engine.n_ctx}" if m.engine.n_ctx else ""
        modelfile = f"# served by atm serve ({m.kind})\nFROM {m.path or name}\n"
        if params:
            modelfile += f"PARAMETER {params}\n"
        return {"modelfile": modelfile, "parameters": params, "template": template,
                "details": entry["details"], "modified_at": entry["modified_at"],
                "model_info": {"general.architecture": m.info.get("family", "llama"),
                               "general.file_type": m.info.get("quant"),
                               "llama.context_length": m.engine.n_ctx,
                               "atm.engine": m.kind, "atm.has_template": bool(m.template_yaml)},
                "capabilities": ["completion"]}

    @app.get("/api/version")
    async def ollama_version():
        return {"version": OLLAMA_VERSION}

    @app.api_route("/api/{what}", methods=["GET", "POST", "DELETE", "HEAD"])
    async def ollama_unsupported(what: str):
        raise ApiError(501 if what in ("pull", "push", "create", "delete", "copy", "embed",
                                       "embeddings", "blobs") else 404,
                       f"/api/{what} is not supported by atm serve: models come from the ATM "
                       "registry (`atm models list`) and are named on `atm serve --model`",
                       "not_supported")

    # ------------------------------------------------------------------ health, metrics
    @app.get("/health")
    async def health():
        engines = [m.engine.describe() for m in served.values()]
        ok = all(e["state"] == "ready" for e in engines)
        body = {"status": "ok" if ok else "degraded", "version": __version__,
                "uptime_s": round(time.time() - app.state.started, 1), "models": engines}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prom():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for name, m in served.items():
            metrics.inflight.labels(name).set(m.engine.inflight)
            metrics.ready.labels(name).set(1 if m.engine.ready else 0)
            metrics.restarts.labels(name).set(m.engine.restarts)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def root():
        return {"name": "atm serve", "version": __version__, "models": list(served),
                "openai": "/v1", "ollama": "/api", "advice": "/v1/advice", "docs": "/docs"}

    return app
