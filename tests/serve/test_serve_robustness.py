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

import threading
import time

import httpx
import pytest

from atm.runtime import free_port
from atm.serve.testing import ServerProcess, engine_auth, engine_pid
from bad_requests import CORPUS, CTX, LIMIT, OK_MSG, check_bad_request, chat, long_text

pytestmark = [pytest.mark.native, pytest.mark.slow]

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


def test_corpus_size():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_request(server, btc_parquet, case):
    check_bad_request(server.url, btc_parquet, case)


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
            messages=[{"role": "user", "content": long_text(50)}]))
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
