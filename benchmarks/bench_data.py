"""Benchmark `atm data build`: 350,000 synthetic minutes (8 months) in Binance's layout.

    python benchmarks/bench_data.py [--minutes 350000] [--start 2024-09-01] [--keep DIR]

Writes random-walk 1m klines as daily zips (+ CHECKSUM) in Binance's public-data layout, from
2024-09-01 so the range crosses 2025-01-01: files before it use ms timestamps, after it µs, as
Binance's spot files do. Then, each in a fresh subprocess (so peak RSS is the job's own):

* ``atm data build`` end to end (interpreter start, imports, read, check, write parquet + sidecar):
  the target is under 10 s on the 2-core reference machine;
* ``build_klines`` in process: rows/s and peak RSS;
* a reference: a naive loader like the original experiment's (csv module, one row at a time, float()
  per field, a dict to drop duplicate minutes, DataFrame, parquet) measured in the same run, so the
  ratio is independent of how loaded the machine is.

Prints the figures and writes benchmarks/results/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYMBOL = "SYNUSDT"
TARGET_S = 10.0


def write_layout(root: Path, minutes: int, start: str) -> int:
    """Daily zips of ``minutes`` random-walk bars from ``start``; returns the number of files."""
    from atm.market.klines import layout_dir, synthetic_rows, write_binance_file

    rows = synthetic_rows(start, minutes, seed=42)
    folder = layout_dir(root, SYMBOL)
    n_files = 0
    for i in range(0, minutes, 1440):
        day = datetime.fromtimestamp(_open_seconds(rows[i][0]), tz=timezone.utc).strftime("%Y-%m-%d")
        write_binance_file(folder, SYMBOL, day, rows[i:i + 1440])
        n_files += 1
    return n_files


def _open_seconds(field: str) -> int:
    v = int(field)
    return v // 1_000_000 if v >= 10**14 else v // 1000


def naive_load(raw: Path, out: Path) -> int:
    """The reference: what a straightforward script does (no checks beyond float())."""
    import csv
    import io
    import zipfile

    import pandas as pd

    by_minute: dict[int, list] = {}
    for path in sorted(raw.rglob(f"{SYMBOL}-1m-*.zip")):
        with zipfile.ZipFile(path) as zf:
            text = zf.read(zf.namelist()[0]).decode()
        for row in csv.reader(io.StringIO(text)):
            ot = int(row[0])
            ct = int(row[6])
            scale = 1_000 if ot >= 10**14 else 1_000_000  # µs or ms -> ns
            by_minute[ot * scale] = [ot * scale, float(row[1]), float(row[2]), float(row[3]), float(row[4]),
                                     float(row[5]), ct * (1_000 if ct >= 10**14 else 1_000_000), float(row[7]),
                                     int(row[8]), float(row[9]), float(row[10])]
    cols = ["open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume", "count",
            "taker_buy_volume", "taker_buy_quote_volume"]
    df = pd.DataFrame([by_minute[k] for k in sorted(by_minute)], columns=cols)
    for c in ("open_time", "close_time"):
        df[c] = pd.to_datetime(df[c], unit="ns", utc=True)
    df.to_parquet(out, index=False)
    return len(df)


def child(kind: str, raw: Path, out: Path) -> None:
    """Run one job in this (fresh) process and print its figures as JSON (imports not timed)."""
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    t0 = time.perf_counter()
    if kind == "build":
        from atm.market.klines import build_klines

        rows = build_klines(raw, SYMBOL, out=out, progress=False)["rows"]
    else:
        rows = naive_load(raw, out)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_rss_mb": peak_mb}))


def run_child(kind: str, raw: Path, out: Path) -> dict:
    env = {**os.environ, "ATM_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--raw", str(raw), "--out", str(out)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli_build(raw: Path, out: Path) -> tuple[float, str]:
    env = {**os.environ, "ATM_NO_PROGRESS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "atm", "data", "build", "--raw", str(raw), "--symbol", SYMBOL,
                           "--out", str(out)], capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - t0, proc.stdout


def machine() -> str:
    from run_all import machine as host  # benchmarks/ is on sys.path when run as a script

    return f"{host()}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=350_000)
    ap.add_argument("--start", default="2024-09-01")
    ap.add_argument("--keep", default=None, help="write the synthetic layout here and keep it")
    ap.add_argument("--repeats", type=int, default=3, help="best of N for each timing")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "data.json"))
    ap.add_argument("--child", choices=["build", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--raw", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, Path(args.raw), Path(args.out))
        return

    with tempfile.TemporaryDirectory(prefix="atm-bench-data-") as tmp:
        raw = Path(args.keep) if args.keep else Path(tmp) / "raw"
        t0 = time.perf_counter()
        n_files = write_layout(raw, args.minutes, args.start)
        print(f"wrote {args.minutes:,} minutes in {n_files} daily zips ({args.start} on, ms before 2025, "
              f"µs after) in {time.perf_counter() - t0:.1f} s under {raw}")
        out = Path(tmp) / "out.parquet"

        cli_runs, builds, refs = [], [], []
        for _ in range(args.repeats):
            s, stdout = cli_build(raw, out)
            cli_runs.append(s)
            builds.append(run_child("build", raw, out))
            refs.append(run_child("reference", raw, Path(tmp) / "ref.parquet"))
        print(stdout.strip())
        cli_s = min(cli_runs)
        best = min(builds, key=lambda r: r["seconds"])
        ref = min(refs, key=lambda r: r["seconds"])
        assert best["rows"] == ref["rows"] == args.minutes, (best, ref)
        import pandas as pd

        from atm.market.klines import read_klines_parquet

        ours, theirs = read_klines_parquet(out), pd.read_parquet(Path(tmp) / "ref.parquet")
        assert ours.equals(theirs), "the reference and build_klines disagree on the data"

    rate = best["rows"] / best["seconds"]
    ref_rate = ref["rows"] / ref["seconds"]
    ratio = ref["seconds"] / best["seconds"]
    load = os.getloadavg()
    print(f"atm data build (whole command, best of {args.repeats}): {cli_s:.2f} s  (target < {TARGET_S:.0f} s)")
    print(f"build_klines: {best['seconds']:.2f} s, {rate:,.0f} rows/s, peak RSS {best['peak_rss_mb']:.0f} MB")
    print(f"reference (csv module, row by row): {ref['seconds']:.2f} s, {ref_rate:,.0f} rows/s, "
          f"peak RSS {ref['peak_rss_mb']:.0f} MB")
    print(f"speed-up over the reference: {ratio:.1f}x  (load average {load[0]:.1f})")

    result = {
        "title": f"Market data: build {args.minutes:,} minutes of Binance klines",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "figures": [
            {"name": f"atm data build, whole command ({args.minutes:,} minutes, {n_files} daily zips)",
             "value": round(cli_s, 2), "unit": "s"},
            {"name": "build_klines throughput", "value": round(rate), "unit": "rows/s"},
            {"name": "build_klines time", "value": round(best["seconds"], 2), "unit": "s"},
            {"name": "build_klines peak RSS", "value": round(best["peak_rss_mb"]), "unit": "MB"},
            {"name": "reference loader (csv module) throughput", "value": round(ref_rate), "unit": "rows/s"},
            {"name": "reference loader time", "value": round(ref["seconds"], 2), "unit": "s"},
            {"name": "reference loader peak RSS", "value": round(ref["peak_rss_mb"]), "unit": "MB"},
            {"name": "speed-up over the reference", "value": round(ratio, 1), "unit": "x"},
        ],
        "targets": [
            {"name": f"whole build of {args.minutes:,} minutes < {TARGET_S:.0f} s on 2 cores",
             "target": f"< {TARGET_S:.0f} s", "met": cli_s < TARGET_S},
        ],
        "notes": (f"Synthetic random-walk 1m klines from {args.start} ({n_files} daily zips with CHECKSUMs; ms "
                  "timestamps before 2025-01-01, µs after). Whole command = `python -m atm data build` wall "
                  "time incl. interpreter start and imports; build_klines and the reference each run in a "
                  f"fresh process; best of {args.repeats}. build_klines verifies checksums, checks every row "
                  "and writes parquet + sidecar; the reference only parses (no checks) and writes parquet; "
                  f"both outputs are asserted equal. Load average at the end: {load[0]:.1f} (shared machine)."),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
