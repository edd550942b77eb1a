"""An engine process kept alive: restarted when it dies, within a restart budget.

``Supervisor(process, ...)``: ``start()`` spawns and health-waits the process, then a watcher
task awaits its exit. If it exits while not being stopped, the state goes to ``restarting``, a new
process (new port, new key) is spawned and health-waited, and the state is ``ready`` again. More
than ``max_restarts`` deaths within ``restart_window`` seconds end in ``failed`` instead of a
restart loop. Each change is reported through ``on_change(state, error)``; ``after_spawn()`` runs
after every healthy spawn (the owner rebuilds its clients for the new port and key there).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Awaitable, Callable

from atm.errors import AtmError
from atm.runtime.process import EngineProcess


class Supervisor:
    def __init__(self, process: EngineProcess, *, startup_timeout: float = 180.0, max_restarts: int = 5,
                 restart_window: float = 300.0,
                 on_change: Callable[[str, str | None], None] = lambda state, error: None,
                 on_exit: Callable[[int], None] = lambda code: None,
                 after_spawn: Callable[[], Awaitable[None]] | None = None):
        self.process = process
        self.startup_timeout = startup_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.on_change = on_change
        self.on_exit = on_exit
        self.after_spawn = after_spawn
        self.restarts = 0
        self._deaths: list[float] = []
        self._stopping = False
        self._watcher: asyncio.Task | None = None

    async def _spawn(self) -> None:
        self.process.spawn()
        await self.process.wait_healthy(self.startup_timeout)
        if self.after_spawn is not None:
            await self.after_spawn()

    async def start(self) -> None:
        self._stopping = False
        await self._spawn()
        self._watcher = asyncio.create_task(self._watch(), name=f"watch-{self.process.name}")

    async def _watch(self) -> None:
        p = self.process
        while not self._stopping:
            if p.proc is None:
                return
            rc = await p.wait_exit()
            if self._stopping:
                return
            await asyncio.to_thread(p.reap_group)  # what the dead leader left of its group
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < self.restart_window] + [now]
            self.on_change("restarting", f"{p.kind} exited with code {rc}")
            self.on_exit(rc)
            while not self._stopping:
                if len(self._deaths) > self.max_restarts:
                    self.on_change("failed", f"{p.kind} died {len(self._deaths)} times within "
                                             f"{self.restart_window:.0f} s (last exit code {rc}); see {p.log_path}")
                    return
                try:
                    await asyncio.sleep(min(0.2 * len(self._deaths), 5.0))
                    await self._spawn()
                    self.restarts += 1
                    self.on_change("ready", None)
                    break
                except AtmError as exc:
                    self._deaths.append(time.monotonic())
                    self.on_change("restarting", str(exc))

    async def stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        await self.process.akill()
