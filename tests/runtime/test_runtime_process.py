"""The runtime's engine process: a real child HTTP server on a private port behind a fresh key in
its environment, health-waited, restarted by the supervisor with a new port and key, stopped as a
process group."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time

import httpx
import pytest

from atm.errors import AtmError
from atm.runtime import free_port, new_api_key
from atm.runtime.process import EngineProcess
from atm.runtime.supervisor import Supervisor

SERVER = textwrap.dedent(r'''
    import os, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    key = os.environ.get("TEST_ENGINE_KEY")

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            ok = self.path == "/health" or self.headers.get("Authorization") == f"Bearer {key}"
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b"ok" if ok else b"no")

    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
''')


@pytest.fixture
def script(tmp_path):
    p = tmp_path / "server.py"
    p.write_text(SERVER)
    return p


def test_keys_and_ports_are_fresh():
    assert new_api_key() != new_api_key() and len(new_api_key()) > 20
    assert isinstance(free_port(), int)


def test_engine_process_key_in_env_not_argv(script, tmp_path):
    p = EngineProcess("fake", "m", lambda port: [sys.executable, str(script), str(port)],
                      key_env="TEST_ENGINE_KEY", log_dir=tmp_path)
    p.spawn()
    try:
        p.wait_healthy_sync(20)
        assert httpx.get(p.url + "/v1/models").status_code == 401
        assert httpx.get(p.url + "/v1/models", headers=p.headers).status_code == 200
        argv = open(f"/proc/{p.pid}/cmdline", "rb").read().decode()
        assert p.api_key not in argv and p.api_key not in p.log_path.read_text()
    finally:
        p.kill()
    assert p.returncode is not None and p.pid is None


def test_engine_process_that_exits_names_its_log(tmp_path):
    p = EngineProcess("fake", "m", lambda port: [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                      key_env=None, log_dir=tmp_path)
    p.spawn()
    with pytest.raises(AtmError, match="(?s)exited with code 3 while starting; log .*boom"):
        p.wait_healthy_sync(20)


def test_supervisor_restarts_with_a_new_port_and_key(script, tmp_path):
    events: list[tuple[str, str | None]] = []

    async def run():
        p = EngineProcess("fake", "m", lambda port: [sys.executable, str(script), str(port)],
                          key_env="TEST_ENGINE_KEY", log_dir=tmp_path)
        sup = Supervisor(p, startup_timeout=20, on_change=lambda s, e: events.append((s, e)))
        await sup.start()
        first = (p.port, p.api_key, p.pid)
        os.kill(p.pid, signal.SIGKILL)
        for _ in range(200):
            await asyncio.sleep(0.05)
            if sup.restarts == 1:
                break
        second = (p.port, p.api_key, p.pid)
        async with httpx.AsyncClient() as c:
            ok = (await c.get(p.url + "/v1/models", headers=p.headers)).status_code
        await sup.stop()
        return first, second, ok, p.returncode

    first, second, ok, rc = asyncio.run(run())
    assert second[1] != first[1] and second[2] not in (None, first[2])  # a new key, a new process
    assert ok == 200 and rc is not None  # the new one answers with its key; stop() ended it
    assert events[0][0] == "restarting" and "exited with code" in events[0][1] and events[-1] == ("ready", None)


# a server of several processes, as vLLM's (API server, engine core, worker): its helper ignores
# SIGTERM and outlives its leader unless ATM reaps the group
FAMILY = textwrap.dedent(r'''
    import os, signal, subprocess, sys
    helper = subprocess.Popen([sys.executable, "-c",
                               "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    open(sys.argv[2], "w").write(str(helper.pid))
    exec(open(sys.argv[3]).read().replace("int(sys.argv[1])", sys.argv[1]))
''')


@pytest.mark.parametrize("how", ["leader killed", "stopped"])
def test_no_process_of_the_group_outlives_the_engine(script, tmp_path, how):
    fam = tmp_path / "family.py"
    fam.write_text(FAMILY)
    helper_file = tmp_path / "helper.pid"
    p = EngineProcess("fake", "m", lambda port: [sys.executable, str(fam), str(port), str(helper_file), str(script)],
                      key_env="TEST_ENGINE_KEY", log_dir=tmp_path)
    p.spawn()
    try:
        p.wait_healthy_sync(20)
        helper = int(helper_file.read_text())
        assert os.getpgid(helper) == p.proc.pid
        if how == "leader killed":
            os.kill(p.proc.pid, signal.SIGKILL)  # as a crash: the helper would stay
            p.proc.wait(10)
            os.kill(helper, 0)  # still there, until reaped
            p.reap_group(grace=0.5)
        else:
            p.kill(timeout=2)  # SIGTERM to the group: the helper ignores it
    finally:
        p.kill(timeout=2)
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # SIGKILL is delivered at once; the zombie is reaped by init shortly
            os.killpg(p.proc.pid, 0)
            time.sleep(0.1)
