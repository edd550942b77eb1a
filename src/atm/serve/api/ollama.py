"""The Ollama-compatible routes (``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/ps``,
``/api/show``, ``/api/version``); translation through ``atm.serve.ollama_codec``. Model management
(pull, push, create, delete, copy, embeddings, blobs) is 501: models come from the ATM registry."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from atm.serve import ollama_codec
from atm.serve.api.deps import (ServeState, check_max_tokens, check_schema, check_stop, get_served, read_request,
                                run_engine, serve_state)
from atm.serve.api.errors import ApiError, dumps
from atm.serve.api.protocol import (OllamaChatRequest, OllamaGenerateRequest, OllamaShowRequest, OllamaBase,
                                    read_json)
from atm.serve.api.streaming import ndjson, open_stream
from atm.serve.engines import EngineRequest

router = APIRouter()


def _fields(st: ServeState, req: OllamaBase, m) -> dict[str, Any]:
    """EngineRequest fields from the request's options and format, checked against the model."""
    options = req.options.model_dump() if req.options is not None else None
    out = ollama_codec.request_fields(options, req.format)
    if "stop" in out:
        out["stop"] = check_stop(out["stop"])
    mt = out.pop("max_tokens", None)
    out["max_tokens"] = check_max_tokens(st, m, mt, "options.num_predict") if mt is not None \
        else check_max_tokens(st, m, None)
    if "json_schema" in out:
        out["json_schema"] = check_schema(out["json_schema"], "format")
    return out


async def _answer(request: Request, st: ServeState, m, call, ereq: EngineRequest, route: str, t0: float,
                  as_chat: bool) -> Response:
    """A non-streamed Ollama answer (one JSON object) from the engine's OpenAI-shaped response."""
    resp = await run_engine(request, st, m, call, ereq, route)
    if isinstance(resp, Response):
        return resp
    st.metrics.usage(m.name, resp.get("usage"))
    ch = resp["choices"][0]
    text = (ch.get("message") or {}).get("content") if ereq.chat else ch.get("text")
    return Response(dumps(ollama_codec.final(m.name, resp, t0, ollama_codec.answer(text or "", as_chat))),
                    media_type="application/json")


@router.post("/api/chat")
async def ollama_chat(request: Request, st: ServeState = Depends(serve_state)):
    t0 = time.perf_counter()
    req, m = await read_request(request, st, OllamaChatRequest)
    if req.tools:
        raise ApiError(400, "tools are not supported by atm serve")
    if any(msg.images for msg in req.messages):
        raise ApiError(400, "images are not supported by this model")
    if not req.messages:  # Ollama: an empty chat just loads the model
        return {"model": m.name, "created_at": ollama_codec.now_iso(),
                "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"}
    messages = [{"role": x.role, "content": x.content} for x in req.messages]
    if not any(x["content"].strip() for x in messages):
        raise ApiError(400, "messages are empty: no message has any content")
    ereq = EngineRequest(model=m.name, messages=messages, **_fields(st, req, m))
    if req.stream:
        ereq.stream_options = {"include_usage": True}
        stream, adm = await open_stream(m, m.engine.chat_stream, ereq)
        return ndjson(st.metrics, m, stream, adm, t0, chat=True)
    return await _answer(request, st, m, m.engine.chat, ereq, "/api/chat", t0, as_chat=True)


@router.post("/api/generate")
async def ollama_generate(request: Request, st: ServeState = Depends(serve_state)):
    t0 = time.perf_counter()
    req, m = await read_request(request, st, OllamaGenerateRequest)
    if req.images:
        raise ApiError(400, "images are not supported by this model")
    if req.suffix:
        raise ApiError(400, "suffix (fill-in-the-middle) is not supported")
    if req.template:
        raise ApiError(400, "a per-request template is not supported: the model's own chat "
                            "template is used (or send raw=true with a formatted prompt)")
    if not req.prompt:
        return {"model": m.name, "created_at": ollama_codec.now_iso(), "response": "", "done": True,
                "done_reason": "load"}
    if req.raw:
        ereq = EngineRequest(model=m.name, prompt=req.prompt, **_fields(st, req, m))
        call, scall = m.engine.completion, m.engine.completion_stream
    else:
        msgs = [{"role": "system", "content": req.system}] if req.system else []
        ereq = EngineRequest(model=m.name, messages=msgs + [{"role": "user", "content": req.prompt}],
                             **_fields(st, req, m))
        call, scall = m.engine.chat, m.engine.chat_stream
    if req.stream:
        ereq.stream_options = {"include_usage": True}
        stream, adm = await open_stream(m, scall, ereq)
        return ndjson(st.metrics, m, stream, adm, t0, chat=ereq.chat, as_chat=False)
    return await _answer(request, st, m, call, ereq, "/api/generate", t0, as_chat=False)


def _entry(name: str, m) -> dict[str, Any]:
    info = m.info
    return {"name": name, "model": name, "modified_at": info.get("modified_at") or ollama_codec.now_iso(),
            "size": info.get("size") or 0, "digest": info.get("digest") or "",
            "details": {"parent_model": "", "format": info.get("format", "gguf"),
                        "family": info.get("family", "llama"), "families": [info.get("family", "llama")],
                        "parameter_size": info.get("parameter_size", ""),
                        "quantization_level": info.get("quant") or ""}}


@router.get("/api/tags")
async def ollama_tags(st: ServeState = Depends(serve_state)):
    return {"models": [_entry(n, m) for n, m in st.served.items()]}


@router.get("/api/ps")
async def ollama_ps(st: ServeState = Depends(serve_state)):
    return {"models": [{**_entry(n, m), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0,
                        "context_length": m.engine.n_ctx}
                       for n, m in st.served.items() if m.engine.ready]}


@router.post("/api/show")
async def ollama_show(request: Request, st: ServeState = Depends(serve_state)):
    req: OllamaShowRequest = await read_json(request, OllamaShowRequest, st.limit)
    name = req.model or req.name
    if not name:
        raise ApiError(400, "model is required")
    m = get_served(st, name)
    entry = _entry(name, m)
    template = m.engine.chat_template() or ""
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


@router.get("/api/version")
async def ollama_version():
    return {"version": ollama_codec.VERSION}


# one route for four methods: out of the OpenAPI schema (FastAPI would give the four operations one
# id and log "Duplicate Operation ID" on every /openapi.json); the module docstring lists them
@router.api_route("/api/{what}", methods=["GET", "POST", "DELETE", "HEAD"], include_in_schema=False)
async def ollama_unsupported(what: str):
    raise ApiError(501 if what in ("pull", "push", "create", "delete", "copy", "embed", "embeddings", "blobs")
                   else 404,
                   f"/api/{what} is not supported by atm serve: models come from the ATM registry "
                   "(`atm models list`) and are named on `atm serve --model`", "not_supported")
