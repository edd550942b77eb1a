"""One engine server process: a child speaking HTTP on a private 127.0.0.1 port, behind a key.

``EngineProcess`` is what serve, eval and the benchmarks start llama-server (or ``vllm serve``)
with. Every spawn gets a free port and a fresh random API key, so no other process can use the
engine: ATM's own clients send ``headers``. The key travels in the child's environment
(``key_env``: llama-server's ``LLAMA_API_KEY``, vLLM's ``VLLM_API_KEY``), never on its command
line, which any local user can read in ``ps``. The child runs in its own process
group (stopped as a group; a ^C in the terminal reaches ATM only, which then stops it in order)
and gets SIGTERM when its parent dies, even by SIGKILL (Linux), so no orphan keeps a port and
memory. Output goes to a log file whose tail is quoted when the process fails to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from atm.errors import AtmError
from atm.runtime.net import free_port, new_api_key

# command(port) -> argv
CommandFn = Callable[[int], list[str]]


def _libc_prctl():
    """libc's prctl, resolved in the parent: a forked child of a threaded process must not import
    or load anything before exec (another thread may hold the import lock)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None


_PRCTL = _libc_prctl()


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (PR_SET_PDEATHSIG, Linux). It only
    calls the prctl resolved at import, so it is safe as ``preexec_fn`` beside threads."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EngineProcess:
    """A launchable engine server. ``spawn()`` starts it; ``wait_healthy[_sync]()`` waits until
    ``health_path`` answers 200 (raising ``AtmError`` with the log's tail if it exits or times
    out); ``kill()`` / ``akill()`` stop its process group."""

    def __init__(self, kind: str, name: str, command: CommandFn, *, key_env: str | None,
                 log_dir: str | Path | None = None, health_path: str = "/health",
                 env: dict[str, str] | None = None):
        self.kind = kind
        self.name = name
        self.command = command
        self.key_env = key_env  # None: the server takes no key (then ATM does not pretend it has one)
        self.health_path = health_path
        self.env = env
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "atm-engine-logs"
        self.log_path = self.log_dir / f"{safe}-{os.getpid()}-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.api_key: str | None = None

    # --- addresses ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    # --- start ----------------------------------------------------------------------------------
    def spawn(self) -> None:
        """Start a new process on a new port with a new key (the previous one must be gone)."""
        self.port = free_port()
        self.api_key = new_api_key() if self.key_env else None
        cmd = self.command(self.port)
        env = {**os.environ, **(self.env or {})}
        if self.key_env:
            env[self.key_env] = self.api_key
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env,
                                         # calls a prctl resolved at import, no import: safe beside threads
                                         preexec_fn=die_with_parent)  # noqa: PLW1509

    def _not_started(self, timeout: float, exited: bool) -> AtmError:
        if exited:
            return AtmError(f"{self.kind} for {self.name} exited with code {self.returncode} while "
                            f"starting; log {self.log_path}:\n{self.log_tail()}")
        return AtmError(f"{self.kind} for {self.name} did not become healthy within {timeout:.0f} s; "
                        f"log {self.log_path}:\n{self.log_tail()}")

    def wait_healthy_sync(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, headers=self.headers, trust_env=False) as client:
            while True:
                if self.returncode is not None:
                    self.kill()  # what it left of its process group
                    raise self._not_started(timeout, exited=True)
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.health_path, timeout=2.0).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    self.kill()
                    raise self._not_started(timeout, exited=False)
                time.sleep(0.1)

    async def wait_healthy(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, trust_env=False) as client:
            while True:
                if self.returncode is not None:
                    await self.akill()  # what it left of its process group
                    raise self._not_started(timeout, exited=True)
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.health_path, timeout=2.0)).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    await self.akill()
                    raise self._not_started(timeout, exited=False)
                await asyncio.sleep(0.1)

    # --- wait / stop ----------------------------------------------------------------------------
    async def wait_exit(self) -> int:
        """The exit code, awaited without blocking the event loop (a thread of its own waits, so
        engines never use up the loop's default executor)."""
        proc = self.proc
        assert proc is not None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def wait() -> None:
            rc = proc.wait()
            with contextlib.suppress(RuntimeError):  # the loop may be closed by then (shutdown)
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(rc))

        threading.Thread(target=wait, name=f"wait-{self.kind}-{proc.pid}", daemon=True).start()
        return await fut

    def kill(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout`` s (then to what is left of the
        group too: a server of several processes, as vLLM's, must not leave one behind)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.reap_group(grace=timeout)

    def reap_group(self, grace: float = 5.0) -> None:
        """After the leader exited: give the rest of its process group ``grace`` s to exit (vLLM's
        engine and worker processes stop by themselves when their API server goes), then SIGKILL
        what is left, so a dead engine never keeps a port, memory or a GPU."""
        proc = self.proc
        if proc is None or proc.poll() is None:
            return
        deadline = time.monotonic() + grace
        while True:
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group?
            except (ProcessLookupError, PermissionError):
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.1)

    async def akill(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            await asyncio.to_thread(self.kill, timeout)

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])


class StartedServer:
    """An ``EngineProcess`` started for synchronous callers (eval, benchmarks, tests) and stopped
    on ``close()`` / leaving ``with``: ``LlamaServer`` and ``VLLMServer`` give it their process."""

    process: EngineProcess
    startup_timeout: float

    def start(self):
        self.process.spawn()
        self.process.wait_healthy_sync(self.startup_timeout)
        return self

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def base_url(self) -> str:
        return self.process.url + "/v1"

    @property
    def api_key(self) -> str | None:
        return self.process.api_key

    @property
    def headers(self) -> dict[str, str]:
        return self.process.headers

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def close(self) -> None:
        self.process.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
