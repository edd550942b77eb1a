"""The bad-request corpus of `atm serve`: each request with the status every engine must answer.

Shared by tests/serve/test_serve_robustness.py (llama-server) and tests/serve/test_serve_vllm.py
(a real vLLM): a bad request gets the same 4xx whichever engine serves the model. The bodies name
the model `atm:q8`; `corpus(model)` renames it. Servers under test run with `--ctx-size CTX` and
`max_body_bytes=LIMIT`.
"""

from __future__ import annotations

import json

import httpx

from atm.serve.testing import klines_rows

CTX = 512
LIMIT = 65536
OK_MSG = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return {"model": "atm:q8", "messages": OK_MSG, "max_tokens": 4, **kw}


def long_text(words: int) -> str:
    return " ".join(f"w{i % 97}" for i in range(words))


# (name, method, path, body: dict | bytes | None, expected status)
CORPUS: list[tuple[str, str, str, object, int]] = [
    # --- OpenAI chat
    ("malformed json", "POST", "/v1/chat/completions", b'{"model": "atm:q8", "messages": [', 400),
    ("not an object", "POST", "/v1/chat/completions", b"[1, 2, 3]", 400),
    ("empty body", "POST", "/v1/chat/completions", b"", 400),
    ("not utf-8", "POST", "/v1/chat/completions", b"\xff\xfe{\x00", 400),
    ("missing model", "POST", "/v1/chat/completions", {"messages": OK_MSG}, 400),
    ("model not a string", "POST", "/v1/chat/completions", chat(model=123), 400),
    ("unknown model", "POST", "/v1/chat/completions", chat(model="atm:q9"), 404),
    ("missing messages", "POST", "/v1/chat/completions", {"model": "atm:q8"}, 400),
    ("empty messages", "POST", "/v1/chat/completions", chat(messages=[]), 400),
    ("messages not a list", "POST", "/v1/chat/completions", chat(messages="hi"), 400),
    ("message without role", "POST", "/v1/chat/completions", chat(messages=[{"content": "hi"}]), 400),
    ("unknown role", "POST", "/v1/chat/completions", chat(messages=[{"role": "robot", "content": "x"}]), 400),
    ("content wrong type", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), 400),
    ("all contents empty", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "  "}]), 400),
    ("image part", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400),
    ("max_tokens zero", "POST", "/v1/chat/completions", chat(max_tokens=0), 400),
    ("max_tokens negative", "POST", "/v1/chat/completions", chat(max_tokens=-5), 400),
    ("max_tokens a string", "POST", "/v1/chat/completions", chat(max_tokens="10"), 400),
    ("max_tokens over context", "POST", "/v1/chat/completions", chat(max_tokens=10**6), 400),
    ("prompt over context", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": long_text(3000)}]), 400),
    ("temperature a word", "POST", "/v1/chat/completions", chat(temperature="hot"), 400),
    ("temperature too high", "POST", "/v1/chat/completions", chat(temperature=7), 400),
    ("n > 1", "POST", "/v1/chat/completions", chat(n=3), 400),
    ("stream not a bool", "POST", "/v1/chat/completions", chat(stream="yes"), 400),
    ("too many stops", "POST", "/v1/chat/completions", chat(stop=[f"s{i}" for i in range(17)]), 400),
    ("unknown response_format", "POST", "/v1/chat/completions", chat(response_format={"type": "xml"}), 400),
    ("json_schema without schema", "POST", "/v1/chat/completions",
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400),
    ("invalid schema", "POST", "/v1/chat/completions",
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}), 400),
    ("invalid schema regex", "POST", "/v1/chat/completions",
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
         "type": "string", "pattern": "(unclosed"}}}), 400),
    ("tools", "POST", "/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400),
    ("top_logprobs too many", "POST", "/v1/chat/completions", chat(logprobs=True, top_logprobs=50), 400),
    ("body over the limit", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "x" * (LIMIT + 10)}]), 413),
    ("wrong method", "GET", "/v1/chat/completions", None, 405),
    ("unknown route", "POST", "/v1/nothing", {}, 404),
    # --- OpenAI completions
    ("completion without prompt", "POST", "/v1/completions", {"model": "atm:q8"}, 400),
    ("completion empty prompt list", "POST", "/v1/completions", {"model": "atm:q8", "prompt": []}, 400),
    ("completion empty token ids", "POST", "/v1/completions", {"model": "atm:q8", "prompt": [[]]}, 400),
    ("completion negative token id", "POST", "/v1/completions", {"model": "atm:q8", "prompt": [5, -1]}, 400),
    ("completion mixed prompt list", "POST", "/v1/completions", {"model": "atm:q8", "prompt": ["a", 5]}, 400),
    ("completion token id a float", "POST", "/v1/completions", {"model": "atm:q8", "prompt": [5, 1.5]}, 400),
    ("completion too many prompts", "POST", "/v1/completions", {"model": "atm:q8", "prompt": ["a"] * 257}, 400),
    ("completion token id out of vocabulary", "POST", "/v1/completions",
     {"model": "atm:q8", "prompt": [1, 10**8], "max_tokens": 2}, 400),
    ("completion max_tokens -1", "POST", "/v1/completions", {"model": "atm:q8", "prompt": "a", "max_tokens": -1}, 400),
    ("completion echo", "POST", "/v1/completions", {"model": "atm:q8", "prompt": "a", "echo": True}, 400),
    ("completion prompt over context", "POST", "/v1/completions",
     {"model": "atm:q8", "prompt": long_text(3000), "max_tokens": 4}, 400),
    ("unknown model (models route)", "GET", "/v1/models/atm:zz", None, 404),
    # --- Ollama
    ("ollama malformed json", "POST", "/api/chat", b"{nope", 400),
    ("ollama unknown model", "POST", "/api/chat", {"model": "llama3", "messages": OK_MSG}, 404),
    ("ollama messages wrong type", "POST", "/api/chat", {"model": "atm:q8", "messages": "hi"}, 400),
    ("ollama bad option type", "POST", "/api/chat",
     {"model": "atm:q8", "messages": OK_MSG, "options": {"temperature": "x"}}, 400),
    ("ollama num_predict zero", "POST", "/api/chat",
     {"model": "atm:q8", "messages": OK_MSG, "stream": False, "options": {"num_predict": 0}}, 400),
    ("ollama bad format", "POST", "/api/chat", {"model": "atm:q8", "messages": OK_MSG, "format": "xml"}, 400),
    ("ollama images", "POST", "/api/generate", {"model": "atm:q8", "prompt": "x", "images": ["aGk="]}, 400),
    ("ollama show unknown", "POST", "/api/show", {"model": "nope"}, 404),
    ("ollama show no model", "POST", "/api/show", {}, 400),
    ("ollama pull", "POST", "/api/pull", {"model": "llama3"}, 501),
    # --- advice
    ("advice no klines", "POST", "/v1/advice", {"model": "atm:q8"}, 400),
    ("advice empty klines", "POST", "/v1/advice", {"model": "atm:q8", "klines": []}, 400),
    ("advice too few bars", "POST", "/v1/advice", {"model": "atm:q8", "klines": "FEW"}, 400),
    ("advice gap", "POST", "/v1/advice", {"model": "atm:q8", "klines": "GAP"}, 400),
    ("advice negative price", "POST", "/v1/advice", {"model": "atm:q8", "klines": "NEG"}, 400),
    ("advice unknown symbol", "POST", "/v1/advice", {"model": "atm:q8", "symbol": "DOGE", "time": "2025-08-01"}, 400),
    # nothing filled in or ignored silently (issue 22)
    ("advice no count", "POST", "/v1/advice", {"model": "atm:q8", "klines": "NOCOUNT"}, 400),
    ("advice klines and time", "POST", "/v1/advice", {"model": "atm:q8", "klines": "OK", "time": "2025-08-01"}, 400),
    ("advice time without symbol", "POST", "/v1/advice", {"model": "atm:q8", "time": "2025-08-01"}, 400),
]


def fill_klines(body, parquet):
    if not isinstance(body, dict) or not isinstance(body.get("klines"), str):
        return body
    rows = klines_rows(parquet, 100, 30)
    kind = body["klines"]
    if kind == "FEW":
        rows = rows[:3]
    elif kind == "GAP":
        rows = rows[:10] + rows[11:]
    elif kind == "NEG":
        rows[5]["low"] = -1.0
    elif kind == "NOCOUNT":
        rows = [{k: v for k, v in r.items() if k != "count"} for r in rows]
    return {**body, "klines": rows}




def _rename(obj, model: str):
    if isinstance(obj, bytes):
        return obj.replace(b"atm:q8", model.encode())
    if isinstance(obj, dict):
        return {k: (model if k == "model" and v == "atm:q8" else _rename(v, model)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rename(x, model) for x in obj]
    return obj


def corpus(model: str = "atm:q8") -> list[tuple[str, str, str, object, int]]:
    """CORPUS with the model named ``model`` (an unknown-model case stays unknown)."""
    return [(n, m, p.replace("atm:q8", model), _rename(b, model), s) for n, m, p, b, s in CORPUS]


def check_bad_request(url: str, parquet, case, model: str = "atm:q8") -> None:
    """Send one corpus case to the server at ``url``: its status, a well-shaped error body (naming
    the served model on a 404 for an unknown one), and the server still healthy after it."""
    name, method, path, body, status = case
    body = fill_klines(body, parquet)
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    r = httpx.request(method, url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(err, str) and err
    else:
        assert isinstance(err, dict) and err["message"] and err["type"]
    if status == 404 and "model" in name:
        assert model in (err if isinstance(err, str) else err["message"])
    # still healthy and still answering
    assert httpx.get(url + "/health", timeout=10).status_code == 200
