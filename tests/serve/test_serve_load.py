"""Load: 8 concurrent clients x 50 requests against one `atm serve` -> 0 errors.

Mixed traffic as real users send it: OpenAI chat (plain and schema-constrained), OpenAI
completions, Ollama chat and /v1/advice, all at once. Small max_tokens keep it short on 2 cores;
the point is correctness under concurrency (no errors, no hangs, valid JSON), not speed
(speed is benchmarks/bench_serve.py).
"""

from __future__ import annotations

import json
import threading

import httpx
import jsonschema
import pytest

from atm.runtime import free_port
from atm.serve.testing import ServerProcess, klines_rows

pytestmark = [pytest.mark.native, pytest.mark.slow]

CLIENTS, PER_CLIENT = 8, 50
SCHEMA = {"type": "object", "properties": {"advice": {"type": "string", "enum": ["BUY", "NOOP", "SELL"]}},
          "required": ["advice"], "additionalProperties": False}


def test_8_clients_x_50_requests_no_errors(tiny_gguf, atm_home, btc_parquet, tmp_path):
    window = klines_rows(btc_parquet, 300, 30)
    port = free_port()
    with ServerProcess(["--model", "atm:q8", "--parallel", "8", "--ctx-size", "768"], port,
                       env={"ATM_HOME": str(atm_home)}, log=tmp_path / "serve.log") as srv:
        srv.wait_ready(180)
        errors: list[str] = []
        done = [0]
        lock = threading.Lock()

        def client(k: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                for i in range(PER_CLIENT):
                    kind = (k + i) % 5
                    try:
                        if kind == 0:
                            r = c.post("/v1/chat/completions", json={
                                "model": "atm:q8", "max_tokens": 6, "seed": i,
                                "messages": [{"role": "user", "content": f"client {k} request {i}"}]})
                            ok = r.status_code == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str)
                        elif kind == 1:
                            # room for the whitespace llama.cpp's JSON grammar allows between tokens
                            r = c.post("/v1/chat/completions", json={
                                "model": "atm:q8", "max_tokens": 128, "temperature": 1.0, "seed": i,
                                "messages": [{"role": "user", "content": f"advise {k}/{i}"}],
                                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}})
                            ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"
                            if ok:
                                jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SCHEMA)
                        elif kind == 2:
                            r = c.post("/v1/completions", json={"model": "atm:q8", "prompt": f"{k} {i}", "max_tokens": 6})
                            ok = r.status_code == 200 and "text" in r.json()["choices"][0]
                        elif kind == 3:
                            r = c.post("/api/chat", json={"model": "atm:q8", "stream": False, "options": {"num_predict": 6},
                                                          "messages": [{"role": "user", "content": f"hey {k} {i}"}]})
                            ok = r.status_code == 200 and r.json()["done"] is True
                        else:
                            r = c.post("/v1/advice", json={"model": "atm:q8", "klines": window, "probs": i % 2 == 0})
                            ok = r.status_code == 200 and r.json()["valid"] is True
                        if not ok:
                            errors.append(f"client {k} req {i} kind {kind}: {r.status_code} {r.text[:200]}")
                    except Exception as exc:  # noqa: BLE001 - every failure is counted
                        errors.append(f"client {k} req {i} kind {kind}: {type(exc).__name__} {exc}")
                    with lock:
                        done[0] += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert done[0] == CLIENTS * PER_CLIENT
        assert errors == [], errors[:5]
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'atm_requests_total{route="/v1/advice",status="200"} 80.0' in metrics
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
