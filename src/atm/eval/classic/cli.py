"""``atm-eval train-classic``: train (or reuse) classic models, optionally walk-forward evaluated.

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


def cmd_train_classic(args: argparse.Namespace) -> int:
    from pathlib import Path

    from atm.errors import AtmError
    from atm.eval.classic import MODELS
    from atm.eval.classic.core import ClassicConfig, train_classic, walk_forward_eval, walk_forward_table
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
