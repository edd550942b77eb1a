"""``atm prompts ...``: build prompt / preference-pair datasets, show rendered prompts.

Heavy imports (pandas, pyarrow, transformers) happen inside the verb functions so
``atm prompts --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atm.cli import Formatter, add_config_args


# ---------------------------------------------------------------------------------------------
# atm prompts build
# ---------------------------------------------------------------------------------------------

def _add_build(sub) -> None:
    p = sub.add_parser(
        "build", formatter_class=Formatter,
        help="build a prompt dataset (preference / sft / rl / items views + card) from a klines parquet",
        description="Label every minute, encode its context (only bars before it), render it with the "
                    "template, and write a Hugging Face parquet dataset: preference pairs (TRL "
                    "conversational format), an SFT view, an RL view with realized returns, and one "
                    "item per minute for the eval harness, each with train / verify splits; plus "
                    "klines.parquet, dataset.json and a dataset card (README.md). Written atomically.",
        epilog="""examples:
  atm prompts build --config datasets/recipes/sample-seed.yaml
  atm prompts build --klines runs/data/btcusdt-1m.parquet --encoder seed-json --template prompts/seed.yaml \\
      --label seed --pairs random --out datasets/build/btc-seed
  atm prompts build --klines runs/data/btcusdt-1m.parquet --encoder natural --template prompts/natural.yaml \\
      --label fee-aware --pairs reward --min-margin 5 --split verify=0.25 --split embargo=240 \\
      --out datasets/build/btc-natural
  atm prompts build --config datasets/recipes/sample-seed.yaml --set fewshot_k=3 --set out=datasets/build/x --overwrite
config keys (YAML or --set key=value):
""" + _describe())
    p.add_argument("--klines", default=None, help="klines parquet (from `atm data build`)")
    p.add_argument("--encoder", default=None, help="seed-json | seed-json-compat | compact | natural | digits")
    p.add_argument("--template", default=None, help="template YAML (path or name in prompts/)")
    p.add_argument("--label", default=None, choices=["seed", "entry", "fee-aware"], help="label rule")
    p.add_argument("--pairs", default=None, choices=["random", "reward"], help="pair rule")
    p.add_argument("--split", action="append", default=[], metavar="KEY=VALUE",
                   help="split setting (repeatable): train=0.8, verify=0.2, val=0.1, embargo=180, "
                        "method=dates, 'verify_dates=[2025-08-09, 2025-08-11]'")
    p.add_argument("--fewshot-k", type=int, default=None, help="few-shot examples (from train)")
    p.add_argument("--min-margin", type=float, default=None, help="reward pairs: drop margins below (bps)")
    p.add_argument("--all-worse", action="store_true", default=None, help="reward pairs: one per worse advice")
    p.add_argument("--tokenizer", default=None, help="also count the card's tokens with this HF tokenizer / model dir")
    p.add_argument("--out", default=None, help="output folder, e.g. datasets/build/NAME")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print dataset.json's summary as JSON")
    add_config_args(p)
    p.set_defaults(func=_build)


def _describe() -> str:
    from atm.config import describe
    from atm.prompting.dataset import BuildConfig

    return describe(BuildConfig)


def _build(args: argparse.Namespace) -> int:
    from atm.artifacts import DatasetDir
    from atm.prompting.dataset import BuildConfig, build_dataset

    overrides = list(args.overrides) + [f"split.{s}" for s in args.split]
    cfg = BuildConfig.load(args.config, overrides=overrides, klines=args.klines, encoder=args.encoder,
                           template=args.template, label=args.label, pairs=args.pairs,
                           fewshot_k=args.fewshot_k, min_margin=args.min_margin,
                           all_worse=args.all_worse, tokenizer=args.tokenizer, out=args.out,
                           overwrite=args.overwrite)
    out = build_dataset(cfg)
    info = DatasetDir(out).card().data
    if args.json:
        print(json.dumps({k: info[k] for k in ("name", "encoder", "label", "pairs", "splits", "rows")}, indent=2))
        return 0
    print(f"built {out}  ({info['encoder']['name']} / {info['template']['name']}, label {info['label']['rule']}, "
          f"pairs {info['pairs']['rule']})")
    for split, d in info["splits"].items():
        lb, cb = d["label_balance"], d["chosen_balance"]
        print(f"  {split:<7} {d['first_open_time'][:16]} .. {d['last_open_time'][:16]}  {d['items']:>8,} items "
              f"{d['pairs']:>8,} pairs  labels B/N/S {lb['BUY']}/{lb['NOOP']}/{lb['SELL']}  "
              f"chosen B/N/S {cb['BUY']}/{cb['NOOP']}/{cb['SELL']}")
    for line in _token_summary(info.get("tokens")):
        print("  " + line)
    drops = info["rows"]["dropped"]
    print("  dropped minutes: " + (", ".join(f"{k}: {v}" for k, v in drops.items()) or "none"))
    if info["pairs"]["dropped"]:
        print("  dropped pairs: " + ", ".join(f"{k}: {v}" for k, v in info["pairs"]["dropped"].items()))
    print(f"  card: {out / 'README.md'}")
    return 0


def _token_summary(tokens: dict | None) -> list[str]:
    """dataset.json's token table in a few lines: per tokenizer, shared prefix + per item = prompt."""
    if not tokens:
        return []
    counters = tokens.get("counters") or {}
    if not counters:
        return [f"tokens: {tokens.get('note') or 'not counted'}"]
    n = sum((tokens.get("sample") or {}).get("counted", {}).values())
    out = [f"tokens per item (p50 of {n} sampled items): shared prefix + per item = whole prompt; context alone"]
    for name, c in counters.items():
        if "error" in c:
            out.append(f"  {name:<10} not counted: {c['error']}")
            continue
        a = c["all"]
        out.append(f"  {name:<10} {a['prefix']:>5} + {a['per_item']['p50']:>5.0f} = {a['prompt']['p50']:>5.0f}   "
                   f"context {a['context']['p50']:.0f}")
    return out


# ---------------------------------------------------------------------------------------------
# atm prompts show
# ---------------------------------------------------------------------------------------------

def _add_show(sub) -> None:
    p = sub.add_parser(
        "show", formatter_class=Formatter,
        help="print rendered prompts with their real token counts",
        description="Print N rendered prompts (every chat message, then the target answer) with their "
                    "token counts. With --family / --model: real counts with that tokenizer and its chat "
                    "template (generation prompt added): the whole prompt, its shared prefix (system, "
                    "k-shot pairs, instruction: the same for every item, evaluated once with prefix "
                    "reuse), the per-item part and the context alone. Without: a chars/4 estimate per "
                    "prompt, and the dataset card's real counts. Reads a built dataset's items, or renders "
                    "straight from a klines parquet with an encoder and template.",
        epilog="""examples:
  atm prompts show --dataset datasets/build/sample-seed --n 3 --family smollm2
  atm prompts show --dataset datasets/build/sample-seed --family qwen2.5,llama-3.2,phi-3,smollm2 --n 1
  atm prompts show --dataset datasets/build/sample-seed --split train --n 2 --model runs/base-tiny
  atm prompts show --klines runs/data/btcusdt-1m.parquet --template compact --n 1 --family smollm2
  atm prompts show --klines runs/data/btcusdt-1m.parquet --encoder natural --template prompts/natural.yaml --n 1
  atm prompts show --klines runs/data/btcusdt-1m.parquet --encoder digits --template seed --n 2 --json
families: qwen2.5, llama-3.2, phi-3, smollm2 (ATM's rebuilt tokenizers: `atm doctor --build` makes them)""")
    p.add_argument("--dataset", default=None, help="a dataset folder built by `atm prompts build`")
    p.add_argument("--split", default="verify", help="split to show from a dataset")
    p.add_argument("--klines", default=None, help="render from this klines parquet instead of a dataset")
    p.add_argument("--encoder", default=None, help="encoder (with --klines; default: the template's)")
    p.add_argument("--template", default="seed", help="template (with --klines): path or name in prompts/")
    p.add_argument("--set", dest="encoder_set", action="append", default=[], metavar="KEY=VALUE",
                   help="encoder setting (with --klines), e.g. --set window=20")
    p.add_argument("--n", type=int, default=3, help="how many prompts")
    p.add_argument("--family", action="append", default=[], metavar="F[,F]",
                   help="count with these model families' tokenizers and chat templates (repeatable)")
    p.add_argument("--model", "--tokenizer", dest="model", action="append", default=[], metavar="DIR",
                   help="count with this HF model / tokenizer dir's tokenizer and chat template (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    p.set_defaults(func=_show)


def _dataset_info(dataset: str) -> dict:
    from atm.artifacts import DatasetDir
    from atm.errors import AtmError

    try:
        return DatasetDir(dataset).card().data
    except (OSError, AtmError):  # a missing or broken card: nothing to show
        return {}


def _samples_from_dataset(args):
    import numpy as np
    import pyarrow.parquet as pq

    from atm.errors import AtmError
    from atm.prompting.dataset import view_file
    from atm.prompting.template import Template

    f = view_file(Path(args.dataset), "items", args.split)
    if not f.exists():
        raise AtmError(f"{f}: not found (is {args.dataset} a dataset built by `atm prompts build`, "
                       f"with a split {args.split!r}?)")
    table = pq.read_table(f, columns=["id", "label", "answer", "prompt", "context"])
    idx = np.linspace(0, table.num_rows - 1, num=min(args.n, table.num_rows)).round().astype(int)
    rows = table.take(idx).to_pylist()
    tpl_yaml = ((_dataset_info(args.dataset).get("template") or {}).get("yaml"))
    template = Template.from_yaml(tpl_yaml, source=f"{args.dataset}/dataset.json") if tpl_yaml else None
    return template, [{"id": r["id"], "label": r["label"], "messages": r["prompt"], "answer": r["answer"],
                       "context": r["context"]} for r in rows]


def _samples_from_klines(args):
    import numpy as np

    from atm.config import parse_override
    from atm.market.klines import read_klines_parquet
    from atm.market.labels import LabelConfig, compute_labels
    from atm.prompting.encoders import get_encoder
    from atm.prompting.template import Template

    template = Template.load(args.template)
    name = args.encoder or template.spec.encoder or "seed-json"
    cfg = dict(template.spec.encoder_config) if template.spec.encoder == name else {}
    cfg.update(dict(parse_override(s) for s in args.encoder_set))
    encoder = get_encoder(name, **cfg)
    df = read_klines_parquet(args.klines)
    labels = compute_labels(df, LabelConfig(rule="seed")).to_numpy(dtype=object)
    lo, hi = max(encoder.lookback, 10), len(df) - 2
    rows = np.linspace(lo, hi, num=min(args.n, max(0, hi - lo + 1))).round().astype(np.int64)
    features = encoder.compute_features(df) if encoder.needs_features else None
    contexts = encoder.encode(df, rows, features)
    changes = encoder.answer_changes(df, rows)
    ot = df["open_time"]
    out = []
    for r, c, ch in zip(rows.tolist(), contexts, changes):
        lab = labels[r] if labels[r] is not None else "NOOP"
        out.append({"id": f"row {r} ({ot.iloc[r].isoformat()})", "label": labels[r],
                    "messages": template.render(c), "answer": template.answer(lab, ch), "context": c})
    return template, out


def _show(args: argparse.Namespace) -> int:
    from atm.errors import AtmError

    if bool(args.dataset) == bool(args.klines):
        raise AtmError("give one of --dataset DIR or --klines FILE.parquet")
    template, samples = _samples_from_dataset(args) if args.dataset else _samples_from_klines(args)
    specs = [f.strip() for x in args.family for f in x.split(",") if f.strip()] + list(args.model)
    counts = _show_counts(template, samples, specs) if specs else {}
    if not specs and args.dataset and not args.json:
        for line in _token_summary(_dataset_info(args.dataset).get("tokens")):
            print(f"dataset card: {line}")
        print("(per prompt below: a chars/4 estimate; --family F or --model DIR counts with a real tokenizer)\n")
    for i, s in enumerate(samples, 1):
        context = s.pop("context", None)
        chars = sum(len(m["content"]) for m in s["messages"])
        per = {name: {k: int(v[i - 1]) if k != "prefix" else v for k, v in c.items()} for name, c in counts.items()}
        if per:
            first = next(iter(per))
            tokens, how = per[first]["prompt"], f"tokens ({first})"
        else:
            tokens, how = -(-chars // 4), "tokens (chars/4 estimate)"
        if args.json:
            extra = {"token_counts": per} if per else {}
            print(json.dumps({**s, "context": context, "chars": chars, "tokens": tokens, "token_count": how, **extra}))
            continue
        print(f"=== prompt {i}/{len(samples)}: {s['id']}  label {s['label']}  "
              f"{len(s['messages'])} messages, {chars} chars, {tokens} {how} ===")
        for name, c in per.items():
            print(f"  {name}: {c['prompt']} tokens = {c['prefix']} shared prefix + {c['per_item']} per item; "
                  f"context alone {c['context']}, answer {c['answer']}")
        for m in s["messages"]:
            print(f"[{m['role']}]")
            print(m["content"])
        print("[answer]")
        print(s["answer"])
        print()
    return 0


def _show_counts(template, samples: list[dict], specs: list[str]) -> dict[str, dict]:
    """Per tokenizer: the shared prefix and each sample's prompt / per-item / context / answer tokens."""
    import numpy as np

    from atm.prompting import tokens as tk

    out = {}
    for spec in specs:
        counter = tk.load_counter(spec)
        prompt = np.asarray([len(counter.prompt_ids(s["messages"])) for s in samples])
        ctx = [s["context"] for s in samples]
        prefix = (tk.prefix_tokens(template, counter, ctx) if template is not None
                  else tk.common_prefix_len([counter.prompt_ids(s["messages"]) for s in samples]))
        out[counter.name] = {"prompt": prompt, "prefix": int(prefix), "per_item": prompt - prefix,
                             "context": counter.count(ctx), "answer": counter.count([s["answer"] for s in samples])}
    return out


VERBS = [_add_build, _add_show]


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for add in VERBS:
        add(sub)
