"""``atm eval ...`` == ``atm-eval ...``: run models against baselines on the same items, report."""

from __future__ import annotations

import argparse

RUN_EPILOG = """examples:
  atm-eval run --model atm:q8                       # default suite: sample verify split, built if missing
  atm-eval run --model baseline:majority --model baseline:momentum --limit 500 --out runs/eval/base
  atm-eval run --model atm:q8 --model classic:lgbm --mode loglik --out runs/eval/q8-loglik
  atm-eval run --model openai:atm@http://127.0.0.1:8000/v1 --concurrency 8
  atm-eval run --model atm:q8 --suite eval/suites/seed-replication.yaml
  atm-eval run --model hf:runs/sft-merged --data datasets/build/btc-seed --split verify --limit 200
  atm-eval run --model openai:atm@http://gpu0:8000/v1,http://gpu1:8000/v1 --concurrency 16   # fan-out
  atm-eval run --model atm:q8 --shard 2/4 --out runs/eval/q8-shard2of4   # this machine's quarter
  atm-eval run --model vllm:runs/sft-merged --concurrency 8   # vLLM launched for the run (atm doctor --vllm)
rerun the same command after an interruption: finished items are kept, the rest are asked.
--concurrency is per endpoint; `atm-eval report SHARD_DIRS... --out DIR` merges shards into one run.
model forms: atm:TAG | openai:MODEL@BASE_URL[,BASE_URL...] | ollama:NAME | hf:PATH | vllm:DIR |
             baseline:random|majority|prior|momentum|persistence | classic:logreg|lgbm|cnn|lstm[@RUN]"""

REPORT_EPILOG = """examples:
  atm-eval report runs/eval/default-verify
  atm-eval report runs/eval/q8 runs/eval/q4 --out runs/eval/compare
  atm-eval report runs/eval/q8-shard*of4 --out runs/eval/q8   # merge the 4 shards of one run
shard directories (atm-eval run --shard K/N) are merged into one run directory (--out, default
FIRST-merged) after checking they share suite, items (content hash), split and models; every shard
K of 1..N must be there. A merge is rewritten from the shards each time (run it again as they progress)."""

LIST_EPILOG = """examples:
  atm-eval list"""


def register(parser: argparse.ArgumentParser) -> None:
    from atm.cli import Formatter

    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    p = sub.add_parser("run", help="evaluate models (and the suite's baselines) on the same items",
                       description="Evaluate one or more models side by side on the same items, with "
                                   "resumable per-item results, metrics with block-bootstrap CIs, paired "
                                   "tests against baselines and a report.",
                       epilog=RUN_EPILOG, formatter_class=Formatter)
    p.add_argument("--model", "-m", action="append", default=[], metavar="SPEC", required=True,
                   help="model to evaluate (repeatable)")
    p.add_argument("--suite", default=None, help="suite YAML (eval/suites/NAME.yaml or NAME); default: default")
    p.add_argument("--data", default=None, help="built dataset dir (datasets/build/NAME); overrides the suite's")
    p.add_argument("--split", default=None, help="split of the items view (default: the suite's, verify)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate N items evenly spaced over the split (the first N minutes: --set first=N)")
    p.add_argument("--mode", choices=["generate", "loglik"], default=None,
                   help="generate: constrained decoding; loglik: log-prob of each advice (class probabilities)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight per model (per endpoint with MODEL@URL1,URL2)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="evaluate only shard K of N: item i of the selection belongs to shard i %% N + 1 "
                        "(merge the shard directories with `atm-eval report`)")
    p.add_argument("--out", default=None, help="run directory (default runs/eval/SUITE-SPLIT[-limitN])")
    p.add_argument("--no-baselines", action="store_true", help="do not add the suite's baselines")
    p.add_argument("--retry-failed", action="store_true", help="ask again about items recorded as failures")
    p.add_argument("--no-report", action="store_true", help="skip report.md / report.html")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a suite key, e.g. --set metrics.n_boot=2000")
    p.set_defaults(func=cmd_run)

    r = sub.add_parser("report", help="write report.md and report.html for run directories",
                       description="Rebuild metrics and write report.md + a self-contained report.html.",
                       epilog=REPORT_EPILOG, formatter_class=Formatter)
    r.add_argument("runs", nargs="+", help="run directories")
    r.add_argument("--out", default=None, help="where to write the report (default: the first run dir)")
    r.set_defaults(func=cmd_report)

    ls = sub.add_parser("list", help="list model forms and shipped suites", epilog=LIST_EPILOG,
                        formatter_class=Formatter)
    ls.set_defaults(func=cmd_list)

    from atm.eval.classic.cli import register_verbs as classic_verbs  # train-classic (classic models' issue)

    classic_verbs(sub)


def cmd_run(args: argparse.Namespace) -> int:
    from atm.eval.harness import load_suite, parse_shard, run_eval

    suite = load_suite(args.suite, args.overrides)
    split = args.split or suite.split
    lim = args.limit or suite.limit
    kn = parse_shard(args.shard)
    out = args.out or (f"runs/eval/{suite.name}-{split}" + (f"-limit{lim}" if lim else "")
                       + (f"-shard{kn[0]}of{kn[1]}" if kn else ""))
    metrics = run_eval(args.model, suite, out, data=args.data, split=args.split, limit=args.limit,
                       mode=args.mode, concurrency=args.concurrency, with_baselines=not args.no_baselines,
                       retry_failed=args.retry_failed, shard=kn)
    if not args.no_report:
        from atm.eval.report import write_report

        paths = write_report([out], out_dir=out, metrics=[metrics])
        metrics["report"] = {"md": str(paths["md"]), "html": str(paths["html"])}
    _print_summary(metrics)
    return 0


def _print_summary(metrics: dict) -> None:
    # tok/item: prompt + generated (+ scored) tokens of an item; evald: of those, what the engine
    # evaluated (the rest came from its prefix cache); s/item: wall time of the model's loop per item
    print(f"{'model':<34} {'n':>6} {'valid':>6} {'bal.acc':>8} {'95% CI':>16} {'acc':>6} "
          f"{'tok/item':>8} {'evald':>6} {'s/item':>8}")
    for spec, r in metrics["models"].items():
        ci = (r.get("ci") or {}).get("balanced_accuracy") or [None, None]
        cis = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else ""
        ba = r.get("balanced_accuracy")
        acc = r.get("accuracy")
        rate = r["validity"]["rate"]
        tok = r.get("tokens") or {}
        spi = (r.get("speed") or {}).get("s_per_item")
        print(f"{spec:<34} {r['n']:>6} {100 * (rate or 0):>5.1f}% {('n/a' if ba is None else f'{ba:.3f}'):>8} "
              f"{cis:>16} {('n/a' if acc is None else f'{acc:.3f}'):>6} {_num(tok.get('per_item')):>8} "
              f"{_num(tok.get('evaluated')):>6} {_secs(spi):>8}")
    for line in class_lines(metrics):
        print(line)
    for v in metrics.get("verdicts") or []:
        print(f"verdict: {v}")
    rep = metrics.get("report")
    if rep:
        print(f"report: {rep['md']} and {rep['html']}")


def class_lines(metrics: dict) -> list[str]:
    """The true classes of the items (as the report gives them) and, when a class is rare, the
    warning that the figures above rest on very few minutes: beside the table, not only in report.md."""
    support = next((r["per_class"] for r in metrics["models"].values() if r.get("per_class")), None)
    if not support:
        return []
    counts = {c: v["support"] for c, v in support.items()}
    tot = sum(counts.values()) or 1
    out = ["true classes: " + ", ".join(f"{c} {n:,} ({100 * n / tot:.1f}%)" for c, n in counts.items())
           + f"; always answering the most common scores {100 * max(counts.values()) / tot:.1f}% accuracy"]
    rare = [c for c, n in counts.items() if n < 10]
    if rare:
        out.append(f"WARNING: {', '.join(rare)} occur{'s' if len(rare) == 1 else ''} fewer than 10 times in "
                   "these items: balanced accuracy and the verdicts rest on very few minutes; evaluate more "
                   "items (a larger --limit, or none) before concluding anything")
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


def cmd_report(args: argparse.Namespace) -> int:
    from atm.errors import AtmError
    from atm.eval import rundir
    from atm.eval.report import write_report

    runs, out = args.runs, args.out
    shards = [r for r in runs if rundir.shard_of(r)]
    if shards:
        if len(shards) != len(runs):
            plain = [r for r in runs if r not in shards]
            raise AtmError(f"{', '.join(shards)} are shards and {', '.join(plain)} are not: merge the shards of one "
                           "run first (atm-eval report SHARDS --out DIR), then report DIR beside the others")
        merged = rundir.merge_shards(shards, out or rundir.default_merge_dir(shards))
        print(f"merged {len(shards)} shards into {merged}")
        runs, out = [merged], merged
    paths = write_report(runs, out_dir=out)
    for v in paths["verdicts"]:
        print(f"verdict: {v}")
    print(f"report: {paths['md']} and {paths['html']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from atm.eval.harness import suites_dir
    from atm.eval.providers import VALID_FORMS

    print("model forms:")
    for f in VALID_FORMS:
        print(f"  {f}")
    print("suites:")
    for p in sorted(suites_dir().glob("*.yaml")):
        print(f"  {p}")
    return 0
