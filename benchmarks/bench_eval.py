"""Evaluation speed: an original-style loop vs ``atm-eval run`` (generate and loglik), same model.

Same GGUF, same threads, the same consecutive verify minutes of the default suite's dataset:

* Reference (the original's approach): the stock ``python -m llama_cpp.server`` over HTTP, one
  request per item, sequential, free-text answer (no constraint, ``max_tokens`` 128), a regex pulls
  the first ``{...}`` out of the text and ``json.loads`` it; an unparseable answer is asked again
  (up to 3 retries, as the original did) before counting as invalid.
* ``atm-eval run`` generate: the harness (``run_eval``) with grammar-constrained decoding, in process
  (concurrency 1), and through a ``llama-server`` engine with K slots when the binary is built.
* ``atm-eval run`` loglik: option log-probs on jointly tokenized answers, in process.

Figures: items/s of each, the ratios, and the harness's own overhead = (wall time of the prediction
loop - time spent inside the engine calls) / engine time, for the in-process runs (one call per item,
so the engine time is the sum of per-item latencies). Targets (issue 7): generate >= 10x reference,
loglik >= 3x generate, overhead <= 10%.

    OMP_NUM_THREADS=1 ATM_HOME=... python benchmarks/bench_eval.py [--model atm:q8] [--items 120]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from atm.runtime import free_port  # noqa: E402

JSON_RE = re.compile(r"\{.*?\}", re.S)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready")


def reference_loop(gguf: str, items: list[dict], threads: int, max_tokens: int = 128, retries: int = 3) -> dict:
    """One HTTP request per item to the stock llama-cpp-python server, regex parse, retries."""
    port = free_port()
    log = open(Path(tempfile.gettempdir()) / f"bench-eval-stock-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                             "--port", str(port), "--n_threads", str(threads),
                             # the same threads for prompt processing as atm-eval (its default would
                             # be every core, which made the reference's prompts faster than ATM's)
                             "--n_threads_batch", str(threads), "--n_ctx", "4096"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
        client = httpx.Client(timeout=120)
        valid = requests = 0
        labels_ok = 0
        t0 = time.perf_counter()
        for it in items:
            advice = None
            for _attempt in range(1 + retries):  # first try + retries on an unparseable answer
                requests += 1
                r = client.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                json={"messages": it["prompt"], "max_tokens": max_tokens, "temperature": 0.0})
                text = r.json()["choices"][0]["message"]["content"] or ""
                m = JSON_RE.search(text)
                if m:
                    try:
                        obj = json.loads(m.group(0))
                        advice = obj.get("advice")
                        break
                    except json.JSONDecodeError:
                        pass
            valid += advice in ("BUY", "NOOP", "SELL")
            labels_ok += advice == it["_label"]
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
    return {"wall_s": wall, "items_per_s": len(items) / wall, "requests": requests, "valid": valid,
            "accuracy": labels_ok / len(items)}


def atm_run(spec: str, data: str, limit: int, offset_items: list[str], mode: str, concurrency: int,
            threads: int) -> dict:
    from atm.eval.harness import load_suite, run_eval
    from atm.eval.rundir import read_results

    out = Path(tempfile.mkdtemp(prefix=f"bench-eval-{mode}-{concurrency}-"))
    suite = load_suite(None, ["metrics.n_boot=10", f"generation.threads={threads}"])
    try:
        m = run_eval([spec], suite, out, data=data, limit=limit, mode=mode, concurrency=concurrency,
                     with_baselines=False, quiet=True)
        man = json.loads((out / "manifest.json").read_text())
        entry = man["models"][spec]
        recs = list(read_results(out / entry["file"]).values())
        wall = float(entry["wall_s_last"])
        engine = sum(float(r["latency"]) for r in recs)
        res = m["models"][spec]
        return {"wall_s": wall, "items_per_s": len(recs) / wall, "engine_s": engine,
                "overhead": (wall - engine) / engine if engine else None, "valid": res["validity"]["valid"],
                "accuracy": res["accuracy"], "engine": entry["describe"].get("engine"), "note": entry.get("note")}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="atm:q8")
    ap.add_argument("--items", type=int, default=120, help="consecutive verify minutes per run")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1))
    ap.add_argument("--concurrency", type=int, default=4, help="llama-server slots for the engine run")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("ATM_NO_PROGRESS", "1")

    from atm.eval.harness import ensure_dataset, load_items, load_suite, model_items, select_items
    from atm.export.llamacpp import find_tool
    from atm.export.registry import Registry

    entry = Registry().resolve(args.model)
    suite = load_suite(None)
    data = ensure_dataset(suite)
    df = select_items(load_items(data, "verify"), suite, args.items)
    items = model_items(df)
    for it, lab in zip(items, df["label"]):
        it["_label"] = lab
    print(f"model {entry.ref} ({entry.path}, {entry.size / 1e6:.1f} MB), {len(items)} items, {args.threads} thread(s)")

    runs = {}
    runs["reference"] = reference_loop(entry.path, items, args.threads)
    print("reference", runs["reference"])
    # the original loop at its best: one request, just enough tokens for a valid answer, no retries
    runs["reference_best_case"] = reference_loop(entry.path, items, args.threads, max_tokens=32, retries=0)
    print("reference best case", runs["reference_best_case"])
    runs["generate"] = atm_run(args.model, str(data), args.items, [], "generate", 1, args.threads)
    print("atm generate (in process)", runs["generate"])
    runs["loglik"] = atm_run(args.model, str(data), args.items, [], "loglik", 1, args.threads)
    print("atm loglik (in process)", runs["loglik"])
    if find_tool("llama-server") is not None:
        runs["generate_server"] = atm_run(args.model, str(data), args.items, [], "generate", args.concurrency,
                                          args.threads)
        print(f"atm generate (llama-server x{args.concurrency})", runs["generate_server"])

    ref = runs["reference"]["items_per_s"]
    best_gen_key = max((k for k in runs if k.startswith("generate")), key=lambda k: runs[k]["items_per_s"])
    gen = runs[best_gen_key]["items_per_s"]
    gen_inproc = runs["generate"]["items_per_s"]
    ll = runs["loglik"]["items_per_s"]
    overhead = max(runs["generate"]["overhead"], runs["loglik"]["overhead"])
    figures = [
        {"name": "reference loop (stock llama_cpp.server, sequential, free text + regex, retries)",
         "value": round(ref, 3), "unit": "items/s"},
        {"name": "reference requests per item (retries on unparseable text)",
         "value": round(runs["reference"]["requests"] / len(items), 3), "unit": "requests/item"},
        {"name": "atm-eval generate, in process (grammar, prefix cache)", "value": round(gen_inproc, 3), "unit": "items/s"},
        {"name": "atm-eval loglik, in process", "value": round(ll, 3), "unit": "items/s"},
        {"name": f"atm-eval generate, best ({best_gen_key})", "value": round(gen, 3), "unit": "items/s"},
        {"name": "reference best case (1 request of <= 32 tokens per item, no retries)",
         "value": round(runs["reference_best_case"]["items_per_s"], 3), "unit": "items/s"},
        {"name": "generate / reference", "value": round(gen / ref, 2), "unit": "x"},
        {"name": "generate / reference best case",
         "value": round(gen / runs["reference_best_case"]["items_per_s"], 2), "unit": "x"},
        {"name": "loglik / reference", "value": round(ll / ref, 2), "unit": "x"},
        {"name": "loglik / generate (both in process)", "value": round(ll / gen_inproc, 2), "unit": "x"},
        {"name": "harness overhead vs engine time (generate, in process)",
         "value": round(100 * runs["generate"]["overhead"], 2), "unit": "%"},
        {"name": "harness overhead vs engine time (loglik, in process)",
         "value": round(100 * runs["loglik"]["overhead"], 2), "unit": "%"},
        {"name": "valid answers: reference / generate / loglik",
         "value": f"{runs['reference']['valid']}/{runs['generate']['valid']}/{runs['loglik']['valid']} of {len(items)}",
         "unit": ""},
    ]
    if "generate_server" in runs:
        figures.insert(4, {"name": f"atm-eval generate, llama-server x{args.concurrency}",
                           "value": round(runs["generate_server"]["items_per_s"], 3), "unit": "items/s"})
    targets = [
        {"name": "generate >= 10x the reference", "target": ">= 10x", "met": gen / ref >= 10},
        {"name": "loglik >= 3x generate", "target": ">= 3x", "met": ll / gen_inproc >= 3},
        {"name": "harness overhead <= 10% of engine time", "target": "<= 10%", "met": overhead <= 0.10},
    ]
    for f in figures:
        print(f"{f['name']}: {f['value']} {f['unit']}")
    for t in targets:
        print(f"target {t['name']}: {'met' if t['met'] else 'NOT met'}")
    notes = (f"Model {entry.ref}: {entry.quant}, {entry.size / 1e6:.1f} MB (the tiny test model unless another "
             f"is named), {args.threads} thread(s), {len(items)} consecutive verify minutes of the default suite, "
             "each run a fresh engine. The answer format puts predicted_open_change before advice, so loglik "
             "decodes the ~11 change tokens greedily before scoring the three options; an advice-first format "
             "would need no decoding at all. With a tiny model the per-token cost is small and prompt processing "
             "dominates, which limits every ratio here; larger models make decoding (and so grammar-free "
             "retries and free text) costlier. Runs: " + json.dumps(runs, default=str))
    if not args.no_write:
        write_result("eval", "Evaluation: original-style loop vs atm-eval (generate, loglik)", figures, targets, notes)


if __name__ == "__main__":
    main()
