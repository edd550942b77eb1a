"""An unexpected error inside a handler: the client gets a generic OpenAI-shaped 500 with a request
id, never the exception's text; the server log has the id and the traceback."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest

from atm.runtime import free_port
from atm.serve.engines import Engine
from atm.serve.settings import ServeSettings

SECRET = "/home/alice/keys/sk-live-123"


class BrokenEngine(Engine):
    """Starts fine, then fails every call with an error no handler expects (a bug, in effect)."""

    kind = "broken"

    async def _start(self) -> None:
        self.n_ctx = 256

    async def chat(self, req):
        raise RuntimeError(f"cannot open {SECRET}")

    chat_stream = completion = completion_stream = chat


@pytest.fixture
def app_url():
    import uvicorn

    from atm.serve.app import create_app
    from atm.serve.models import ServedModel

    served = {"b": ServedModel(name="b", engine=BrokenEngine("b"), kind="broken")}
    app = create_app(ServeSettings(), served=served)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield url
    server.should_exit = True
    th.join(10)


def test_unexpected_error_is_a_generic_500_with_a_request_id(app_url, caplog):
    with caplog.at_level(logging.ERROR, logger="atm.serve"):
        r = httpx.post(app_url + "/v1/chat/completions", timeout=10,
                       json={"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["code"] == 500
    rid = r.headers["X-Request-ID"]
    assert rid in err["message"]
    assert SECRET not in r.text and "RuntimeError" not in r.text
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert logged and logged[0].exc_info and SECRET in str(logged[0].exc_info[1])
    assert httpx.get(app_url + "/health").status_code == 200  # still serving


def test_library_use_is_quiet_and_the_cli_shows_logs(capsys):
    """A library caller sees nothing unless it configures logging; atm.logs.configure shows eval
    records on stdout (the run narrative) and the other stages' on stderr."""
    from atm import logs

    logging.getLogger("atm.serve.x").warning("hidden")
    assert capsys.readouterr() == ("", "")
    root = logging.getLogger("atm")
    before = (list(root.handlers), root.level, root.propagate)
    try:
        logs.configure("info")
        logs.configure("info")  # idempotent: one handler
        logging.getLogger("atm.eval.harness").info("eval says")
        logging.getLogger("atm.serve.engines").warning("serve says")
        out = capsys.readouterr()
        assert out.out == "eval says\n" and out.err == "serve says\n"
    finally:
        root.handlers[:], root.level, root.propagate = before
