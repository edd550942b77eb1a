"""The Ollama API <-> ATM's engine protocol, both ways, in one place.

``atm serve`` speaks Ollama to clients (``atm.serve.api.ollama``: Ollama requests in, engine
requests out; OpenAI-shaped engine answers in, Ollama answers out) and, as the ``remote`` engine
with ``upstream_api: ollama``, to an Ollama server (``atm.serve.engines.remote``: the reverse).
Both use the tables and functions here, so the two directions cannot drift apart.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any

from atm.serve.engines.base import EngineRequest

VERSION = "0.12.0"  # the Ollama API level ATM follows

# EngineRequest field <-> Ollama `options` key
SAMPLING_OPTIONS: tuple[tuple[str, str], ...] = (
    ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"),
    ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"))
OPTIONS: tuple[tuple[str, str], ...] = SAMPLING_OPTIONS + (("max_tokens", "num_predict"), ("stop", "stop"))
UNLIMITED_PREDICT = (-1, -2)  # num_predict values meaning "no limit" / "fill the context"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def finish_reason(done_reason: str | None) -> str:
    """OpenAI's finish_reason for an Ollama done_reason."""
    return "length" if done_reason == "length" else "stop"


def done_reason(finish: str | None) -> str:
    """Ollama's done_reason for an OpenAI finish_reason."""
    return "length" if finish == "length" else "stop"


def usage(obj: dict[str, Any]) -> dict[str, int]:
    """OpenAI usage from an Ollama answer's counts."""
    p, c = int(obj.get("prompt_eval_count") or 0), int(obj.get("eval_count") or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# --------------------------------------------------------------------------------------------
# ATM as an Ollama client (the remote engine)


def upstream_payload(req: EngineRequest, model: str, stream: bool) -> dict[str, Any]:
    """The /api/chat (``req.messages``) or raw /api/generate (``req.prompt``) body for ``req``."""
    opts: dict[str, Any] = {}
    for field, key in OPTIONS:
        v = getattr(req, field)
        if v is not None:
            opts[key] = [v] if key == "stop" and isinstance(v, str) else v
    out: dict[str, Any] = {"model": model, "stream": stream, "options": opts}
    if req.chat:
        out["messages"] = req.messages
    else:
        out["prompt"] = req.prompt
        out["raw"] = True
    if req.json_schema is not None:
        out["format"] = req.json_schema
    elif req.json_object:
        out["format"] = "json"
    return out


def openai_response(obj: dict[str, Any], model: str, chat: bool) -> dict[str, Any]:
    """A non-streamed Ollama answer as an OpenAI response."""
    created = int(time.time())
    if chat:
        msg = obj.get("message") or {}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                "model": model,
                "choices": [{"index": 0, "finish_reason": finish_reason(obj.get("done_reason")),
                             "message": {"role": "assistant", "content": msg.get("content", "")}}],
                "usage": usage(obj)}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": obj.get("response", ""),
                         "finish_reason": finish_reason(obj.get("done_reason")), "logprobs": None}],
            "usage": usage(obj)}


def openai_chunk(obj: dict[str, Any], model: str, chat: bool, cid: str, created: int) -> dict[str, Any]:
    """One NDJSON line of an Ollama stream as an OpenAI chunk (usage on the last one)."""
    done = bool(obj.get("done"))
    fin = finish_reason(obj.get("done_reason")) if done else None
    if chat:
        text = (obj.get("message") or {}).get("content", "")
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": fin}]}
    else:
        chunk = {"id": cid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"index": 0, "text": obj.get("response", ""), "finish_reason": fin}]}
    if done:
        chunk["usage"] = usage(obj)
    return chunk


# --------------------------------------------------------------------------------------------
# ATM as an Ollama server (the /api routes)


def request_fields(options: dict[str, Any] | None, fmt: Any) -> dict[str, Any]:
    """EngineRequest fields from an Ollama request's ``options`` and ``format``, unchecked: the
    caller validates ``max_tokens`` (``None`` when num_predict means "no limit"), ``stop`` and
    ``json_schema`` against the served model."""
    out: dict[str, Any] = {}
    o = options or {}
    for field, key in SAMPLING_OPTIONS:
        if o.get(key) is not None:
            out[field] = o[key]
    if o.get("stop"):
        out["stop"] = o["stop"]
    if o.get("num_predict") is not None:
        out["max_tokens"] = None if o["num_predict"] in UNLIMITED_PREDICT else o["num_predict"]
    if isinstance(fmt, dict):
        out["json_schema"] = fmt
    elif fmt == "json":
        out["json_object"] = True
    return out


def final(model: str, resp: dict[str, Any], t_start: float, extra: dict[str, Any]) -> dict[str, Any]:
    """The last (or only) Ollama object of an answer, from an OpenAI-shaped response (its usage,
    finish reason and llama-server's ``timings`` when present). ``extra``: the message/response."""
    u = resp.get("usage") or {}
    choice = (resp.get("choices") or [{}])[0]
    timings = resp.get("timings") or {}
    return {"model": model, "created_at": now_iso(), **extra, "done": True,
            "done_reason": done_reason(choice.get("finish_reason")),
            "total_duration": int((time.perf_counter() - t_start) * 1e9), "load_duration": 0,
            "prompt_eval_count": u.get("prompt_tokens", 0),
            "prompt_eval_duration": int(timings.get("prompt_ms", 0) * 1e6),
            "eval_count": u.get("completion_tokens", 0),
            "eval_duration": int(timings.get("predicted_ms", 0) * 1e6)}


def piece(model: str, text: str, as_chat: bool) -> dict[str, Any]:
    """A streamed Ollama object carrying ``text`` (/api/chat: a message; /api/generate: response)."""
    body = {"message": {"role": "assistant", "content": text}} if as_chat else {"response": text}
    return {"model": model, "created_at": now_iso(), **body, "done": False}


def answer(text: str, as_chat: bool) -> dict[str, Any]:
    """The message (/api/chat) or response (/api/generate) field of a final object."""
    return {"message": {"role": "assistant", "content": text}} if as_chat else {"response": text}
