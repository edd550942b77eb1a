"""``atm data ...``: download Binance klines, build a checked parquet, inspect it.

Each verb is one ``_add_<verb>(sub)`` function listed in ``VERBS``; to add a verb (e.g. labels),
write its ``_add_...`` function and append it to ``VERBS``. Heavy imports happen inside the
verb functions so ``atm data --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atm.cli import Formatter


def _fmt_int(n: int) -> str:
    return f"{n:,}"


# ---------------------------------------------------------------------------------------------
# atm data download
# ---------------------------------------------------------------------------------------------

def _add_download(sub) -> None:
    p = sub.add_parser(
        "download", formatter_class=Formatter,
        help="download Binance public-data kline zips (checksummed, resumable)",
        description="Download kline zips from Binance's public-data site into Binance's own layout "
                    "(data/{market}/{granularity}/klines/SYMBOL/INTERVAL/SYMBOL-INTERVAL-DATE.zip + "
                    ".CHECKSUM). Every zip's SHA-256 is verified; transient errors are retried; files "
                    "already downloaded and verified are not fetched again.",
        epilog="""examples:
  atm data download --symbol BNBBTC --interval 1m --start 2023-08-01 --end 2024-04-30 --out data/binance
  atm data download --symbol BTCUSDT --market futures/um --granularity monthly --start 2024-01 --end 2024-06 --out data/binance
  atm data download --symbol BTCUSDT --start 2025-08-01 --end 2025-08-10 --base-url http://127.0.0.1:8000 --out /tmp/raw
exit status: 0 when nothing failed (days missing upstream are reported, not failures), 1 otherwise.""")
    p.add_argument("--symbol", required=True, help="trading pair, e.g. BTCUSDT")
    p.add_argument("--interval", default="1m", help="kline interval (1s, 1m, 5m, 1h, 1d, ...)")
    p.add_argument("--start", required=True, help="first day YYYY-MM-DD (or month YYYY-MM), inclusive")
    p.add_argument("--end", required=True, help="last day YYYY-MM-DD (or month YYYY-MM), inclusive")
    p.add_argument("--market", default="spot", choices=["spot", "futures/um", "futures/cm"],
                   help="Binance market: spot, futures/um (USD-M perpetuals) or futures/cm (COIN-M)")
    p.add_argument("--granularity", default="daily", choices=["daily", "monthly"],
                   help="daily zips or monthly zips")
    p.add_argument("--base-url", default=None, help="public-data site (default https://data.binance.vision)")
    p.add_argument("--out", required=True, help="folder that receives the data/... layout")
    p.add_argument("--retries", type=int, default=4, help="retries per file on transient errors")
    p.add_argument("--workers", type=int, default=4, help="parallel downloads")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_download)


def _download(args: argparse.Namespace) -> int:
    from atm.market.download import DEFAULT_BASE_URL, download

    summary = download(symbol=args.symbol, interval=args.interval, start=args.start, end=args.end,
                       out=args.out, market=args.market, granularity=args.granularity,
                       base_url=args.base_url or DEFAULT_BASE_URL, retries=args.retries,
                       workers=args.workers)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['symbol']} {summary['interval']} {summary['market']} {summary['granularity']} "
              f"{summary['start']} .. {summary['end']} -> {summary['out']}")
        print(f"fetched {summary['fetched']}, already there {summary['already']}, "
              f"missing upstream (404) {len(summary['missing'])}, failed {len(summary['failed'])}")
        if summary["missing"]:
            print("missing upstream: " + ", ".join(summary["missing"][:20])
                  + (" ..." if len(summary["missing"]) > 20 else ""))
        for f in summary["failed"]:
            print(f"failed: {f['file']}: {f['reason']}")
    return 1 if summary["failed"] else 0


# ---------------------------------------------------------------------------------------------
# atm data build
# ---------------------------------------------------------------------------------------------

def _add_build(sub) -> None:
    p = sub.add_parser(
        "build", formatter_class=Formatter,
        help="read Binance zips/CSVs and write one checked klines parquet (+ .meta.json)",
        description="Read every SYMBOL-INTERVAL-*.zip|csv under --raw (Binance's layout root, or a folder "
                    "of zips/CSVs), check every row, and write a typed, sorted, unique-minute parquet plus "
                    "a JSON sidecar (<out>.meta.json) with input sha256s, row counts, repairs and gaps. "
                    "Bad rows stop the build with FILE:LINE; exact duplicate minutes are dropped and "
                    "counted; gaps are reported and, with --fill-gaps, forward-filled (filled=True).",
        epilog="""examples:
  atm data build --raw datasets/samples/binance --symbol BTCUSDT
  atm data build --raw datasets/samples/binance --symbol BNBBTC --fill-gaps
  atm data build --raw data/binance --symbol BTCUSDT --market futures/um --out runs/data/btc-perp.parquet""")
    p.add_argument("--raw", required=True, help="Binance layout root (holding data/) or a folder of zips/CSVs")
    p.add_argument("--symbol", required=True, help="trading pair, e.g. BTCUSDT")
    p.add_argument("--interval", default="1m", help="kline interval")
    p.add_argument("--market", default="spot", choices=["spot", "futures/um", "futures/cm"],
                   help="Binance market: spot, futures/um (USD-M perpetuals) or futures/cm (COIN-M)")
    p.add_argument("--out", default=None,
                   help="output parquet (default runs/data/<symbol>-<interval>.parquet)")
    p.add_argument("--fill-gaps", action="store_true",
                   help="insert missing bars (OHLC = previous close, volumes 0) flagged filled=True")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    from atm.market.klines import build_klines, meta_path

    out = args.out or f"runs/data/{args.symbol.lower()}-{args.interval}.parquet"
    report = build_klines(args.raw, args.symbol, interval=args.interval, out=out, market=args.market,
                          fill_gaps=args.fill_gaps)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"wrote {out}: {_fmt_int(report['rows'])} rows of {report['symbol']} {report['interval']} "
          f"({report['market']}) in {report['seconds']:.2f} s")
    print(f"first {report['first_open_time']}, last {report['last_open_time']}")
    ck = report["checksums"]
    print(f"inputs: {len(report['files'])} files, {_fmt_int(report['rows_read'])} rows read, "
          f"checksums verified {ck['verified']}, absent {ck['absent']}")
    g = report["gaps"]
    if g["count"]:
        lg = g["longest"]
        print(f"gaps: {g['count']} ({_fmt_int(g['missing'])} missing bars; longest {lg['missing']} "
              f"after {lg['after']}){'; filled' if g['filled'] else '; not filled (use --fill-gaps)'}")
    else:
        print("gaps: none")
    if report["repair_counts"]:
        print("repairs: " + ", ".join(f"{k} {v}" for k, v in report["repair_counts"].items()))
    else:
        print("repairs: none")
    print(f"report: {meta_path(out)}")
    return 0


# ---------------------------------------------------------------------------------------------
# atm data info
# ---------------------------------------------------------------------------------------------

def _add_info(sub) -> None:
    p = sub.add_parser(
        "info", formatter_class=Formatter, help="summarise a klines parquet (rows, range, gaps, repairs)",
        description="Check a klines parquet against the frame contract and print its summary "
                    "(and its sidecar's, when present).",
        epilog="""examples:
  atm data info runs/data/btcusdt-1m.parquet
  atm data info runs/data/btcusdt-1m.parquet --json""")
    p.add_argument("path", help="klines parquet written by `atm data build`")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    from atm.market.klines import parquet_info

    info = parquet_info(Path(args.path))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    what = " ".join(str(info[k]) for k in ("symbol", "interval", "market") if info.get(k))
    print(f"{info['path']}: {_fmt_int(info['rows'])} rows{' of ' + what if what else ''}")
    print(f"first {info['first_open_time']}, last {info['last_open_time']}")
    print(f"gaps: {info['gaps']}, filled bars: {info['filled']}")
    rc = info.get("repair_counts") or {}
    print("repairs: " + (", ".join(f"{k} {v}" for k, v in rc.items()) or "none"))
    print("columns: " + ", ".join(f"{c} {t}" for c, t in info["columns"].items()))
    if info.get("sidecar"):
        print(f"report: {info['sidecar']} ({info['input_files']} input files, built {info['built']})")
    return 0


# ---------------------------------------------------------------------------------------------
# atm data labels
# ---------------------------------------------------------------------------------------------

def _add_labels(sub) -> None:
    from atm.cli import add_config_args

    p = sub.add_parser(
        "labels", formatter_class=Formatter, help="label every minute of a klines parquet and print "
                                                  "the class balance",
        description="Compute labels (rules: seed, entry, return, fee-aware; see atm.market.labels) "
                    "for every minute of a klines parquet and print how many rows fall in each class "
                    "and how many cannot be labelled (lookback before the data, horizon past it, or a "
                    "gap inside the window). --out writes open_time + label to a parquet.",
        epilog="""examples:
  atm data labels --klines runs/data/btcusdt-1m.parquet --rule seed
  atm data labels --klines runs/data/btcusdt-1m.parquet --rule fee-aware --set horizon=30 --set fee=0.0005
  atm data labels --klines runs/data/btcusdt-1m.parquet --rule entry --set threshold=0.003 --json""")
    p.add_argument("--klines", required=True, help="klines parquet written by `atm data build`")
    p.add_argument("--rule", default=None, choices=["seed", "entry", "return", "fee-aware"],
                   help="labelling rule (default: the config's, else seed)")
    add_config_args(p)
    p.add_argument("--out", default=None, help="also write open_time + label to this parquet")
    p.add_argument("--json", action="store_true", help="print config and balance as JSON")
    p.set_defaults(func=_labels)


def _labels(args: argparse.Namespace) -> int:
    from atm.market.klines import read_klines_parquet
    from atm.market.labels import LabelConfig, class_balance, compute_labels
    from atm.utils import atomic_path

    cfg = LabelConfig.load(args.config, overrides=args.overrides, rule=args.rule)
    df = read_klines_parquet(args.klines)
    labels = compute_labels(df, cfg)
    bal = class_balance(labels)
    if args.out:
        with atomic_path(args.out, suffix=".parquet") as tmp:
            df[["open_time"]].assign(label=labels).to_parquet(tmp, index=False)
    if args.json:
        print(json.dumps({"klines": args.klines, "config": cfg.to_dict(), "balance": bal}, indent=2))
        return 0
    print(f"{args.klines}: {_fmt_int(bal['total'])} rows, rule {cfg.rule} "
          f"(horizon {cfg.horizon}, threshold {cfg.threshold}, fee {cfg.fee})")
    if "counts" in bal:
        for c, n in bal["counts"].items():
            f = bal["fractions"][c]
            print(f"  {c:<5} {_fmt_int(n):>10}  {'' if f is None else f'{100 * f:6.2f}%'}")
    else:
        print(f"  mean {bal['mean']:.6g}, std {bal['std']:.6g}, min {bal['min']:.6g}, "
              f"max {bal['max']:.6g}; up {bal['fractions']['up']:.2%}, "
              f"down {bal['fractions']['down']:.2%}")
    print(f"  unlabelled {_fmt_int(bal['missing'])} (lookback before the data, horizon past it, "
          f"or a gap in the window)")
    if args.out:
        print(f"wrote {args.out}")
    return 0


VERBS = [_add_download, _add_build, _add_info, _add_labels]


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for add in VERBS:
        add(sub)
