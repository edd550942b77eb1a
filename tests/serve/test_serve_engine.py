"""Engine supervision: killing llama-server under load gives 503s (never a hang), then recovery.

Also: the remote engine proxies to another server (OpenAI and Ollama APIs), and several models
run as separate engine processes.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from atm.runtime import free_port
from atm.serve.testing import ServerProcess, engine_auth, engine_pid

pytestmark = [pytest.mark.native, pytest.mark.slow]

MSG = [{"role": "user", "content": "tell me a long story"}]
# no answer shorter than hundreds of tokens: requests with it run to max_tokens
LONG = {"type": "json_schema", "json_schema": {"name": "long", "schema": {
    "type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 3}, "minItems": 400}}}


def test_engine_killed_then_restarted(tiny_gguf, atm_home, tmp_path):
    port = free_port()
    with ServerProcess(["--model", "atm:q8", "--parallel", "4", "--ctx-size", "1024"], port,
                       env={"ATM_HOME": str(atm_home)}, log=tmp_path / "serve.log") as srv:
        srv.wait_ready(180)
        pid = engine_pid(srv.url, "atm:q8")
        results: list[tuple[int, str | None, float]] = []
        lock = threading.Lock()

        def long_request():
            t0 = time.monotonic()
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                "model": "atm:q8", "messages": MSG, "max_tokens": 900, "temperature": 1.0,
                "response_format": LONG})
            with lock:
                results.append((r.status_code, r.headers.get("Retry-After"), time.monotonic() - t0))

        threads = [threading.Thread(target=long_request) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # all four are decoding
        os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join(90)
        assert len(results) == 4
        # in flight when the engine died: 503 with Retry-After, quickly (no hang to the timeout)
        died = [r for r in results if r[0] == 503]
        assert died, results
        assert all(ra for _, ra, _ in died)
        assert all(elapsed < 30 for _, _, elapsed in results)
        # requests during the restart get 503 at once; then it answers again
        t0 = time.monotonic()
        codes = []
        while time.monotonic() - t0 < 60:
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                           json={"model": "atm:q8", "messages": MSG, "max_tokens": 2})
            codes.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code == 503 and r.headers.get("Retry-After")
            time.sleep(0.05)
        assert codes[-1] == 200, codes
        h = httpx.get(srv.url + "/health").json()
        assert h["status"] == "ok"
        assert h["models"][0]["restarts"] == 1
        assert h["models"][0]["pid"] not in (None, pid)
        assert 'atm_engine_restarts{model="atm:q8"} 1.0' in httpx.get(srv.url + "/metrics").text


def test_remote_engine_proxies_openai_and_ollama(tiny_gguf, atm_home, tmp_path):
    """A second atm serve proxies the first one, once over its OpenAI API, once over its Ollama API."""
    import ollama
    import openai

    p1, p2 = free_port(), free_port()
    with ServerProcess(["--model", "atm:q8", "--parallel", "2", "--ctx-size", "512"], p1,
                       env={"ATM_HOME": str(atm_home)}, log=tmp_path / "upstream.log") as up:
        up.wait_ready(180)
        with ServerProcess(["--engine", "remote", "--model", f"via-openai={up.url}/v1",
                            "--model", f"via-ollama={up.url}", "--set", "models.1.upstream_api=ollama",
                            "--set", "models.0.upstream_model=atm:q8", "--set", "models.1.upstream_model=atm:q8"],
                           p2, log=tmp_path / "proxy.log") as proxy:
            proxy.wait_ready(60)
            client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
            schema = {"type": "object", "properties": {"advice": {"enum": ["BUY", "NOOP", "SELL"]}},
                      "required": ["advice"], "additionalProperties": False}
            for name in ("via-openai", "via-ollama"):
                out = client.chat.completions.create(
                    model=name, messages=MSG, max_tokens=16, temperature=0.7, seed=1,
                    response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
                assert out.model == name
                import json

                assert json.loads(out.choices[0].message.content)["advice"] in ("BUY", "NOOP", "SELL")
                chunks = list(client.chat.completions.create(model=name, messages=MSG, max_tokens=5, stream=True))
                assert any(c.choices and c.choices[0].finish_reason for c in chunks)
                comp = client.completions.create(model=name, prompt="<|user|>x<|assistant|>", max_tokens=4)
                assert isinstance(comp.choices[0].text, str)
            olm = ollama.Client(host=proxy.url)
            r = olm.chat(model="via-ollama", messages=MSG, options={"num_predict": 4})
            assert r.done and r.model == "via-ollama"
            # the upstream's errors come back as errors, not hangs
            direct = client.chat.completions.create(model="via-openai", messages=MSG, max_tokens=3)
            assert direct.choices[0].message.content is not None
            # token-id prompts: an OpenAI upstream takes them, Ollama's API cannot (a clear 400);
            # a list of text prompts works on both (one upstream request per prompt)
            assert client.completions.create(model="via-openai", prompt=[[1, 5, 6]], max_tokens=2).choices
            with pytest.raises(openai.BadRequestError, match="cannot take a prompt given as token ids"):
                client.completions.create(model="via-ollama", prompt=[1, 5, 6], max_tokens=2)
            two = client.completions.create(model="via-ollama", prompt=["a", "b"], max_tokens=2)
            assert [c.index for c in two.choices] == [0, 1]


def test_engine_process_needs_its_own_key(tiny_gguf, atm_home, tmp_path):
    """The llama-server behind `atm serve --api-key K` is no side door: its loopback port answers
    401 without the engine's own random key (K included); atm serve uses that key itself, and the
    key is on no command line (`ps` shows those to every local user) nor in the engine log."""
    port = free_port()
    with ServerProcess(["--model", "atm:q8", "--parallel", "1", "--ctx-size", "512", "--api-key", "user-key"],
                       port, env={"ATM_HOME": str(atm_home)}, log=tmp_path / "serve.log") as srv:
        srv.wait_ready(180)
        engine = httpx.get(srv.url + "/health").json()["models"][0]
        engine_url = f"http://127.0.0.1:{engine['port']}"
        assert httpx.get(engine_url + "/health").status_code == 200  # liveness stays open
        for headers in ({}, {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer none"}):
            assert httpx.get(engine_url + "/v1/models", headers=headers).status_code == 401, headers
            r = httpx.post(engine_url + "/v1/chat/completions", headers=headers,
                           json={"messages": MSG, "max_tokens": 2})
            assert r.status_code == 401, headers
        auth = engine_auth(engine["pid"])
        assert httpx.get(engine_url + "/v1/models", headers=auth).status_code == 200
        ok = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": "Bearer user-key"},
                        json={"model": "atm:q8", "messages": MSG, "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200, ok.text
        key = auth["Authorization"].split()[1]
        argv = open(f"/proc/{engine['pid']}/cmdline", "rb").read().decode(errors="replace")
        assert key not in argv and key not in open(engine["log"]).read()
