"""Engines that are child processes: an OpenAI-speaking server ATM starts and keeps alive.

``ManagedProcessEngine`` ties an ``OpenAIUpstreamEngine`` to an ``atm.runtime.supervisor.Supervisor``:
the process runs on a private 127.0.0.1 port behind a fresh random API key (a new one at every
restart) that only this engine knows. When the process dies the engine goes to ``restarting``
(new requests get 503 + Retry-After at once; requests in flight see their connection drop and get
503), a new process is spawned and health-waited, and the engine is ``ready`` again; too many
deaths in the restart window mark it ``failed`` (503 with the reason) instead of looping forever.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from atm.runtime.process import EngineProcess
from atm.runtime.supervisor import Supervisor
from atm.serve.engines.http import HTTPUpstream, OpenAIUpstreamEngine

log = logging.getLogger(__name__)


class ManagedProcessEngine(OpenAIUpstreamEngine):
    """Subclasses give ``command(port)`` and ``key_env`` (where the server reads its API key);
    ``_after_ready`` reads what the server reports about itself (context size ...) after every
    healthy start."""

    health_path = "/health"
    key_env: str | None = None

    def __init__(self, name: str, *, startup_timeout: float = 180.0, max_restarts: int = 5,
                 restart_window: float = 300.0, log_dir: str | Path | None = None,
                 extra_args: list[str] | None = None, **kw: Any):
        super().__init__(name, **kw)
        self.extra_args = list(extra_args or [])
        self.process = EngineProcess(self.kind, name, self.command, key_env=self.key_env, log_dir=log_dir,
                                     health_path=self.health_path)
        self.supervisor = Supervisor(self.process, startup_timeout=startup_timeout, max_restarts=max_restarts,
                                     restart_window=restart_window, on_change=self._on_change,
                                     on_exit=self._on_exit, after_spawn=self._spawned)

    @staticmethod
    def managed_options(spec: Any, settings: Any) -> dict[str, Any]:
        """The supervision settings of ``atm serve`` for one served model."""
        return dict(startup_timeout=settings.startup_timeout, max_restarts=settings.max_restarts,
                    restart_window=settings.restart_window, log_dir=settings.log_dir,
                    extra_args=spec.extra_args)

    def command(self, port: int) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def base_path(self) -> str:
        return "/v1"

    @property
    def port(self) -> int | None:
        return self.process.port

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def upstream(self, base_path: str = "", timeout: float | None = None) -> HTTPUpstream:
        """A client of the running process (with its key), at ``base_path``."""
        return HTTPUpstream(self.process.url + base_path, who=f"{self.kind} for {self.name}",
                            api_key=self.process.api_key, timeout=timeout or self.request_timeout)

    async def _spawned(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        self.http = self.upstream(self.base_path())
        self.state = "ready"  # so _after_ready's calls pass check_ready
        await self._after_ready()

    async def _after_ready(self) -> None:
        """Read what the server reports about itself once it is healthy."""

    def _on_change(self, state: str, error: str | None) -> None:
        self.state, self.error = state, error
        if state == "ready":
            self.restarts = self.supervisor.restarts
        elif state == "failed":
            log.error("atm serve: %s", error)

    def _on_exit(self, code: int) -> None:
        log.warning("atm serve: %s for %s exited with code %s; restarting (log %s)", self.kind, self.name,
                    code, self.log_path)

    async def _start(self) -> None:
        await self.supervisor.start()

    async def _stop(self) -> None:
        await self.supervisor.stop()
        await super()._stop()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(pid=self.process.pid, port=self.port, log=str(self.log_path))
        return d
