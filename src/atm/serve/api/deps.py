"""What the routers share: the served models (a FastAPI dependency) and the checks that turn a
client's request into an ``EngineRequest`` for one of them, and a client's lifetime (a client that
disconnects cancels its generation: the upstream connection closes, which llama-server notices)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.responses import Response

from atm.serve.api.errors import ApiError
from atm.serve.api.metrics import Metrics
from atm.serve.api.protocol import ChatMessage, ResponseFormat, Stop
from atm.serve.engines import EngineRequest
from atm.serve.settings import ServeSettings

MAX_STOP = 16


@dataclass
class ServeState:
    """``app.state.atm``: everything a route needs."""

    settings: ServeSettings
    served: dict[str, Any]  # name -> atm.serve.models.ServedModel
    metrics: Metrics
    started: float = field(default_factory=time.time)

    @property
    def limit(self) -> int:
        return self.settings.max_body_bytes


def serve_state(request: Request) -> ServeState:
    """The dependency every router takes: the app's served models, settings and metrics."""
    return request.app.state.atm


# ---------------------------------------------------------------------------------------------
# request checks


def get_served(st: ServeState, name: str):
    m = st.served.get(name)
    if m is None:
        names = ", ".join(st.served) or "(none)"
        raise ApiError(404, f"model {name!r} is not served here; served models: {names}",
                       "not_found_error", param="model", code="model_not_found")
    return m


async def read_request(request, st: ServeState, model_cls):
    """The body parsed into ``model_cls`` (``atm.serve.api.protocol.read_json``) and the served
    model it names (404 listing the served ones)."""
    from atm.serve.api.protocol import read_json

    req = await read_json(request, model_cls, st.limit)
    return req, get_served(st, req.model)


def check_max_tokens(st: ServeState, m, max_tokens: int | None, param: str = "max_tokens") -> int:
    n_ctx = m.engine.n_ctx
    default = st.settings.default_max_tokens
    if max_tokens is None:
        return min(default, n_ctx) if n_ctx else default
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


def sampling(req, fields: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI sampling parameters of ``req`` (and its checked ``stop``) into ``fields``."""
    for k in EngineRequest.SAMPLING:
        v = getattr(req, k, None)
        if v is not None:
            fields[k] = v
    stops = check_stop(req.stop)
    if stops:
        fields["stop"] = stops
    return fields


def check_stop(stop: Stop) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"at most {MAX_STOP} stop sequences", param="stop")
    if any(s == "" for s in stops):
        raise ApiError(400, "stop sequences must not be empty strings", param="stop")
    return stops or None


def check_schema(schema: Any, param: str) -> dict[str, Any]:
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


def apply_format(rf: ResponseFormat | None, out: dict[str, Any]) -> None:
    """``response_format`` as EngineRequest fields (``json_schema`` / ``json_object``) in ``out``."""
    if rf is None or rf.type == "text":
        return
    if rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ApiError(400, "response_format json_schema needs json_schema.schema",
                           param="response_format")
        out["json_schema"] = check_schema(rf.json_schema.schema_, "response_format.json_schema.schema")
    elif rf.schema_ is not None:  # json_object with a schema (llama.cpp style)
        out["json_schema"] = check_schema(rf.schema_, "response_format.schema")
    else:
        out["json_object"] = True


# ---------------------------------------------------------------------------------------------
# the client's lifetime


class ClientGone(Exception):
    pass


async def until_disconnect(request) -> None:
    """Return when the client goes away (the body is already read, so only disconnect comes)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def call_cancellable(request, coro):
    """Await ``coro`` unless the client disconnects first; then cancel it (stops generation)."""
    task = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(until_disconnect(request))
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


async def run_engine(request, st: ServeState, m, call, ereq: EngineRequest, route: str):
    """``call(ereq)`` inside the engine's admission, cancelled if the client leaves (then 499)."""
    async with m.engine.admit():
        try:
            return await call_cancellable(request, call(ereq))
        except ClientGone:
            st.metrics.disconnects.labels(route).inc()
            return Response(status_code=499)
