"""Prompt + preference-pair building: ATM's build_dataset vs a reference that works like the original.

350,000 synthetic minutes (a random walk with BTC-like 2-decimal prices, volumes and trade counts)
are written as a klines parquet. Then, in the same run:

* ATM: ``atm.prompting.dataset.build_dataset`` with the ``seed-json-compat`` encoder and the
  ``seed-compat`` template without its served examples (the original's zero-shot training prompt),
  seed labels, random pairs: reading the parquet, labels, realized returns, splits, contexts,
  rendering, pairs, writing the preference parquet and the card (and, for a second figure, all four
  views). Each run is a child process so its peak RSS is its own; it streams in chunks of 50,000
  minutes.
* Reference (the original's approach): the klines in an SQLite table; per minute one SELECT of
  the previous 10 rows (and the current row for the label), ``json.dumps`` of the context, the
  prompt string, the chosen and a random rejected answer, appended to a list and written as JSON
  lines. It is timed on a contiguous subsample (``--ref-rows``, default 20,000 minutes) and its
  rate extrapolated to 350,000 (per-minute cost is constant: one indexed SELECT per minute).

Both produce the same context text for every minute; that is checked on the subsample.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_prompts.py [--rows 350000] [--ref-rows 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = ("Analyse the following exchange data, predict the next minute's change and advise. Respond in a "
               "JSON object with 2 properties: predicted_open_change (8 decimals precision), and advice "
               "(BUY, NOOP or SELL)")


def synthetic_klines(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-01-01", tz="UTC")
    open_time = pd.date_range(start, periods=n, freq="1min")
    ret = rng.normal(0, 0.0006, n)
    close = np.round(30000 * np.exp(np.cumsum(ret)), 2)
    open_ = np.round(np.r_[30000.0, close[:-1]], 2)
    spread = np.abs(rng.normal(0, 0.0004, n)) * close
    high = np.round(np.maximum(open_, close) + spread, 2)
    low = np.round(np.minimum(open_, close) - spread, 2)
    volume = np.round(rng.lognormal(2.5, 0.8, n), 5)
    count = rng.integers(50, 5000, n).astype(np.int64)
    taker = np.round(volume * rng.uniform(0, 1, n), 5)
    return pd.DataFrame({
        "open_time": open_time, "open": open_, "high": high, "low": low, "close": close, "volume": volume,
        "close_time": open_time + pd.Timedelta(seconds=59.999), "quote_volume": np.round(volume * close, 4),
        "count": count, "taker_buy_volume": taker, "taker_buy_quote_volume": np.round(taker * close, 4)})


# ------------------------------------------------------------------------------ the reference
def reference_build(db: sqlite3.Connection, first: int, last: int, out: Path, seed: int = 0) -> list[str]:
    """The original approach: one SELECT per minute, json.dumps per row. Returns the contexts."""
    rng = random.Random(seed)
    system = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.")
    records, contexts = [], []
    cur = db.cursor()
    for t in range(first, last):
        rows = cur.execute("SELECT open, high, low, volume, count FROM klines WHERE i <= ? AND i >= ? "
                           "ORDER BY i DESC LIMIT 11", (t, t - 10)).fetchall()
        now, prev = rows[0], rows[1:]  # prev: t-1 .. t-10 (newest first)
        opens = [r[0] for r in prev]
        ctx = json.dumps({"open_changes": ["%.8f" % (opens[i + 1] - opens[i]) for i in range(9)],
                          "prev_volumes": ["%.8f" % r[3] for r in prev[1:]],
                          "prev_trade_counts": ["%.8f" % r[4] for r in prev[1:]]})
        if now[1] > 1.002 * prev[-1][1]:
            label = "BUY"
        elif now[2] < 0.998 * prev[-1][2]:
            label = "SELL"
        else:
            label = "NOOP"
        rejected = rng.choice([a for a in ("BUY", "NOOP", "SELL") if a != label])
        change = "%.8f" % (now[0] - prev[-1][0])
        prompt = f"{system}\n\n### Instruction:\n{INSTRUCTION}\n\n### Input:\n{ctx}\n\n### Response:\n"
        records.append({"prompt": prompt,
                        "chosen": json.dumps({"predicted_open_change": change, "advice": label}),
                        "rejected": json.dumps({"predicted_open_change": "0.00000000", "advice": rejected})})
        contexts.append(ctx)
    with open(out, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return contexts


# ------------------------------------------------------------------------------ ATM (child process)
def child(klines: str, out: str, chunk_rows: int, views: str, template: str) -> None:
    os.environ["ATM_NO_PROGRESS"] = "1"
    t0 = time.perf_counter()
    import pyarrow as pa
    import pyarrow.compute as pc

    from atm.prompting.dataset import BuildConfig, build_dataset

    pc.cast(pa.array([1]), pa.string())  # pyarrow's one-time compute initialisation (~0.8 s here)
    t_import = time.perf_counter() - t0
    # token_families=[]: the card's token counting is a fixed cost (loading four tokenizers, ~2 s),
    # not a per-minute one; benchmarks/bench_tokens.py measures it
    cfg = BuildConfig(klines=klines, out=out, template=template, encoder="seed-json-compat", label="seed",
                      pairs="random", chunk_rows=chunk_rows, views=views.split(","), overwrite=True,
                      symbol="SYNTH", token_families=[])
    t1 = time.perf_counter()
    build_dataset(cfg)
    seconds = time.perf_counter() - t1
    core = core_rate(klines, template, chunk_rows) if views == "preference" else None
    info = json.loads((Path(out) / "dataset.json").read_text())
    print(json.dumps({"seconds": seconds, "import_seconds": t_import, "core_rows_per_s": core, "items": info["rows"]["items"],
                      "pairs": sum(s["pairs"] for s in info["splits"].values()),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def core_rate(klines: str, template: str, chunk_rows: int) -> float:
    """In memory only: contexts, user messages, chosen and rejected answers for every minute (the
    text of the pairs, as Arrow arrays), without labels, splits or parquet writing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from atm.market.klines import read_klines_parquet
    from atm.prompting.encoders import get_encoder
    from atm.prompting.template import Template

    df = read_klines_parquet(klines)
    enc, tpl = get_encoder("seed-json-compat"), Template.load(template)
    head, tail = tpl.user_parts()
    adv = pa.array(["BUY", "NOOP", "SELL"])
    rows = np.arange(enc.lookback, len(df))
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for c0 in range(0, len(rows), chunk_rows):
        r = rows[c0:c0 + chunk_rows]
        users = pc.binary_join_element_wise(head, enc.encode_arrow(df, r), tail, "")
        ch = enc.answer_changes_arrow(df, r)
        a = pa.array(rng.integers(0, 3, len(r)))
        chosen = tpl.answers_arrow(adv.take(a), ch)
        rejected = tpl.answers_arrow(adv.take(pa.array((a.to_numpy() + 1) % 3)), enc.rejected_changes_arrow(ch))
        assert len(users) == len(chosen) == len(rejected)
    return len(rows) / (time.perf_counter() - t0)


def run_child(klines: Path, out: Path, chunk_rows: int, views: str, template: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(klines), str(out), str(chunk_rows), views,
                           str(template)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=350_000)
    ap.add_argument("--ref-rows", type=int, default=20_000)
    ap.add_argument("--chunk-rows", type=int, default=50_000)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.child[3], args.child[4])
        return

    with tempfile.TemporaryDirectory(prefix="bench-prompts-") as tmp:
        tmp = Path(tmp)
        df = synthetic_klines(args.rows)
        klines = tmp / "klines.parquet"
        df.to_parquet(klines, index=False)

        # The original's training prompt: Alpaca preamble + instruction + its JSON context, zero-shot
        # (seed-compat.yaml without its 3 served examples), so both sides build the same text.
        import yaml

        spec = yaml.safe_load((ROOT / "prompts" / "seed-compat.yaml").read_text())
        spec.update(examples=[], fewshot={"k": 0})
        template = tmp / "seed-compat-0shot.yaml"
        template.write_text(yaml.safe_dump(spec))
        # ATM: the preference pairs (what the reference builds), at full size and at a tenth (memory),
        # then the whole dataset (all four views)
        atm = run_child(klines, tmp / "atm", args.chunk_rows, "preference", template)
        small_klines = tmp / "small.parquet"
        df.iloc[: args.rows // 10].to_parquet(small_klines, index=False)
        atm_small = run_child(small_klines, tmp / "atm-small", args.chunk_rows, "preference", template)
        atm_all = run_child(klines, tmp / "atm-all", args.chunk_rows, "preference,sft,rl,items", template)
        atm_rate = atm["items"] / atm["seconds"]
        all_rate = atm_all["items"] / atm_all["seconds"]

        # the reference on a contiguous subsample
        db = sqlite3.connect(tmp / "klines.sqlite")
        db.execute("CREATE TABLE klines (i INTEGER PRIMARY KEY, open REAL, high REAL, low REAL, volume REAL, "
                   "count INTEGER)")
        db.executemany("INSERT INTO klines VALUES (?, ?, ?, ?, ?, ?)",
                       zip(range(len(df)), df["open"].tolist(), df["high"].tolist(), df["low"].tolist(),
                           df["volume"].tolist(), df["count"].tolist()))
        db.commit()
        first = 100_000 if args.rows > 100_000 + args.ref_rows else 10
        last = min(first + args.ref_rows, args.rows)
        t0 = time.perf_counter()
        ref_contexts = reference_build(db, first, last, tmp / "ref.jsonl")
        ref_seconds = time.perf_counter() - t0
        ref_rate = (last - first) / ref_seconds

        # same text: ATM's compat contexts for those minutes equal the reference's
        import pyarrow.parquet as pq

        pref = pq.read_table(tmp / "atm" / "preference" / "data" / "train-00000-of-00001.parquet",
                             columns=["id", "prompt"]).to_pydict()
        user = {i: p[-1]["content"] for i, p in zip(pref["id"], pref["prompt"])}
        t0_ = df["open_time"].iloc[0]
        ids = {t: f"SYNTH-{(t0_ + pd.Timedelta(minutes=t)).strftime('%Y-%m-%dT%H:%M:%S')}" for t in range(first, last)}
        common = [t for t in range(first, last) if ids[t] in user]
        same = all(user[ids[t]].endswith("### Input:\n" + ref_contexts[t - first]) for t in common)
        if not same or not common:
            raise SystemExit("ATM's contexts differ from the reference's")

    ratio = atm_rate / ref_rate
    print(f"ATM build_dataset: {atm['items']:,} minutes ({atm['pairs']:,} pairs -> preference parquet) in "
          f"{atm['seconds']:.2f} s = {atm_rate:,.0f} rows/s, peak RSS {atm['peak_rss_mb']:.0f} MB "
          f"({atm_small['peak_rss_mb']:.0f} MB for {atm_small['items']:,} minutes)")
    print(f"reference (SQLite SELECT + json.dumps per minute): {last - first:,} minutes in {ref_seconds:.2f} s = "
          f"{ref_rate:,.0f} rows/s (extrapolated to {args.rows:,}: {args.rows / ref_rate:.1f} s)")
    print(f"ATM in memory (contexts + prompts + chosen/rejected answers, no labels/splits/parquet): "
          f"{atm['core_rows_per_s']:,.0f} rows/s = {atm['core_rows_per_s'] / ref_rate:,.0f}x the reference")
    print(f"ATM whole dataset (preference + sft + rl + items): {all_rate:,.0f} rows/s "
          f"({atm_all['seconds']:.2f} s, peak RSS {atm_all['peak_rss_mb']:.0f} MB)")
    print(f"ratio: {ratio:,.0f}x; contexts identical on {len(common):,} minutes")
    figures = [
        {"name": f"ATM build_dataset, {args.rows:,} minutes (prompts + pairs -> preference parquet)", "value": round(atm_rate), "unit": "rows/s"},
        {"name": "ATM wall time, preference pairs", "value": round(atm["seconds"], 2), "unit": "s"},
        {"name": "ATM in memory: contexts + prompts + chosen/rejected answers (no parquet)", "value": round(atm["core_rows_per_s"]), "unit": "rows/s"},
        {"name": "ATM whole dataset (preference + sft + rl + items parquet + card)", "value": round(all_rate), "unit": "rows/s"},
        {"name": f"reference rows/s (timed on {last - first:,} minutes, extrapolated)", "value": round(ref_rate), "unit": "rows/s"},
        {"name": f"reference time extrapolated to {args.rows:,} minutes", "value": round(args.rows / ref_rate, 1), "unit": "s"},
        {"name": "speed-up over the reference", "value": round(ratio, 1), "unit": "x"},
        {"name": f"ATM peak RSS, {args.rows:,} minutes", "value": round(atm["peak_rss_mb"]), "unit": "MB"},
        {"name": f"ATM peak RSS, {args.rows // 10:,} minutes", "value": round(atm_small["peak_rss_mb"]), "unit": "MB"},
    ]
    targets = [
        {"name": "speed-up over the original-style reference", "target": ">= 100x", "met": bool(ratio >= 100)},
        {"name": "rows per second", "target": ">= 100,000 rows/s", "met": bool(atm_rate >= 100_000)},
        {"name": "bounded memory: 10x the minutes costs < 2x the peak RSS", "target": "< 2x",
         "met": bool(atm["peak_rss_mb"] < 2 * atm_small["peak_rss_mb"])},
    ]
    notes = (f"Synthetic random-walk minutes. Both sides build the original's training prompt (Alpaca preamble, "
             f"the original instruction, its newest-first JSON context; ATM: encoder seed-json-compat, template "
             f"seed-compat without its 3 served examples), seed labels and random rejected advice; ATM's contexts "
             f"equal the reference's on {len(common):,} minutes. ATM's time covers reading the klines parquet, "
             f"labels, realized returns, splits, encoding, rendering, pairs, writing the preference parquet "
             f"(zstd) and the card, in chunks of {args.chunk_rows:,} minutes, in a child process (its own peak "
             f"RSS); imports and pyarrow's one-time compute initialisation are excluded "
             f"({atm['import_seconds']:.1f} s). The whole-dataset figure also writes the sft, rl and items views. "
             f"The reference was timed on {last - first:,} contiguous minutes and its rate extrapolated (one "
             f"indexed SELECT per minute: a constant cost per minute). The machine is shared: absolute rates "
             f"vary with load, the ratio (same run) much less.")
    write_result("prompts", f"Prompts + preference pairs: {args.rows:,} minutes, ATM vs an original-style "
                 "SQLite/json.dumps loop", figures, targets, notes)


if __name__ == "__main__":
    main()
