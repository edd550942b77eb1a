"""The comparator's verbs: ``atm-eval train-classic`` (train / reuse classic models, optionally
walk-forward evaluated) and ``atm-eval backtest`` (backtest an eval run or any predictions file).

Registered by ``atm.eval.cli.register`` (one call); argparse only at import time.
"""

from __future__ import annotations

import argparse

EPILOG = """examples:
  atm-eval train-classic --model lgbm                          # default suite's dataset (sample, built if missing)
  atm-eval train-classic --model logreg --model lgbm --data datasets/build/btc-seed
  atm-eval train-classic --model lstm --set epochs=5 --set hidden=64
  atm-eval train-classic --model lgbm --walk-forward 4         # expanding folds, embargoed; per fold + pooled
  atm-eval run --model classic:lgbm@runs/classic/lgbm-1a2b3c4d5e --model baseline:majority
the artifact dir (runs/classic/MODEL-HASH) holds atm_classic.json (config, class weights, thresholds,
validation metrics, dataset hashes, versions) and the model file; the same config on the same data
reuses it (--force retrains)."""


BACKTEST_EPILOG = """examples:
  atm-eval backtest runs/eval/default-verify                      # every model of an eval run + buy-and-hold
  atm-eval backtest runs/eval/default-verify --set sell_mode=flat --set hold=until-next-signal
  atm-eval backtest --predictions preds.jsonl --data datasets/build/btc-seed --set fee=0.00075 --set slippage_bps=2
predictions: JSONL/CSV/parquet rows with advice and open_time (or row, or id joined with the dataset's
items). A position follows each BUY/SELL (SELL: short or flat) for `horizon` bars or until the next one;
fees + slippage per side on every change; Sharpe/Sortino annualized with sqrt(525600) for minute bars."""


def register_verbs(sub) -> None:
    from atm.cli import Formatter

    p = sub.add_parser("train-classic", help="train classic models (logreg, lgbm, cnn, lstm) on a dataset's train split",
                       description="Train classic models on the train items of a built dataset (the same window "
                                   "the prompt encodes + indicator features), with balanced class weights and "
                                   "thresholds tuned on an embargoed validation tail; save artifacts that "
                                   "`atm-eval run --model classic:NAME@DIR` reuses. --walk-forward K evaluates "
                                   "expanding-window folds instead.",
                       epilog=EPILOG, formatter_class=Formatter)
    p.add_argument("--model", "-m", action="append", default=[], required=True, metavar="NAME",
                   help="logreg, lgbm, cnn or lstm (repeatable; a classic: prefix is accepted)")
    p.add_argument("--data", default=None, help="built dataset dir (default: the suite's dataset)")
    p.add_argument("--suite", default=None, help="suite YAML whose dataset to use (default: default)")
    p.add_argument("--out", default=None, help="artifact root (default runs/classic or $ATM_CLASSIC_DIR)")
    p.add_argument("--walk-forward", type=int, default=None, metavar="K",
                   help="evaluate K expanding-window folds over the train+verify items (embargoed) instead of "
                        "training one artifact")
    p.add_argument("--embargo", type=int, default=None, help="walk-forward embargo in minutes (default: the dataset's)")
    p.add_argument("--force", action="store_true", help="retrain even if an identical artifact exists")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ClassicConfig key, e.g. --set class_weight=none, --set epochs=5, "
                        "--set threshold=mean_return (keys: atm.eval.classic.core.ClassicConfig)")
    p.set_defaults(func=cmd_train_classic)

    b = sub.add_parser("backtest", help="backtest the advice of an eval run (or a predictions file) with fees",
                       description="Turn advice into positions (BUY long, SELL short or flat; held for the horizon "
                                   "or until the next signal), charge fees and slippage per side, and report "
                                   "return, Sharpe, Sortino, drawdown, hit rate, turnover and exposure beside "
                                   "buy-and-hold; writes backtest.json and equity curves (PNG + SVG).",
                       epilog=BACKTEST_EPILOG, formatter_class=Formatter)
    b.add_argument("run", nargs="?", default=None, help="eval run directory (runs/eval/NAME)")
    b.add_argument("--predictions", action="append", default=[], metavar="FILE",
                   help="predictions file instead of a run (repeatable; named by file stem)")
    b.add_argument("--data", default=None, help="dataset dir whose klines.parquet (and items) the predictions refer to")
    b.add_argument("--split", default="verify", help="items split used to map prediction ids to minutes")
    b.add_argument("--out", default=None, help="where to write backtest.json and equity.png/.svg "
                                               "(default: the run dir, or the current dir)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="BacktestConfig key: sell_mode, hold, horizon, fee, slippage_bps, periods_per_year, close_at_end")
    b.set_defaults(func=cmd_backtest)


def cmd_train_classic(args: argparse.Namespace) -> int:
    from pathlib import Path

    from atm.errors import AtmError
    from atm.eval.classic.core import MODELS, ClassicConfig, train_classic, walk_forward_eval, walk_forward_table
    from atm.eval.harness import ensure_dataset, load_suite

    suite = load_suite(args.suite)
    dataset_dir = ensure_dataset(suite, args.data)
    names = [m.split(":", 1)[1] if m.startswith("classic:") else m for m in args.model]
    bad = [m for m in names if m not in MODELS]
    if bad:
        raise AtmError(f"unknown classic model(s) {bad}; valid: {', '.join(MODELS)}")
    root = Path(args.out) if args.out else None
    for name in names:
        cfg = ClassicConfig.load(None, overrides=args.overrides, model=name)
        if args.walk_forward:
            from atm.eval.classic.core import artifact_name, dataset_fingerprint, default_root

            out = (root or default_root()) / f"walk-forward-{artifact_name(cfg, dataset_fingerprint(dataset_dir))}-k{args.walk_forward}"
            res = walk_forward_eval(dataset_dir, cfg, args.walk_forward, embargo=args.embargo,
                                    backtest=dict(suite.backtest), out=out, quiet=False)
            print(walk_forward_table(res))
            print(f"wrote {out / 'walk_forward.json'} and {out / 'walk_forward.md'}")
        else:
            path = train_classic(dataset_dir, cfg, root=root, force=args.force, quiet=False)
            print(f"artifact: {path}  (use --model classic:{name}@{path})")
    return 0


def cmd_backtest(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pandas as pd

    from atm.errors import AtmError
    from atm.eval.backtest import BacktestConfig, backtest_many, plot_equity, summary_table
    from atm.utils import write_json_atomic

    preds: dict = {}
    fields: dict = {}
    if args.run:
        from atm.eval import rundir

        run = Path(args.run)
        manifest = rundir.read_manifest(run)
        data = Path(args.data) if args.data else Path(manifest["data"]["path"])
        items = rundir.read_truth(run)[["id", "open_time"]]
        preds = rundir.advice_by_model(run, manifest)
        fields = rundir.backtest_fields(manifest)
        out = Path(args.out) if args.out else run
    else:
        if not args.predictions or not args.data:
            raise AtmError("give an eval run directory, or --predictions FILE with --data DATASET_DIR")
        from atm.artifacts import DatasetDir

        data = Path(args.data)
        ds = DatasetDir(data)
        ipath = ds.view_path("items", args.split)
        items = pd.read_parquet(ipath, columns=["id", "open_time"]) if ipath.exists() else None
        if ds.has_card():
            fields["horizon"] = int(ds.card().label.get("horizon", 10) or 10)
        for f in args.predictions:
            preds[Path(f).stem] = f
        out = Path(args.out) if args.out else Path(".")
    kpath = data / "klines.parquet"
    if not kpath.exists():
        raise AtmError(f"{kpath}: klines not found (pass --data DATASET_DIR)")
    cfg = BacktestConfig.load(None, overrides=args.overrides, **{k: v for k, v in fields.items()
                                                                 if not any(o.startswith(k + "=") for o in args.overrides)})
    if items is not None:
        items = items.assign(id=items["id"].astype(str))
    results = backtest_many(preds, pd.read_parquet(kpath), cfg, items=items)
    table = summary_table(results)
    print(table)
    write_json_atomic(out / "backtest.json", {"config": cfg.to_dict(),
                                              "results": {k: r.metrics for k, r in results.items()}})
    png = plot_equity(results, out / "equity.png")
    svg = plot_equity(results, out / "equity.svg")
    print(f"wrote {out / 'backtest.json'}, {png} and {svg}")
    return 0
