"""Serving speed: stock ``python -m llama_cpp.server`` vs bare ``llama-server`` vs ``atm serve``.

Same GGUF, same threads, each server alone on the machine, servers interleaved across rounds
(round 1: stock, bare, atm; round 2 reversed) so drift in machine load hits all of them alike.
Two workloads, each at concurrency 1, 4 and 8 (a thread per client, OpenAI chat API):

(a) unique prompts: every prompt differs from its first token (no prefix-cache reuse), as long
    in tokens as the advice prompts, so the figure is raw prompt processing + decoding with batching;
(b) the real advice workload: the model's own template rendered over consecutive minutes of real
    klines (shared system/instruction prefix, different market context), decoded under the
    model's answer schema; valid-JSON rate by ``atm.prompting.advice.parse_advice``.

Model: by default a ~250M-parameter Llama built from config with random weights (nothing can be
downloaded here) and the tiny tokenizer, Q8_0: serving effects (batched decoding, prefix reuse)
only show with a model whose forward pass costs something; the 5M demo model measures per-request
overheads. Answers under the schema are valid JSON whatever the weights.

Figures: requests/s, generated tokens/s, p50/p99 latency, valid-JSON rate per cell. Targets
(issue 6): atm serve >= 1.4x stock at 8 clients on (a), >= 3x on (b), and within 5% of bare
llama-server (the API layer costs nothing that matters). Results: benchmarks/results/serve.json.

    python benchmarks/bench_serve.py                 # bench:q8, the ~250M benchmark model
    python benchmarks/bench_serve.py --model atm:q8  # the registry's model (the 5M demo model)
    python benchmarks/bench_serve.py --model atm:q4 --requests 32 --rounds 2
    python benchmarks/bench_serve.py --gguf x.gguf --template prompts/seed.yaml --klines k.parquet
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from atm.runtime import free_port, llama_server  # noqa: E402
from atm.serve.testing import ServerProcess  # noqa: E402

UBATCH = 2048  # physical batch for all three servers (atm serve's default)
WORDS = ("market open close volume trend price minute buy sell hold signal range spread bid ask "
         "depth order book candle wick body momentum mean revert breakout support resistance").split()


def unique_prompts(n: int, tokens: int, seed: int, count) -> list[list[dict]]:
    """``n`` prompts of about ``tokens`` tokens each (``count(text)`` = the model's token count),
    every one different from its first token."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = f"{rng.randrange(10**9)} {i}"
        while count(text) < tokens:
            text += " " + " ".join(rng.choice(WORDS) for _ in range(8))
        out.append([{"role": "user", "content": text}])
    return out


class Vocab:
    """The GGUF's tokenizer (vocab only, no weights): token counts and the ids to ban in (a)."""

    def __init__(self, gguf: Path):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)

    def count(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def banned(self) -> dict[str, float]:
        """Byte-fallback pieces and end-of-sequence: a random-weight model picks them freely, and
        the stock server then keeps generating past ``max_tokens`` on broken UTF-8 (or stops early
        at eos); with them banned every server generates exactly ``max_tokens`` tokens of text."""
        m = self.llm._model
        ids = [i for i in range(self.llm.n_vocab()) if re.fullmatch(rb"<0x[0-9A-Fa-f]{2}>", m.token_get_text(i).encode())]
        ids.append(self.llm.token_eos())
        return {str(i): -100.0 for i in ids}


def advice_prompts(template, klines: Path, n: int, start: int) -> list[list[dict]]:
    import numpy as np

    from atm.market.klines import read_klines_parquet
    from atm.prompting.encoders import get_encoder

    df = read_klines_parquet(klines)
    enc_name = template.spec.encoder or "seed-json"
    enc = get_encoder(enc_name, **template.spec.encoder_config)
    rows = np.arange(max(start, enc.lookback), max(start, enc.lookback) + n)
    feats = enc.compute_features(df) if getattr(enc, "needs_features", False) else None
    return [template.render(c) for c in enc.encode(df, rows, feats)]


def run_cell(url: str, model: str, prompts: list[list[dict]], conc: int, max_tokens: int,
             schema: dict | None, stock: bool, extra: dict | None = None) -> dict:
    from atm.prompting.advice import parse_advice

    lat: list[float] = []
    toks = [0]
    valid = [0]
    errors: list[str] = []
    lock = threading.Lock()
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "c"):
            local.c = httpx.Client(base_url=url, timeout=300, trust_env=False)
        return local.c

    def one(msgs):
        body = {"model": model, "messages": msgs, "max_tokens": max_tokens, "temperature": 0.0, **(extra or {})}
        if schema is not None:
            # stock llama_cpp.server ignores json_schema; it takes json_object + schema
            body["response_format"] = ({"type": "json_object", "schema": schema} if stock else
                                       {"type": "json_schema", "json_schema": {"name": "advice", "schema": schema}})
        t0 = time.perf_counter()
        try:
            r = client().post("/v1/chat/completions", json=body)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                with lock:
                    errors.append(f"{r.status_code}: {r.text[:120]}")
                return
            d = r.json()
            text = d["choices"][0]["message"]["content"] or ""
            with lock:
                lat.append(dt)
                toks[0] += int((d.get("usage") or {}).get("completion_tokens") or 0)
                valid[0] += bool(parse_advice(text).valid) if schema is not None else 0
        except httpx.HTTPError as exc:
            with lock:
                errors.append(repr(exc))

    # warm-up: one request per client at once (model paged in, every slot it will use has seen
    # the workload's shared prefix, as in steady state), not timed
    with ThreadPoolExecutor(conc) as pool:
        list(pool.map(one, prompts[:conc]))
    lat.clear()
    errors.clear()
    toks[0] = valid[0] = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        list(pool.map(one, prompts[conc:]))
    wall = time.perf_counter() - t0
    n = len(lat)
    q = statistics.quantiles(lat, n=100, method="inclusive") if n >= 2 else [lat[0] if lat else 0.0] * 99
    return {"requests": n, "errors": len(errors), "wall_s": wall, "req_s": n / wall if wall else 0.0,
            "gen_tok_s": toks[0] / wall if wall else 0.0, "p50_ms": 1000 * statistics.median(lat) if lat else None,
            "p99_ms": 1000 * q[98] if lat else None,
            "valid_json": (valid[0] / n if n else 0.0) if schema is not None else None,
            "error_samples": errors[:3]}


def start_server(kind: str, gguf: Path, name: str, parallel: int, ctx: int, threads: int, log_dir: Path,
                 env: dict) -> ServerProcess:
    from atm.export.llamacpp import require_tool

    port = free_port()
    log = log_dir / f"{kind}-{port}.log"
    if kind == "stock":
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(ctx * parallel), "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--model_alias", name,
               "--n_batch", str(UBATCH), "--n_ubatch", str(UBATCH)]  # the same batch as llama-server
        return ServerProcess([], port, env=env, log=log, cmd=cmd, health="/v1/models")
    if kind == "bare":  # the command line atm serve runs its engine with (atm.runtime.llama_server)
        cmd = llama_server.command(gguf, port=port, alias=name, parallel=parallel, ctx_size=ctx, threads=threads,
                                   ubatch_size=UBATCH, exe=require_tool("llama-server"))
        return ServerProcess([], port, env=env, log=log, cmd=cmd, health="/health")
    args = ["--model", f"{name}={gguf}", "--parallel", str(parallel), "--ctx-size", str(ctx),
            "--set", f"threads={threads}", "--set", f"log_dir={log_dir}", "--set", f"ubatch_size={UBATCH}"]
    return ServerProcess(args, port, env=env, log=log)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench:q8", help="bench:q8 / bench:q4 (the ~250M benchmark model, "
                    "built from config and cached on first use), or a registry name such as atm:q8 (uses "
                    "its GGUF and template)")
    ap.add_argument("--gguf", default=None, help="a GGUF file instead of a registry model")
    ap.add_argument("--template", default=None, help="prompt template YAML (with --gguf)")
    ap.add_argument("--klines", default=None, help="klines parquet for the advice workload "
                    "(default: built from the shipped BTCUSDT sample)")
    ap.add_argument("--requests", type=int, default=24, help="timed requests per cell (after one "
                    "warm-up request per client)")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (order reversed each round)")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per answer in workload (a)")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="tokens per unique prompt in workload "
                    "(a) (default: the advice prompts' mean, so (a) and (b) differ only in what they share)")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads per server (default: all cores, as a dedicated server runs; the same "
                    "for all three servers)")
    ap.add_argument("--servers", default="stock,bare,atm")
    ap.add_argument("--workloads", default="unique,advice", help="which of unique,advice to run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    ap.add_argument("--note", default="", help="a sentence appended to the notes (context of the run)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.workloads.split(",")) - {"unique", "advice"})
    if unknown:
        ap.error(f"--workloads: unknown {', '.join(unknown)} (choose from unique, advice)")

    import tempfile

    from atm.prompting.template import Template

    if args.gguf or args.model.startswith("bench:"):
        if args.gguf:
            gguf, name = Path(args.gguf), "bench"
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from common import BENCH_MODEL_SHAPE, bench_model

            gguf, name = bench_model(args.model.split(":", 1)[1]), args.model
        template = Template.load(args.template or "seed")
        schema = template.schema()
        model_desc = f"{gguf.name} ({gguf.stat().st_size / 2**20:.1f} MiB)"
        if not args.gguf:
            model_desc = (f"{name}: a ~250M Llama built from config with random weights "
                          f"({json.dumps(BENCH_MODEL_SHAPE)}, the tiny tokenizer), {model_desc}")
    else:
        from atm.export.registry import Registry

        entry = Registry().resolve(args.model)
        gguf, name = entry.file, args.model
        template = entry.template_obj() or Template.load("seed")
        schema = entry.schema or template.schema()
        model_desc = f"{entry.ref} ({entry.quant}, {entry.size / 2**20:.1f} MiB, sha256 {entry.sha256[:12]})"
    work = Path(tempfile.mkdtemp(prefix="atm-bench-serve-"))
    klines = Path(args.klines) if args.klines else None
    if klines is None:
        from atm.market.klines import build_klines

        klines = work / "btcusdt.parquet"
        build_klines(ROOT / "datasets" / "samples" / "binance", "BTCUSDT", interval="1m", out=klines)
    concs = [int(c) for c in args.concurrency.split(",")]
    n = args.requests + max(concs)  # per cell: warm-up (one per client) + timed
    servers = args.servers.split(",")
    vocab = Vocab(gguf)
    advice = advice_prompts(template, klines, n * len(concs) * args.rounds, 2000)
    advice_tokens = statistics.mean(sum(vocab.count(m["content"]) for m in p) for p in advice[:50])
    prompt_tokens = args.prompt_tokens or int(advice_tokens)
    flat = [vocab.llm.tokenize("\n".join(m["content"] for m in p).encode(), add_bos=False, special=False)
            for p in advice[:50]]
    shared = statistics.mean(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                             for a, b in zip(flat, flat[1:]))
    unique = unique_prompts(n * len(concs) * args.rounds, prompt_tokens, 0, vocab.count)
    # (workload: prompts, max_tokens, schema, extra request fields)
    workloads = {"unique": (unique, args.max_tokens, None, {"logit_bias": vocab.banned()}),
                 "advice": (advice, 64, schema, None)}
    workloads = {w: workloads[w] for w in args.workloads.split(",")}
    env = {"OMP_NUM_THREADS": "1"}
    results: dict[str, dict[str, dict[int, list[dict]]]] = {s: {w: {c: [] for c in concs} for w in workloads} for s in servers}
    t_start = time.time()
    for rnd in range(args.rounds):
        order = servers if rnd % 2 == 0 else servers[::-1]
        for kind in order:
            srv = start_server(kind, gguf, name, args.parallel, args.ctx, args.threads, work, env)
            try:
                srv.wait_ready(300)
                for wname, (prompts, max_tokens, sch, extra) in workloads.items():
                    for ci, c in enumerate(concs):
                        # fresh prompts per (round, concurrency): nothing is served from a cache of
                        # an earlier cell; every server gets the very same prompts
                        k = (rnd * len(concs) + ci) * n
                        cell = run_cell(srv.url, name, prompts[k:k + args.requests + c], c, max_tokens, sch,
                                        kind == "stock", extra)
                        results[kind][wname][c].append(cell)
                        print(f"round {rnd + 1} {kind:5s} {wname:6s} c={c}: {cell['req_s']:.2f} req/s "
                              f"{cell['gen_tok_s']:.0f} tok/s p50 {cell['p50_ms'] or 0:.0f} ms "
                              f"p99 {cell['p99_ms'] or 0:.0f} ms errors {cell['errors']}"
                              + (f" valid {cell['valid_json']:.0%}" if cell['valid_json'] is not None else ""),
                              flush=True)
            finally:
                srv.stop()

    def mean(kind, w, c, key):
        vals = [r[key] for r in results[kind][w][c] if r[key] is not None]
        return statistics.mean(vals) if vals else None

    figures = []
    for kind in servers:
        for w in workloads:
            for c in concs:
                label = f"{kind} {w} c={c}"
                figures += [{"name": f"{label} requests/s", "value": round(mean(kind, w, c, "req_s"), 3), "unit": "req/s"},
                            {"name": f"{label} generated tokens/s", "value": round(mean(kind, w, c, "gen_tok_s"), 1), "unit": "tok/s"},
                            {"name": f"{label} p50 latency", "value": round(mean(kind, w, c, "p50_ms") or 0, 1), "unit": "ms"},
                            {"name": f"{label} p99 latency", "value": round(mean(kind, w, c, "p99_ms") or 0, 1), "unit": "ms"},
                            {"name": f"{label} errors", "value": sum(r["errors"] for r in results[kind][w][c]), "unit": "requests"}]
                if w == "advice":
                    figures.append({"name": f"{label} valid JSON", "value": round(100 * (mean(kind, w, c, "valid_json") or 0), 1), "unit": "%"})
    targets = []
    top = max(concs)

    def ratio(a, b, w):
        x, y = mean(a, w, top, "req_s"), mean(b, w, top, "req_s")
        return (x / y) if x and y else None

    if "atm" in servers and "stock" in servers:
        for w, goal in (("unique", 1.4), ("advice", 3.0)):
            if w not in workloads:
                continue
            r = ratio("atm", "stock", w)
            figures.append({"name": f"atm / stock requests/s, {w}, c={top}", "value": round(r or 0, 3), "unit": "x"})
            targets.append({"name": f"atm serve >= {goal}x stock llama_cpp.server at {top} clients ({w})",
                            "target": goal, "met": bool(r and r >= goal)})
    if "atm" in servers and "bare" in servers:
        for w in workloads:
            r = ratio("atm", "bare", w)
            figures.append({"name": f"atm / bare llama-server requests/s, {w}, c={top}", "value": round(r or 0, 3), "unit": "x"})
            targets.append({"name": f"atm serve within 5% of bare llama-server at {top} clients ({w})",
                            "target": 0.95, "met": bool(r and r >= 0.95)})
    out = {
        "title": "Serving: atm serve vs bare llama-server vs stock llama_cpp.server",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "figures": figures, "targets": targets,
        "notes": (f"model {model_desc}; {args.requests} timed requests per cell after one warm-up request per "
                  f"client, mean of "
                  f"{args.rounds} interleaved rounds; {args.threads} threads per server; llama-server -np "
                  f"{args.parallel} -c {args.parallel}x{args.ctx}; (a) unique prompts of ~{prompt_tokens} tokens "
                  f"(the advice prompts' mean is {advice_tokens:.0f}), exactly {args.max_tokens} new tokens (byte pieces "
                  f"and eos banned by logit_bias), temperature 0; (b) the model's template over real BTCUSDT "
                  f"minutes, 64 new tokens max under its answer schema (stock server: json_object+schema); "
                  f"consecutive advice prompts share their first {shared:.0f} tokens (the rest is the "
                  "minute's market context), and the stock server also reuses what a request shares with "
                  "the one before it, so on CPU (b) gains little over (a) for any server. "
                  f"Took {time.time() - t_start:.0f} s. A shared or loaded machine moves absolute numbers; "
                  "ratios come from the same run." + (f" {args.note}" if args.note else "")),
        "raw": results,
    }
    from atm.utils import write_json_atomic

    write_json_atomic(args.out, out)
    print(json.dumps({"targets": targets, "ratios": [f for f in figures if f["unit"] == "x"]}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
