"""The llama.cpp toolchain: the source matching llama-cpp-python, tool lookup, the cached build."""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from atm.errors import AtmError
from atm.export import llamacpp


def test_source_matches_the_installed_binding():
    src = llamacpp.llamacpp_source(fetch=False)
    assert (src / "convert_hf_to_gguf.py").is_file() and (src / "gguf-py" / "gguf").is_dir()
    version = metadata.version("llama-cpp-python")
    if not os.environ.get("ATM_LLAMA_CPP_DIR"):
        assert f"llama_cpp_python-{version}" in str(src)
    info = llamacpp.version_info()
    assert info["llama-cpp-python"] == version
    assert info["llama.cpp"] and info["llama.cpp"][0].isdigit() and info["ggml"].count(".") == 2
    gguf = llamacpp.import_gguf()
    assert Path(gguf.__file__).resolve().is_relative_to(src.resolve())  # the vendored gguf-py


def test_env_overrides(monkeypatch, tmp_path):
    exe = tmp_path / "my-llama-server"
    exe.write_text("#!/bin/sh\necho custom\n")
    exe.chmod(0o755)
    monkeypatch.setenv("ATM_LLAMA_SERVER", str(exe))
    assert llamacpp.find_tool("llama-server") == exe
    assert llamacpp.require_tool("llama-server") == exe
    notexe = tmp_path / "plain"
    notexe.write_text("x")
    monkeypatch.setenv("ATM_LLAMA_SERVER", str(notexe))
    with pytest.raises(AtmError, match="ATM_LLAMA_SERVER=.* is not an executable file"):
        llamacpp.find_tool("llama-server")
    monkeypatch.setenv("ATM_LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(AtmError, match="not a llama.cpp source tree"):
        llamacpp.llamacpp_source()


def test_unbuilt_tools_are_not_found_in_an_empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ATM_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("ATM_LLAMA_QUANTIZE", raising=False)
    assert llamacpp.find_tool("llama-quantize") is None
    # a binary without the done-marker (an interrupted build) is never used
    bdir = llamacpp.build_dir()
    (bdir / "bin").mkdir(parents=True)
    fake = bdir / "bin" / "llama-quantize"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert llamacpp.find_tool("llama-quantize") is None
    (bdir / llamacpp.DONE_MARKER).write_text("llama-quantize\n")
    assert llamacpp.find_tool("llama-quantize") == fake
    with pytest.raises(AtmError, match="llama-server not found .*atm doctor --build"):
        llamacpp.require_tool("llama-server")


def test_gpu_backend_picks_the_cmake_flags_and_its_own_build_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ATM_CACHE", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no nvcc anywhere
    monkeypatch.delenv("ATM_LLAMA_GPU", raising=False)
    gpus = tmp_path / "proc-driver-nvidia-gpus"  # what the NVIDIA driver lists, one dir per GPU
    monkeypatch.setattr(llamacpp, "NVIDIA_GPUS", gpus)
    assert llamacpp.gpu_backend() is None
    cpu_dir = llamacpp.build_dir()
    assert cpu_dir.name == "build" and not any("CUDA" in f for f in llamacpp.cmake_flags(None))
    # a CUDA toolkit without a GPU (a CI image) stays on the CPU build
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    assert llamacpp.gpu_backend() is None
    # toolkit + a GPU the driver sees: a CUDA build, in a build dir of its own
    (gpus / "0000:01:00.0").mkdir(parents=True)
    assert llamacpp.gpu_backend() == "cuda"
    assert llamacpp.build_dir() == cpu_dir.with_name("build-cuda")
    assert "-DGGML_CUDA=ON" in llamacpp.cmake_flags("cuda")
    monkeypatch.setenv("ATM_LLAMA_GPU", "cpu")  # forced off despite nvcc
    assert llamacpp.gpu_backend() is None and llamacpp.build_dir() == cpu_dir
    monkeypatch.setenv("ATM_LLAMA_GPU", "metal")
    with pytest.raises(AtmError, match="ATM_LLAMA_GPU='metal': use 'cuda' or 'cpu'"):
        llamacpp.gpu_backend()


def test_doctor_reports_llama_cpp(cli):
    rep = json.loads(cli("doctor", "--json").stdout)
    info = rep["llama.cpp"]
    assert info["llama-cpp-python"] == metadata.version("llama-cpp-python")
    assert info["converter"].endswith("convert_hf_to_gguf.py")
    assert {"llama-server", "llama-quantize", "build_dir", "cmake"} <= set(info)
    assert info["gpu_backend"] in ("cpu", "cuda")


@pytest.mark.slow
@pytest.mark.native
def test_build_tools_gives_working_binaries():
    """Builds llama-server and llama-quantize once (about 5 min on 2 cores; `atm doctor --build`
    in scripts/setup.sh does it ahead), then finds the cached ones without rebuilding."""
    tools = llamacpp.build_tools(quiet=True)
    for name in ("llama-server", "llama-quantize"):
        path = Path(tools[name])
        assert path.is_file() and os.access(path, os.X_OK)
    assert llamacpp.build_tools(quiet=True) == tools  # cached: the second call does nothing
    out = subprocess.run([tools["llama-server"], "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "version" in (out.stdout + out.stderr).lower()
    desc = llamacpp.describe()
    assert all(Path(desc[name]).is_file() for name in ("llama-server", "llama-quantize"))
