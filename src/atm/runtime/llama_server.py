"""llama.cpp's ``llama-server``: the one command line ATM starts it with, and a started server.

``command()`` is used by ``atm serve``'s llama-server engine, by ``atm-eval``'s ``atm:`` provider
(``--concurrency > 1``) and by ``benchmarks/bench_serve.py`` (the bare-server reference), so the
three run the same server the same way. ``LlamaServer`` is a started server for synchronous code
(eval, benchmarks, tests): a context manager with ``url``, ``base_url`` (``…/v1``) and ``headers``
(the fresh key of its process).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from atm.export.llamacpp import server_args
from atm.runtime.process import EngineProcess, StartedServer


def binary() -> Path:
    """The llama-server binary (``$ATM_LLAMA_SERVER``, PATH, or ATM's build; an AtmError naming
    `atm doctor --build` when there is none)."""
    from atm.export.llamacpp import require_tool

    return require_tool("llama-server")


KEY_ENV = "LLAMA_API_KEY"  # llama-server reads --api-key from here too; every route but /health needs it


def command(gguf: str | Path, *, port: int, alias: str, parallel: int = 1,
            ctx_size: int = 2048, threads: int | None = None, threads_batch: bool = True,
            ubatch_size: int | None = None, metrics: bool = True, log_colors: bool = False,
            exe: str | Path | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    """``llama-server`` on ``gguf`` at 127.0.0.1:``port``.

    ``parallel`` slots share ``ctx_size * parallel`` tokens of context (``ctx_size`` per slot);
    ``--jinja`` renders the GGUF's own chat template; ``ubatch_size`` sets the physical batch
    (``-ub``, with ``-b`` at least 2048). The API key is not an argument: it goes in the
    environment (``KEY_ENV``, see ``atm.runtime.process``).
    """
    cmd = [str(exe or binary()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-np", str(parallel), "-c", str(ctx_size * parallel)]
    if metrics:
        cmd.append("--metrics")
    cmd += ["--jinja", "--no-webui", "-a", alias, *server_args()]
    if not log_colors:
        cmd += ["--log-colors", "off"]
    if ubatch_size:
        cmd += ["-ub", str(ubatch_size), "-b", str(max(2048, ubatch_size))]
    if threads:
        cmd += ["-t", str(threads)] + (["-tb", str(threads)] if threads_batch else [])
    return cmd + list(extra_args)


class LlamaServer(StartedServer):
    """A llama-server started for synchronous callers; stopped on ``close()`` / leaving ``with``.

    Keyword arguments are ``command()``'s (``alias``, ``parallel``, ``ctx_size``, ``threads`` ...).
    """

    def __init__(self, gguf: str | Path, *, name: str | None = None, log_dir: str | Path | None = None,
                 startup_timeout: float = 180.0, **command_kw):
        self.gguf = Path(gguf)
        command_kw.setdefault("alias", name or self.gguf.stem)
        self.startup_timeout = startup_timeout
        exe = command_kw.pop("exe", None) or binary()
        self.process = EngineProcess(
            "llama-server", name or command_kw["alias"],
            lambda port: command(self.gguf, port=port, exe=exe, **command_kw),
            key_env=KEY_ENV, log_dir=log_dir)
