"""The llama.cpp toolchain that matches the installed llama-cpp-python.

Why one source for everything: the GGUF converter, the quantizer, ``llama-server`` and the
Python bindings must agree on the GGUF format and tokenizer handling. llama-cpp-python's source
distribution vendors the exact llama.cpp it runs (``vendor/llama.cpp``: ``convert_hf_to_gguf.py``,
its ``conversion/`` package, the matching ``gguf-py``, and the C++ sources of the tools), so ATM
fetches that sdist once with pip, caches it under ``~/.cache/atm/llama.cpp/<version>/`` and builds
``llama-server`` / ``llama-quantize`` from it with cmake. The PyPI ``gguf`` package is older than
the converter needs (it fails on a missing ``LazyChunkedTensor``), so it is never used.

Overrides: ``$ATM_LLAMA_CPP_DIR`` (a llama.cpp checkout), ``$ATM_LLAMA_SERVER``,
``$ATM_LLAMA_QUANTIZE`` (binaries), ``$ATM_CACHE`` (cache root).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator

from atm.errors import AtmError, MissingDependency
from atm.utils import cache_dir

log = logging.getLogger(__name__)

TOOLS = ("llama-server", "llama-quantize")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # ties the binary to this CPU type; the cache dir is per machine anyway
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # the prebuilt web UI would be downloaded; not needed
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: no libllama.so to find at run time
)
DONE_MARKER = ".atm-build-done"
GPU_FLAGS = {"cuda": ("-DGGML_CUDA=ON",)}  # backend -> extra cmake flags


NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU the driver sees


def gpu_backend() -> str | None:
    """The GPU backend to build llama.cpp's tools with: ``$ATM_LLAMA_GPU`` (``cuda`` or ``cpu``),
    else ``cuda`` when an NVIDIA GPU is present (the driver lists one) AND the CUDA compiler is
    (``nvcc`` on PATH or in ``$CUDA_HOME/bin``). A toolkit without a GPU (common in CI images)
    stays CPU: a CUDA build takes far longer and would run on the CPU anyway.
    A CUDA ``llama-server`` offloads every layer by default (``-ngl auto``)."""
    env = (os.environ.get("ATM_LLAMA_GPU") or "").strip().lower()
    if env in ("cpu", "0", "none", "off"):
        return None
    if env in ("cuda", "1", "on"):
        return "cuda"
    if env:
        raise AtmError(f"$ATM_LLAMA_GPU={env!r}: use 'cuda' or 'cpu'")
    try:
        has_gpu = NVIDIA_GPUS.is_dir() and any(NVIDIA_GPUS.iterdir())
    except OSError:
        has_gpu = False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    has_nvcc = bool(shutil.which("nvcc") or (home and (Path(home) / "bin" / "nvcc").is_file()))
    return "cuda" if has_gpu and has_nvcc else None


def cmake_flags(backend: str | None = None) -> tuple[str, ...]:
    return CMAKE_FLAGS + (GPU_FLAGS[backend] if backend else ())


# ---------------------------------------------------------------------------------------------
# versions and locations

def python_binding_version() -> str:
    """The installed llama-cpp-python version (raises MissingDependency when absent)."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError as exc:
        raise MissingDependency(
            "llama-cpp-python is not installed; it decides which llama.cpp ATM uses. "
            "Install it with: pip install 'atm[export]' -c constraints.txt "
            "(or point $ATM_LLAMA_CPP_DIR at a llama.cpp checkout)") from exc


def version_root(version: str | None = None) -> Path:
    """``~/.cache/atm/llama.cpp/<llama-cpp-python version>/``."""
    return cache_dir() / "llama.cpp" / (version or python_binding_version())


def build_dir(version: str | None = None) -> Path:
    """Where the cmake build of the tools lives (binaries in ``bin/``): ``build`` for CPU,
    ``build-cuda`` for a CUDA build, so switching backends never mixes two builds."""
    backend = gpu_backend()
    name = f"build-{backend}" if backend else "build"
    env = os.environ.get("ATM_LLAMA_CPP_DIR")
    if env and version is None:
        # A user checkout gets its own build dir in the cache, keyed by its path.
        import hashlib

        key = hashlib.sha256(str(Path(env).expanduser().resolve()).encode()).hexdigest()[:12]
        return cache_dir() / "llama.cpp" / f"custom-{key}" / name
    return version_root(version) / name


def _sdist_vendor_path(version: str) -> Path:
    return version_root(version) / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def _check_source(src: Path, origin: str) -> Path:
    if not (src / "convert_hf_to_gguf.py").is_file() or not (src / "gguf-py" / "gguf").is_dir():
        raise AtmError(
            f"{src} ({origin}) is not a llama.cpp source tree: convert_hf_to_gguf.py or gguf-py/ "
            "is missing")
    return src


def llamacpp_source(fetch: bool = True) -> Path:
    """The llama.cpp source tree to use: ``$ATM_LLAMA_CPP_DIR``, else the installed
    llama-cpp-python's vendored copy (fetched once with pip and cached)."""
    env = os.environ.get("ATM_LLAMA_CPP_DIR")
    if env:
        return _check_source(Path(env).expanduser(), "$ATM_LLAMA_CPP_DIR")
    version = python_binding_version()
    src = _sdist_vendor_path(version)
    if (src / "convert_hf_to_gguf.py").is_file():
        return _check_source(src, "cached llama-cpp-python sdist")
    if not fetch:
        raise AtmError(f"llama.cpp source for llama-cpp-python {version} is not cached at {src}; "
                       "run `atm doctor --build` to fetch it")
    fetch_source(version)
    return _check_source(src, "fetched llama-cpp-python sdist")


@contextlib.contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    """An exclusive file lock so two processes never fetch or build into the same place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process %s (lock %s) ...", what, path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_source(version: str | None = None) -> Path:
    """Download llama-cpp-python's sdist with pip and extract it atomically into the cache."""
    version = version or python_binding_version()
    root = version_root(version)
    target = root / f"llama_cpp_python-{version}"
    with _locked(root / "fetch.lock", "fetching the llama.cpp source"):
        if (target / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
            return target
        log.info("fetching llama-cpp-python %s source (vendored llama.cpp) with pip ...", version)
        with tempfile.TemporaryDirectory(prefix="atm-llamacpp-", dir=root) as tmp:
            tmpd = Path(tmp)
            cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}",
                   "--no-binary", ":all:", "--no-deps", "-d", str(tmpd / "dl")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            archives = sorted((tmpd / "dl").glob("llama_cpp_python-*.tar.gz")) if proc.returncode == 0 else []
            if not archives:
                raise AtmError(
                    f"could not download llama-cpp-python=={version} source with pip "
                    f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
                    "Without network, set $ATM_LLAMA_CPP_DIR to a llama.cpp checkout.")
            extract = tmpd / "x"
            with tarfile.open(archives[0]) as tar:
                try:
                    tar.extractall(extract, filter="data")
                except TypeError:  # Python < 3.11.4 without extraction filters
                    tar.extractall(extract)  # noqa: S202 - pip-verified sdist from the index
            inner = extract / f"llama_cpp_python-{version}"
            if not (inner / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
                raise AtmError(f"{archives[0].name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
            if target.exists():  # a stale partial copy from an older ATM: replace it
                shutil.rmtree(target)
            os.replace(inner, target)
    return target


def llamacpp_version(src: Path | None = None) -> str | None:
    """llama.cpp's own version string (``0.5.0-dev``) read from its CMakeLists.txt."""
    try:
        src = src or llamacpp_source(fetch=False)
        text = (src / "CMakeLists.txt").read_text()
    except (AtmError, OSError):
        return None
    parts = [re.search(rf"set\(LLAMA_VERSION_{k}\s+(\d+)\)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    base = ".".join(m.group(1) for m in parts)  # type: ignore[union-attr]
    # Release builds set LLAMA_BUILD_NUMBER; the vendored copy is a dev snapshot.
    dev = re.search(r'option\(LLAMA_BUILD_IS_DEV\s+"[^"]*"\s+ON\)', text)
    return f"{base}-dev" if dev else base


def ggml_version(src: Path | None = None) -> str | None:
    try:
        src = src or llamacpp_source(fetch=False)
        text = (src / "ggml" / "CMakeLists.txt").read_text()
    except (AtmError, OSError):
        return None
    parts = [re.search(rf"set\(GGML_VERSION_{k}\s+(\d+)\)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else None  # type: ignore[union-attr]


def version_info() -> dict[str, str | None]:
    """Versions recorded in every exported artifact."""
    try:
        binding = python_binding_version()
    except MissingDependency:
        binding = None
    return {"llama-cpp-python": binding, "llama.cpp": llamacpp_version(), "ggml": ggml_version()}


def converter_script() -> Path:
    return llamacpp_source() / "convert_hf_to_gguf.py"


def gguf_py_dir() -> Path:
    return llamacpp_source() / "gguf-py"


def import_gguf():
    """The vendored ``gguf`` package (GGUFReader etc.), matching the converter's format."""
    if "gguf" in sys.modules:
        return sys.modules["gguf"]
    path = str(gguf_py_dir())
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf  # noqa: PLC0415

    return gguf


# ---------------------------------------------------------------------------------------------
# CPUs with AMX

def cpu_has_amx() -> bool:
    """True on CPUs with AMX-INT8 (Intel Sapphire Rapids and later; ``$ATM_CPU_FLAGS`` in tests)."""
    from atm.utils import cpu_flags

    return "amx_int8" in cpu_flags()


_AMX_GUARDED = False


def no_amx_repack() -> bool:
    """Keep llama.cpp's AMX weight repacking off in this process; True where that applies.

    Why: built with ``GGML_NATIVE`` on a CPU with AMX, this llama.cpp (llama-cpp-python 0.3.36) moves
    Q8_0 / Q4_K_M weights into its AMX buffer type, and decoding then segfaults on ATM's tiny model
    (measured: the first decode of ``atm:q8`` / ``atm:q4`` died with SIGSEGV on an Intel Xeon with
    amx_int8; F16, and the same files with repacking off, ran). Every ``llama_cpp.Llama`` made after
    this call loads with ``use_extra_bufts = False`` (no repacked buffers; the plain CPU kernels).
    Nothing changes where the CPU or the loaded library has no AMX. ``llama-server`` gets the same
    through ``server_args()`` (``--no-repack``)."""
    global _AMX_GUARDED
    if _AMX_GUARDED:
        return True
    if not cpu_has_amx():
        return False
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    if b"AMX_INT8 = 1" not in (lib.llama_print_system_info() or b""):
        return False
    default = lib.llama_model_default_params

    def params_without_repack():  # llama_cpp.Llama reads its model params from this function
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params_without_repack
    llama_cpp.llama_model_default_params = params_without_repack
    _AMX_GUARDED = True
    log.info("this CPU has AMX: llama.cpp weight repacking is off (its AMX kernels segfault here)")
    return True


def server_args() -> list[str]:
    """Extra llama-server arguments this CPU needs (``--no-repack`` with AMX; see no_amx_repack)."""
    return ["--no-repack"] if cpu_has_amx() else []


# ---------------------------------------------------------------------------------------------
# native tools

def _env_name(tool: str) -> str:
    return "ATM_" + tool.upper().replace("-", "_")  # llama-server -> ATM_LLAMA_SERVER


def _built(tool: str, bdir: Path | None = None) -> Path | None:
    bdir = bdir or build_dir()
    exe = bdir / "bin" / tool
    marker = bdir / DONE_MARKER
    if exe.is_file() and os.access(exe, os.X_OK) and marker.is_file() \
            and tool in marker.read_text().split():
        return exe
    return None


def find_tool(name: str) -> Path | None:
    """A llama.cpp binary: ``$ATM_LLAMA_SERVER`` / ``$ATM_LLAMA_QUANTIZE``, then PATH, then the
    cache build. None when not found (``atm doctor --build`` builds it)."""
    env = os.environ.get(_env_name(name))
    if env:
        p = Path(env).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise AtmError(f"${_env_name(name)}={env} is not an executable file")
        return p
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    try:
        return _built(name)
    except MissingDependency:
        return None


def require_tool(name: str) -> Path:
    exe = find_tool(name)
    if exe is None:
        raise AtmError(f"{name} not found (${_env_name(name)}, PATH, {build_dir() / 'bin'}); "
                       f"build it with `atm doctor --build` (about 5 minutes on 2 cores)")
    return exe


def build_tools(targets: tuple[str, ...] = TOOLS, jobs: int | None = None, force: bool = False,
                quiet: bool = False) -> dict[str, str]:
    """Build ``llama-server`` and ``llama-quantize`` from the matching source (cached; skipped
    when already built). Returns ``{tool: path}``.

    Atomicity: the build runs in the cache build dir under an exclusive lock and only a
    successful build writes the done-marker naming its targets; ``find_tool`` ignores binaries
    without the marker, so an interrupted build is never used and is resumed by the next call.
    """
    bdir = build_dir()
    backend = gpu_backend()
    if not force and all(_built(t, bdir) for t in targets):
        return {t: str(_built(t, bdir)) for t in targets}
    src = llamacpp_source()
    if shutil.which("cmake") is None:
        raise AtmError("cmake is not installed; install it (apt-get install cmake g++) to build llama-server")
    jobs = jobs or int(os.environ.get("ATM_BUILD_JOBS", "0")) or min(os.cpu_count() or 2, 8)
    with _locked(bdir.parent / "build.lock", "building llama.cpp tools"):
        if not force and all(_built(t, bdir) for t in targets):  # built while we waited
            return {t: str(_built(t, bdir)) for t in targets}
        bdir.mkdir(parents=True, exist_ok=True)
        marker = bdir / DONE_MARKER
        done_before = set(marker.read_text().split()) if marker.is_file() else set()
        marker.unlink(missing_ok=True)
        log_path = bdir / "atm-build.log"
        t0 = time.time()
        if not quiet:
            log.info("building %s from %s for %s (about 5 min on 2 cores; log: %s)", ", ".join(targets),
                     src, backend or "CPU", log_path)
        gen = ["-G", "Ninja"] if shutil.which("ninja") and not (bdir / "Makefile").exists() else []
        # The file handle is not called `log`: that name is the module logger (F823).
        with open(log_path, "w") as build_log:
            _run_logged(["cmake", "-S", str(src), "-B", str(bdir), *gen, *cmake_flags(backend)], build_log,
                        quiet=True)
            _run_logged(["cmake", "--build", str(bdir), "--config", "Release", "-j", str(jobs),
                         "--target", *targets], build_log, quiet=quiet)
        missing = [t for t in targets if not (bdir / "bin" / t).is_file()]
        if missing:
            raise AtmError(f"build finished but {missing} not found in {bdir / 'bin'}; see {log_path}")
        marker.write_text(" ".join(sorted(done_before | set(targets))) + "\n")
        if not quiet:
            log.info("built in %.0f s: %s", time.time() - t0, bdir / "bin")
    return {t: str(bdir / "bin" / t) for t in targets}


def _run_logged(cmd: list[str], build_log, quiet: bool) -> None:
    """Run a build step, logging everything; show cmake's [ NN%] as a progress bar."""
    from atm.utils import progress

    build_log.write("$ " + " ".join(cmd) + "\n")
    build_log.flush()
    bar = None if quiet else progress(total=100, desc="llama.cpp build", unit="%")
    pct_re = re.compile(r"^\[\s*(\d+)%\]|^\[(\d+)/(\d+)\]")
    last = 0
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        build_log.write(line)
        tail = (tail + [line])[-30:]
        m = pct_re.match(line)
        if m:
            build_log.flush()  # so `tail atm-build.log` shows where a long build is
        if m and bar is not None:
            pct = int(m.group(1)) if m.group(1) else int(100 * int(m.group(2)) / max(int(m.group(3)), 1))
            if pct > last:
                bar.update(pct - last)
                last = pct
    rc = proc.wait()
    if bar is not None:
        bar.close()
    if rc != 0:
        raise AtmError(f"`{' '.join(cmd[:4])} ...` failed (exit {rc}); last lines:\n{''.join(tail)}"
                       f"full log: {build_log.name}")


def tool_version(exe: str | Path) -> str | None:
    """The ``version: N (commit)`` line a llama.cpp binary prints with ``--version``."""
    try:
        proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.lower().startswith("version"):
            return line.split(":", 1)[-1].strip()
    return None


def describe() -> dict[str, object]:
    """What ``atm doctor`` prints about llama.cpp: versions, paths, found or not."""
    out: dict[str, object] = dict(version_info())
    try:
        src = llamacpp_source(fetch=False)
        out["source"] = str(src)
        out["converter"] = str(src / "convert_hf_to_gguf.py")
    except AtmError as exc:
        out["source"] = f"not found ({exc})"
        out["converter"] = None
    try:
        out["gpu_backend"] = gpu_backend() or "cpu"
        out["build_dir"] = str(build_dir())
    except MissingDependency:
        out["build_dir"] = None
    except AtmError as exc:
        out["gpu_backend"] = f"error: {exc}"
        out["build_dir"] = None
    for tool in TOOLS:
        try:
            p = find_tool(tool)
        except AtmError as exc:
            p = f"error: {exc}"
        out[tool] = str(p) if p else "not found (atm doctor --build)"
        if p and tool == "llama-server":
            out["llama-server version"] = tool_version(p)
    out["cmake"] = shutil.which("cmake")
    return out
