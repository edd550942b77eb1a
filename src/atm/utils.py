"""Small shared helpers: atomic writes, hashing, provenance, progress."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

TRACKED_PACKAGES = (
    "atm", "numpy", "pandas", "pyarrow", "torch", "transformers", "trl", "peft", "datasets",
    "accelerate", "tokenizers", "llama-cpp-python", "scikit-learn", "lightgbm", "fastapi",
    "gradio", "openai", "ollama",
)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or an exception leaves no half-written file behind (the temp file is removed).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the final file the usual permissions (0666 minus the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def versions(packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape an artifact (missing ones omitted)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance(config: Any = None, **extra: Any) -> dict[str, Any]:
    """What made an artifact: the config, package versions, command line, time, machine."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": config,
        "versions": versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu_summary()},
        **extra,
    }


def progress_off() -> bool:
    """Whether progress bars are off: ``ATM_NO_PROGRESS=1``, or stderr is not a terminal (a log
    file or a pipe) unless ``ATM_NO_PROGRESS=0``. For the bars of libraries (transformers, datasets)."""
    env = os.environ.get("ATM_NO_PROGRESS")
    if env in ("0", "1"):
        return env == "1"
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError):
        return True


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it", **kw):
    """A tqdm progress bar on stderr, drawn only when stderr is a terminal (tqdm's ``disable=None``):
    output sent to a file or a pipe gets no bars. ``ATM_NO_PROGRESS=1`` turns them off on a terminal
    too; ``ATM_NO_PROGRESS=0`` forces them on."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=progress_off(), dynamic_ncols=True,
                file=sys.stderr, **kw)


def atm_home() -> Path:
    """Where ATM keeps its model registry: ``$ATM_HOME`` or the user's data dir."""
    env = os.environ.get("ATM_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("atm"))


def cache_dir() -> Path:
    """Where compiled and downloaded tools are cached: ``$ATM_CACHE`` or ``~/.cache/atm``."""
    env = os.environ.get("ATM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "atm"


def repo_root() -> Path | None:
    """The source checkout (for shipped prompts/, datasets/, eval/ ...) when running from one."""
    env = os.environ.get("ATM_ROOT")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "prompts").is_dir():
            return parent
    cwd = Path.cwd()
    if (cwd / "prompts").is_dir():
        return cwd
    return None


# ---------------------------------------------------------------------------------------------
# the CPU: which vector ISA and whether bf16 is native (machines of one kind differ: some x86
# CPUs have AVX-512 with bf16, others AVX2 only, where torch's bf16 matmuls ran ~70x slower)

CPU_FLAGS_ENV = "ATM_CPU_FLAGS"  # stands in for /proc/cpuinfo's flags (tests of another CPU type)


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, ...]:
    """/proc/cpuinfo's lines up to the first blank one (the first CPU), read once per process."""
    try:
        with open("/proc/cpuinfo") as fh:
            return tuple(iter(lambda: fh.readline().rstrip("\n") or None, None))
    except OSError:
        return ()


def _cpuinfo_field(*keys: str) -> str | None:
    return next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith(keys)), None)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``), or ``$ATM_CPU_FLAGS``."""
    given = os.environ.get(CPU_FLAGS_ENV)
    if given is not None:
        return set(given.split())
    return set((_cpuinfo_field("flags", "Features") or "").split())


def cpu_native_bf16(flags: set[str] | None = None) -> bool:
    """True where the CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_summary() -> dict[str, Any]:
    """What ``atm doctor`` and every artifact's provenance say about the CPU."""
    flags = cpu_flags()
    isa = next((f for f in ("avx512_bf16", "avx512f", "avx2") if f in flags), None)
    model = _cpuinfo_field("model name")
    return {"model": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "isa": isa.replace("avx512f", "avx512") if isa else (platform.machine() or "unknown"),
            "native_bf16": cpu_native_bf16(flags)}
