"""`atm serve` never falls over on bad input: a corpus of bad requests, each answered with its
documented 4xx and a well-shaped error body, the server healthy after every one; plus overload
(429 + Retry-After), client disconnects (generation cancelled), API keys and CORS.

Documented statuses (also in docs of `atm.serve.app`):
- 400: malformed JSON, a body that is not an object, wrong types, missing fields/roles, empty
  messages, max_tokens <= 0 or over the context, a prompt over the context, invalid schemas,
  unsupported features (tools, images, n > 1, echo, suffix);
- 401: missing/wrong API key; 404: unknown model (the body lists the served ones) or route;
- 405: wrong method; 413: body over `max_body_bytes`; 429: slots and queue full (Retry-After);
- 501: Ollama model-management routes (models come from the ATM registry).
OpenAI routes answer `{"error": {"message", "type", "param", "code"}}`, Ollama routes `{"error": "..."}`.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from atm.runtime import free_port
from atm.serve.testing import ServerProcess, engine_auth, engine_pid, klines_rows

pytestmark = [pytest.mark.native, pytest.mark.slow]

CTX = 512
LIMIT = 65536
OK_MSG = [{"role": "user", "content": "hi"}]
# a schema whose shortest answer is hundreds of tokens: the grammar allows no early eos, so a
# request with it runs to max_tokens (the trained tiny model would otherwise stop at once)
LONG = {"type": "json_schema", "json_schema": {"name": "long", "schema": {
    "type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 3}, "minItems": 300}}}


@pytest.fixture(scope="module")
def server(tiny_gguf, atm_home, tmp_path_factory):
    port = free_port()
    with ServerProcess(["--model", "atm:q8", "--parallel", "2", "--ctx-size", str(CTX),
                        "--set", f"max_body_bytes={LIMIT}", "--set", "max_queue=2"], port,
                       env={"ATM_HOME": str(atm_home)},
                       log=tmp_path_factory.mktemp("serve-robust") / "serve.log") as srv:
        srv.wait_ready(180)
        yield srv


def chat(**kw):
    return {"model": "atm:q8", "messages": OK_MSG, "max_tokens": 4, **kw}


def _long_text(words: int) -> str:
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
     chat(messages=[{"role": "user", "content": _long_text(3000)}]), 400),
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
    ("completion two prompts", "POST", "/v1/completions", {"model": "atm:q8", "prompt": ["a", "b"]}, 400),
    ("completion max_tokens -1", "POST", "/v1/completions", {"model": "atm:q8", "prompt": "a", "max_tokens": -1}, 400),
    ("completion echo", "POST", "/v1/completions", {"model": "atm:q8", "prompt": "a", "echo": True}, 400),
    ("completion prompt over context", "POST", "/v1/completions",
     {"model": "atm:q8", "prompt": _long_text(3000), "max_tokens": 4}, 400),
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
]


def _fill_klines(body, parquet):
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
    return {**body, "klines": rows}


def test_corpus_size():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("name,method,path,body,status", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_request(server, btc_parquet, name, method, path, body, status):
    body = _fill_klines(body, btc_parquet)
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    r = httpx.request(method, server.url + path, content=content, timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(err, str) and err
    else:
        assert isinstance(err, dict) and err["message"] and err["type"]
    if status == 404 and "model" in name:
        assert "atm:q8" in (err if isinstance(err, str) else err["message"])
    # still healthy and still answering
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_still_serves_after_corpus(server):
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(max_tokens=3), timeout=60)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] is not None


def test_full_queue_gets_429_with_retry_after(server):
    """2 slots + 2 queued: the rest of 10 simultaneous long requests get 429 + Retry-After."""
    statuses: list[int] = []
    retry_after: list[str | None] = []
    lock = threading.Lock()

    def one():
        r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json=chat(
            max_tokens=200, temperature=1.0, response_format=LONG,
            messages=[{"role": "user", "content": _long_text(50)}]))
        with lock:
            statuses.append(r.status_code)
            retry_after.append(r.headers.get("Retry-After"))

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(set(statuses)) == [200, 429], statuses
    assert statuses.count(200) >= 4
    assert all(ra and int(ra) >= 1 for s, ra in zip(statuses, retry_after) if s == 429)


def _slots_busy(server) -> int:
    engine = next(m for m in httpx.get(server.url + "/health").json()["models"])
    slots = httpx.get(f"http://127.0.0.1:{engine['port']}/slots", timeout=5,
                      headers=engine_auth(engine["pid"])).json()
    return sum(1 for s in slots if s.get("is_processing"))


def _wait_idle(server, timeout=10.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if _slots_busy(server) == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError("the engine kept generating after the client left")


LONG_CTX = 2048  # the tiny model's whole trained context
# no answer can close before max_tokens: every uncancelled request runs the full length
LONGEST = {"type": "json_schema", "json_schema": {"name": "longest", "schema": {
    "type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 3}, "minItems": 2000}}}


@pytest.fixture(scope="module")
def long_server(tiny_gguf, atm_home, tmp_path_factory):
    """One slot with a long context: an uncancelled answer of ~2,000 tokens takes seconds, well
    beyond llama-server's ~1 s polling for a closed connection (512 tokens took as little as 0.66 s
    on an idle machine, no longer than noticing the disconnect)."""
    port = free_port()
    with ServerProcess(["--model", "atm:q8", "--parallel", "1", "--ctx-size", str(LONG_CTX)], port,
                       env={"ATM_HOME": str(atm_home)},
                       log=tmp_path_factory.mktemp("serve-long") / "serve.log") as srv:
        srv.wait_ready(180)
        yield srv


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_generation(long_server, stream):
    """A client that leaves frees its slot at once (the full answer would take much longer)."""
    server = long_server
    _wait_idle(server)
    body = chat(max_tokens=LONG_CTX - 40, temperature=1.0, stream=stream, response_format=LONGEST,
                messages=[{"role": "user", "content": "tell me a long story"}])
    t0 = time.monotonic()
    if stream:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break  # got the first token: leave
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=0.3)
    gone = time.monotonic() - t0
    idle_after = _wait_idle(server)
    assert idle_after < 3.0, f"slot still busy {idle_after:.1f}s after the client left ({gone:.1f}s in)"
    # uncancelled, the same request runs to max_tokens: far longer than the cancel took
    t1 = time.monotonic()
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120,
                   json={**body, "stream": False, "seed": 1})
    full = time.monotonic() - t1
    assert r.json()["usage"]["completion_tokens"] == LONG_CTX - 40
    assert idle_after < full


def test_api_key_and_cors(tiny_gguf, atm_home, tmp_path):
    import openai

    port = free_port()
    with ServerProcess(["--model", "atm:q8", "--api-key", "s3cret", "--parallel", "1", "--ctx-size", "256",
                        "--set", "cors_origins=[\"http://ui.example\"]"], port,
                       env={"ATM_HOME": str(atm_home)}, log=tmp_path / "serve.log") as srv:
        srv.wait_ready(180)  # /health needs no key (for probes)
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(srv.url + "/api/chat", json={"model": "atm:q8", "messages": OK_MSG})
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.chat.completions.create(model="atm:q8", messages=OK_MSG, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        pre = httpx.options(srv.url + "/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST"})
        assert pre.headers.get("access-control-allow-origin") == "http://ui.example"


def test_no_cors_by_default(server):
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_binds_localhost_by_default(server):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"
    from atm.serve.settings import ServeSettings

    assert ServeSettings().host == "127.0.0.1"
    pid = engine_pid(server.url, "atm:q8")
    assert pid  # the engine is a child process of its own
