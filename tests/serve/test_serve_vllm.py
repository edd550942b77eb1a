"""vLLM engine: a contract test of the command it launches and the requests it sends.

vLLM's wheel is CUDA-only, so `vllm serve` cannot run here. `$ATM_VLLM` points the engine at a
small real HTTP server on 127.0.0.1 that stands in for `vllm serve`: it records its command line
and every request body it receives and answers in the OpenAI shape. The test drives the real
`atm serve --engine vllm` process with the real `openai` client and asserts what vLLM would have
received: schemas in `structured_outputs` (vLLM >= 0.12; `guided_json` is gone), the served name,
slots and context on the command line, and a 503-then-recovery when the process dies.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time

import httpx
import pytest

from atm.serve.testing import ServerProcess, engine_pid

FAKE_VLLM = textwrap.dedent(r'''
    import json, os, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    argv = sys.argv[1:]
    assert argv[0] == "serve", argv
    port = int(argv[argv.index("--port") + 1])
    name = argv[argv.index("--served-model-name") + 1]
    max_len = int(argv[argv.index("--max-model-len") + 1]) if "--max-model-len" in argv else 4096
    logdir = os.environ["FAKE_VLLM_DIR"]
    with open(os.path.join(logdir, "argv.jsonl"), "a") as fh:
        fh.write(json.dumps(argv) + "\n")
    with open(os.path.join(logdir, "keys.jsonl"), "a") as fh:
        fh.write(json.dumps(os.environ.get("VLLM_API_KEY")) + "\n")
    ANSWER = '{"predicted_open_change": "1.50000000", "advice": "BUY"}'

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _json(self, obj, code=200):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self):
            # as vllm serve with --api-key / $VLLM_API_KEY: /v1 routes need the key, /health not
            key = os.environ.get("VLLM_API_KEY")
            if key and self.headers.get("Authorization") != f"Bearer {key}":
                self._json({"error": "Unauthorized"}, 401)
                return False
            return True

        def do_GET(self):
            if self.path == "/health":
                return self._json({})
            if not self._authorized():
                return
            if self.path == "/v1/models":
                return self._json({"object": "list", "data": [{"id": name, "object": "model",
                                                               "max_model_len": max_len}]})
            self._json({"error": "no route"}, 404)

        def do_POST(self):
            if not self._authorized():
                return
            n = int(self.headers.get("Content-Length", 0))
            req = json.loads(self.rfile.read(n))
            with open(os.path.join(logdir, "requests.jsonl"), "a") as fh:
                fh.write(json.dumps({"path": self.path, "body": req}) + "\n")
            if req.get("model") != name:
                return self._json({"error": {"message": "model not found"}}, 404)
            chat = self.path == "/v1/chat/completions"
            text = ANSWER if req.get("structured_outputs") else "hello from vllm"
            usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
            if req.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for piece in (text[:5], text[5:]):
                    ch = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                          else {"index": 0, "text": piece, "finish_reason": None})
                    obj = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": 1, "model": name, "choices": [ch]}
                    self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                return
            ch = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                  if chat else {"index": 0, "text": text, "finish_reason": "stop"})
            self._json({"id": "x", "object": "chat.completion" if chat else "text_completion",
                        "created": 1, "model": name, "choices": [ch], "usage": usage})

    ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
''')

SCHEMA = {"type": "object", "properties": {
    "predicted_open_change": {"type": "string", "pattern": r"^-?\d+\.\d{8}$"},
    "advice": {"type": "string", "enum": ["BUY", "NOOP", "SELL"]}},
    "required": ["predicted_open_change", "advice"], "additionalProperties": False}


@pytest.fixture
def fake_vllm(tmp_path):
    script = tmp_path / "vllm"
    script.write_text(f"#!{sys.executable}\n" + FAKE_VLLM)
    script.chmod(0o755)
    logdir = tmp_path / "vllm-log"
    logdir.mkdir()
    return script, logdir


def _requests(logdir):
    p = logdir / "requests.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def test_vllm_engine_contract(fake_vllm, tmp_path, port):
    import openai

    script, logdir = fake_vllm
    model_dir = tmp_path / "hf-model"
    model_dir.mkdir()
    env = {"ATM_VLLM": str(script), "FAKE_VLLM_DIR": str(logdir)}
    with ServerProcess(["--engine", "vllm", "--model", f"tiny={model_dir}", "--parallel", "4",
                        "--ctx-size", "1024", "--set", "restart_window=60"], port, env=env) as srv:
        srv.wait_ready(60)
        argv = json.loads((logdir / "argv.jsonl").read_text().splitlines()[0])
        assert argv[:2] == ["serve", str(model_dir)]
        assert argv[argv.index("--served-model-name") + 1] == "tiny"
        assert argv[argv.index("--max-num-seqs") + 1] == "4"
        assert argv[argv.index("--max-model-len") + 1] == "1024"
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        key = json.loads((logdir / "keys.jsonl").read_text().splitlines()[0])
        assert key and key not in argv  # a fresh key, in the environment (not on the command line)

        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "advise"}], max_tokens=32, seed=3,
            temperature=0.0, stop=["\n\n"],
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}})
        assert json.loads(out.choices[0].message.content)["advice"] == "BUY"
        assert out.model == "tiny"
        body = _requests(logdir)[-1]["body"]
        assert body["structured_outputs"] == {"json": SCHEMA}  # the schema as given, `\.` included
        assert "response_format" not in body and "guided_json" not in body
        assert body["max_tokens"] == 32 and body["seed"] == 3 and body["temperature"] == 0.0
        assert body["stop"] == ["\n\n"] and body["model"] == "tiny"

        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=8, response_format={"type": "json_object"})
        assert _requests(logdir)[-1]["body"]["structured_outputs"] == {"json_object": True}

        comp = client.completions.create(model="tiny", prompt="The market", max_tokens=5)
        assert comp.choices[0].text == "hello from vllm"
        req = _requests(logdir)[-1]
        assert req["path"] == "/v1/completions" and req["body"]["prompt"] == "The market"
        assert "structured_outputs" not in req["body"]

        chunks = list(client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=8, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello from vllm"
        assert _requests(logdir)[-1]["body"]["stream"] is True

        # the engine process dies: 503 with Retry-After while it restarts, then answers again
        pid = engine_pid(srv.url, "tiny")
        os.kill(pid, signal.SIGKILL)
        saw_503 = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=10, json={
                "model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
            if r.status_code == 503:
                saw_503 = True
                assert r.headers.get("Retry-After")
                assert r.json()["error"]["type"] == "service_unavailable"
            elif r.status_code == 200 and saw_503:
                break
            time.sleep(0.05)
        assert saw_503, "a request during the restart should get 503"
        assert r.status_code == 200
        assert len((logdir / "argv.jsonl").read_text().splitlines()) == 2  # launched again
        keys = [json.loads(k) for k in (logdir / "keys.jsonl").read_text().splitlines()]
        assert keys[1] and keys[1] != keys[0]  # a restarted engine gets a new key
        assert engine_pid(srv.url, "tiny") not in (None, pid)
