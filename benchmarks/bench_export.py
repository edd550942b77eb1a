"""Export: what GGUF conversion and quantization cost, in time and in answers.

In one run, on a merged model (``--model DIR``; default: the tiny pipeline on the shipped BTCUSDT
sample, built in a temp dir through the same public APIs as tests/conftest.py: klines -> dataset
-> tiny base -> 30 SFT steps -> merge):

* time: F16 conversion (llama.cpp's converter), Q8_0 and Q4_K_M quantization through the Python
  binding and, when built, through the ``llama-quantize`` binary;
* fidelity per tag (``atm export check`` on ``--n`` verify prompts): schema-valid rate under
  constrained decoding, advice agreement with the HF model, top-1 next-token agreement, logprob
  delta;
* the reference is the original experiment's serving: the same GGUF, greedy and *unconstrained*
  (parsed afterwards with the one strict parser). Its valid rate beside ATM's constrained one is
  the figure that explains "the Q4 model refused to follow the instructions".

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_export.py [--n 100] [--model runs/X-merged]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("ATM_NO_PROGRESS", "1")


def tiny_pipeline(tmp: Path) -> Path:
    from atm.finetune.base import TinyBaseConfig, build_tiny_base
    from atm.finetune.merge import merge
    from atm.finetune.train import train
    from atm.market.klines import build_klines
    from atm.prompting.dataset import BuildConfig, build_dataset

    pq = tmp / "btcusdt.parquet"
    build_klines(ROOT / "datasets" / "samples" / "binance", "BTCUSDT", interval="1m", out=pq)
    ds = build_dataset(BuildConfig(klines=str(pq), encoder="seed-json", template=str(ROOT / "prompts" / "seed.yaml"),
                                   label="seed", pairs="random", out=str(tmp / "datasets" / "btc-seed")))
    base = build_tiny_base(ds, tmp / "base-tiny", TinyBaseConfig())
    run = train("sft", ROOT / "finetune" / "tiny-cpu.yaml", overrides=[
        f"model={base}", f"data={ds}", f"output_dir={tmp / 'sft'}", "max_steps=30"])
    return merge(run, tmp / "sft-merged")


def unconstrained_valid_rate(entry, ref, max_tokens: int, threads: int) -> float:
    """The reference: greedy generation with no grammar, parsed with the strict parser."""
    import llama_cpp

    from atm.export.gguf import quiet_stderr
    from atm.prompting.advice import parse_advice

    n_ctx = max(len(r["ids"]) for r in ref) + max_tokens + 16
    with quiet_stderr():
        llm = llama_cpp.Llama(model_path=entry.path, n_ctx=n_ctx, verbose=False, seed=0, n_threads=threads)
    ok = 0
    for r in ref:
        text = llm.create_completion(prompt=r["ids"], max_tokens=max_tokens, temperature=0.0, seed=0)["choices"][0]["text"]
        ok += parse_advice(text).valid
    del llm
    return ok / len(ref)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="merged HF model dir (default: build the tiny pipeline)")
    ap.add_argument("--n", type=int, default=100, help="verify prompts for the fidelity figures")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from atm.export import check, llamacpp
    from atm.export.gguf import QUANTS, export_gguf, quantize

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmpd:
        tmp = Path(tmpd)
        t0 = time.time()
        model = Path(args.model) if args.model else tiny_pipeline(tmp)
        build_s = time.time() - t0
        home = tmp / "home"
        t0 = time.time()
        entries = export_gguf(model, name="bench", quants=("q8_0", "q4_k_m"), home=home,
                              threads=args.threads, quantize_tool=None)
        export_s = time.time() - t0
        timings = entries[0].provenance["timings"]
        f16 = entries[0]
        q_times: dict[str, dict[str, float]] = {"python": {}, "binary": {}}
        for q in ("q8_0", "q4_k_m"):
            q_times["python"][q] = timings[f"quantize_{q}_s"]
        binary = llamacpp.find_tool("llama-quantize")
        if binary is not None:
            for q in ("q8_0", "q4_k_m"):
                q_times["binary"][q] = quantize(f16.path, tmp / f"bin-{q}.gguf", QUANTS[q], threads=args.threads,
                                                tool=str(binary))["seconds"]
        rep = check.fidelity_check("bench", n=args.n, home=home, threads=args.threads, out=tmp / "fid.json")
        # token ids of the same prompts (the HF tokenizer's rendering), for the unconstrained reference
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model))
        ref = [{"ids": tok(tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]}
               for p in check.load_verify_prompts(rep["data"], args.n)]
        unconstrained = {e.tag: unconstrained_valid_rate(e, ref, 64, args.threads) for e in entries}

    figures = [
        {"name": "F16 conversion (convert_hf_to_gguf.py)", "value": round(timings["convert_f16_s"], 2), "unit": "s"},
        {"name": "whole export (convert + Q8_0 + Q4_K_M + checks)", "value": round(export_s, 2), "unit": "s"},
    ]
    for engine, vals in q_times.items():
        for q, v in vals.items():
            figures.append({"name": f"quantize {q.upper()} ({'llama_cpp binding' if engine == 'python' else 'llama-quantize'})",
                            "value": round(v, 2), "unit": "s"})
    targets = []
    for e in entries:
        fig = rep["tags"][e.ref]
        figures += [
            {"name": f"{e.tag}: size", "value": fig["size_mb"], "unit": "MiB"},
            {"name": f"{e.tag}: schema-valid, constrained (ATM)", "value": round(fig["valid_rate"], 4), "unit": "share"},
            {"name": f"{e.tag}: schema-valid, unconstrained (original serving)", "value": round(unconstrained[e.tag], 4), "unit": "share"},
            {"name": f"{e.tag}: advice agreement with HF", "value": None if fig["advice_agreement_hf"] is None else round(fig["advice_agreement_hf"], 4), "unit": "share"},
            {"name": f"{e.tag}: top-1 next-token agreement with HF", "value": round(fig["top1_agreement"], 4), "unit": "share"},
            {"name": f"{e.tag}: mean logprob delta vs HF", "value": None if fig["logprob_delta"] is None else round(fig["logprob_delta"], 5), "unit": "nats/token"},
        ]
        targets.append({"name": f"{e.tag}: 100% schema-valid answers under constrained decoding",
                        "target": "1.0", "met": fig["valid_rate"] == 1.0})
    fig_q8 = rep["tags"]["bench:q8"]
    targets.append({"name": "q8: top-1 next-token agreement with HF >= 0.95", "target": ">= 0.95",
                    "met": fig_q8["top1_agreement"] >= 0.95})
    targets.append({"name": "tokenization identical to HF on 50 prompts", "target": "1.0",
                    "met": bool(entries[0].tokenizer_check and entries[0].tokenizer_check["match_rate"] == 1.0)})
    hf = rep["hf"]
    notes = (f"{rep['n']} verify prompts of the {'given' if args.model else 'tiny (30 SFT steps)'} model; HF reference: "
             f"greedy under the template's answer format (valid {hf['valid_rate']:.3f}), GGUF: greedy under the "
             f"schema grammar. Same token ids fed to HF and every GGUF; "
             f"threads={args.threads}. Pipeline build {build_s:.0f} s (not part of the figures). "
             "Unconstrained = the original experiment's serving (no grammar, parse afterwards).")
    for f in figures:
        print(f"{f['name']:<60} {f['value']} {f['unit']}")
    for e in entries:  # the ratio against the reference measured in this run
        ref_rate = unconstrained[e.tag]
        ratio = rep["tags"][e.ref]["valid_rate"] / ref_rate if ref_rate else float("inf")
        print(f"{e.tag}: valid answers, ATM constrained vs original unconstrained: {ratio:.2f}x")
    if q_times["binary"]:
        for q in ("q8_0", "q4_k_m"):
            print(f"quantize {q}: llama_cpp binding / llama-quantize time: "
                  f"{q_times['python'][q] / max(q_times['binary'][q], 1e-9):.2f}x")
    for t in targets:
        print(f"target {t['name']}: {'met' if t['met'] else 'NOT met'}")
    write_result("export", "Export: GGUF conversion, quantization and fidelity", figures, targets, notes)


if __name__ == "__main__":
    main()
