"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from atm.serve.api.deps import (ServeState, apply_format, chat_messages, check_max_tokens, check_schema,
                                get_served, read_request, run_engine, sampling, serve_state)
from atm.serve.api.errors import ApiError, dumps
from atm.serve.api.prompts import completion_prompts, gather_completions, merged_stream
from atm.serve.api.protocol import ChatCompletionRequest, CompletionRequest
from atm.serve.api.streaming import open_stream, sse
from atm.serve.engines import EngineRequest

router = APIRouter()


@router.get("/v1/models")
async def list_models(st: ServeState = Depends(serve_state)):
    now = int(st.started)
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": now, "owned_by": "atm",
         "meta": {"engine": m.kind, "n_ctx": m.engine.n_ctx, "quant": m.info.get("quant"),
                  "size": m.info.get("size"), "has_template": bool(m.template_yaml)}}
        for name, m in st.served.items()]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, st: ServeState = Depends(serve_state)):
    m = get_served(st, name)
    return {"id": name, "object": "model", "created": int(st.started), "owned_by": "atm",
            "meta": {"engine": m.kind, "n_ctx": m.engine.n_ctx}}


async def _json_reply(request: Request, st: ServeState, m, call, ereq: EngineRequest, route: str) -> Response:
    """The non-streaming tail shared by the OpenAI routes: run, count tokens, answer JSON."""
    resp = await run_engine(request, st, m, call, ereq, route)
    if isinstance(resp, Response):
        return resp
    st.metrics.usage(m.name, resp.get("usage"))
    return Response(dumps(resp), media_type="application/json")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, st: ServeState = Depends(serve_state)):
    t0 = time.perf_counter()
    req, m = await read_request(request, st, ChatCompletionRequest)
    if req.tools:
        raise ApiError(400, "tools / function calling are not supported by atm serve", param="tools")
    mt = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    fields: dict[str, Any] = {"model": m.name, "messages": chat_messages(req.messages),
                              "max_tokens": check_max_tokens(st, m, mt)}
    sampling(req, fields)
    apply_format(req.response_format, fields)
    if req.logprobs:
        fields["logprobs"] = True
        if req.top_logprobs is not None:
            fields["top_logprobs"] = req.top_logprobs
    if req.stream:
        if req.stream_options:
            fields["stream_options"] = req.stream_options
        stream, adm = await open_stream(m, m.engine.chat_stream, EngineRequest(**fields))
        return sse(st.metrics, m, stream, adm, t0)
    return await _json_reply(request, st, m, m.engine.chat, EngineRequest(**fields), "/v1/chat/completions")


@router.post("/v1/completions")
async def completions(request: Request, st: ServeState = Depends(serve_state)):
    t0 = time.perf_counter()
    req, m = await read_request(request, st, CompletionRequest)
    prompts = completion_prompts(req.prompt, m.engine)
    if req.echo:
        raise ApiError(400, "echo is not supported", param="echo")
    if req.suffix:
        raise ApiError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    fields: dict[str, Any] = {"model": m.name, "max_tokens": check_max_tokens(st, m, req.max_tokens)}
    sampling(req, fields)
    apply_format(req.response_format, fields)
    if req.json_schema is not None and "json_schema" not in fields:
        fields["json_schema"] = check_schema(req.json_schema, "json_schema")
    if req.logprobs is not None:
        fields["logprobs"] = req.logprobs
    if req.stream and req.stream_options:
        fields["stream_options"] = req.stream_options
    ereqs = [EngineRequest(prompt=p, **fields) for p in prompts]
    if len(ereqs) == 1:
        stream_call, call = m.engine.completion_stream, m.engine.completion
    else:  # one engine request per prompt, one answer (atm.serve.api.prompts)
        def stream_call(_):
            return merged_stream(m.engine.completion_stream, ereqs)

        def call(_):
            return gather_completions(m.engine.completion, ereqs, m.engine.parallel)
    if req.stream:
        stream, adm = await open_stream(m, stream_call, ereqs[0])
        return sse(st.metrics, m, stream, adm, t0)
    return await _json_reply(request, st, m, call, ereqs[0], "/v1/completions")
