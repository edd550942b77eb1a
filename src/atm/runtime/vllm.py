"""``vllm serve``: the command line ATM starts vLLM with (``atm serve --engine vllm``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from atm.errors import AtmError


def binary(explicit: str | None = None) -> str:
    """``explicit``, ``$ATM_VLLM``, or ``vllm`` on PATH."""
    exe = explicit or os.environ.get("ATM_VLLM") or shutil.which("vllm")
    if exe is None:
        raise AtmError("vLLM is not installed (pip install vllm; CUDA only), or give `upstream:` "
                       "to attach to a running vLLM server")
    return exe


KEY_ENV = "VLLM_API_KEY"  # vllm serve's --api-key, read from the environment (protects /v1)


def command(model_dir: str | Path, *, port: int, served_name: str, max_num_seqs: int,
            max_model_len: int | None = None, exe: str | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    """``vllm serve MODEL_DIR`` at 127.0.0.1:``port`` (its key in the environment: ``KEY_ENV``)."""
    cmd = [binary(exe), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", served_name, "--max-num-seqs", str(max_num_seqs), "--disable-log-requests"]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    return cmd + list(extra_args)
