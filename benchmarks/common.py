"""Helpers shared by the benchmark scripts: machine description and the results JSON writer."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import RESULTS, machine  # noqa: E402


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
