"""Process helpers for tests and benchmarks: run the real `atm serve` CLI (or any server) as a
subprocess on 127.0.0.1, wait for health, stop it with its engines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


class ServerProcess:
    """`python -m atm serve ...` in its own process group, stopped (and its engines) at exit."""

    def __init__(self, args: list[str], port: int, env: dict | None = None, log: Path | None = None,
                 cmd: list[str] | None = None, health: str = "/health"):
        import tempfile

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.health = health
        self.log = log or Path(tempfile.gettempdir()) / f"atm-serve-{port}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.fh = open(self.log, "wb")
        argv = cmd if cmd is not None else [sys.executable, "-m", "atm", "serve", *args, "--port", str(port)]
        self.proc = subprocess.Popen(argv, stdout=self.fh, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 120.0, headers: dict | None = None) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                r = httpx.get(self.url + self.health, timeout=2.0, headers=headers or {})
                last = r.text
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise RuntimeError(f"server not healthy after {timeout} s (last: {last}):\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def engine_pid(url: str, model: str, headers: dict | None = None) -> int | None:
    r = httpx.get(url + "/health", timeout=5.0, headers=headers or {})
    for m in r.json()["models"]:
        if m["model"] == model:
            return m.get("pid")
    return None


def engine_auth(pid: int, key_env: str = "LLAMA_API_KEY") -> dict[str, str]:
    """The Authorization header of an engine process ATM started, read from its environment as
    only the same user (or root) can (Linux ``/proc``): for tests that look at the engine itself."""
    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    key = next(v.split(b"=", 1)[1].decode() for v in env if v.startswith(key_env.encode() + b"="))
    return {"Authorization": f"Bearer {key}"}


def klines_rows(parquet: Path, start: int, n: int) -> list[dict]:
    """n consecutive 1m klines as /v1/advice JSON rows (ISO times)."""
    from atm.market.klines import read_klines_parquet

    df = read_klines_parquet(parquet).iloc[start:start + n]
    out = []
    for rec in df[["open_time", "open", "high", "low", "close", "volume", "quote_volume", "count",
                   "taker_buy_volume", "taker_buy_quote_volume"]].to_dict("records"):
        rec["open_time"] = rec["open_time"].isoformat()
        rec["count"] = int(rec["count"])
        out.append(rec)
    return out


