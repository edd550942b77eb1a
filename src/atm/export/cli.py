"""``atm export gguf|check``: GGUF files in the registry, Modelfiles, and the fidelity table."""

from __future__ import annotations

import argparse
import json
import sys
import warnings


def register(parser: argparse.ArgumentParser) -> None:
    from atm.cli import Formatter

    parser.epilog = ("examples:\n  atm export gguf --model runs/sft-merged --name atm --quant q8_0,q4_k_m\n"
                     "  atm export check --name atm --n 200")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser(
        "gguf", help="convert a merged HF model to GGUF F16, quantize, register name:f16|q8|q4, write Modelfiles",
        formatter_class=Formatter,
        epilog="examples:\n"
               "  atm export gguf --model runs/sft-merged --name atm --quant q8_0,q4_k_m\n"
               "  atm export gguf --model runs/sft-merged --name atm --check --n 100   # + fidelity table\n"
               "  atm export gguf --model runs/sft-merged --name atm --ollama           # + ollama create\n"
               "  ATM_HOME=/tmp/reg atm export gguf --model runs/sft-merged --quant q8")
    p.add_argument("--model", required=True, help="merged HF model dir (from `atm finetune merge`)")
    p.add_argument("--name", default="atm", help="registry name; files become NAME:f16, NAME:q8, NAME:q4")
    p.add_argument("--quant", default="q8_0,q4_k_m",
                   help="comma-separated quant types besides F16 (q8_0, q4_k_m, q5_k_m, q6_k, q4_0; aliases q8, q4)")
    p.add_argument("--modelfiles-dir", default="modelfiles", help="where to write NAME-TAG.Modelfile")
    p.add_argument("--no-modelfiles", action="store_true", help="do not write Modelfiles")
    p.add_argument("--ollama", action="store_true", help="also run `ollama create NAME:TAG` (needs ollama on PATH)")
    p.add_argument("--home", default=None, help="registry root (default: $ATM_HOME or the user data dir)")
    p.add_argument("--threads", type=int, default=None, help="quantization threads (default: all cores)")
    p.add_argument("--pre-tokenizer", default=None, metavar="NAME",
                   help="llama.cpp pre-tokenizer for a byte-level BPE tokenizer its converter does "
                   "not recognise (e.g. qwen2, llama-bpe, smollm); the parity check still runs")
    p.add_argument("--check", action="store_true", help="run `atm export check` afterwards")
    p.add_argument("--n", type=int, default=200, help="prompts for --check")
    p.set_defaults(func=cmd_gguf)

    p = sub.add_parser(
        "check", help="fidelity of each GGUF tag against the merged HF model on the verify prompts",
        formatter_class=Formatter,
        epilog="examples:\n"
               "  atm export check --name atm\n"
               "  atm export check --name atm --n 500 --out runs/fidelity.json\n"
               "  atm export check --name atm --tags q4 --data datasets/build/btc-seed")
    p.add_argument("--name", default="atm", help="registry name whose tags are checked")
    p.add_argument("--n", type=int, default=200, help="number of verify prompts (spread over the split)")
    p.add_argument("--tags", default=None, help="comma-separated tags (default: all of NAME)")
    p.add_argument("--data", default=None, help="dataset dir or parquet (default: the one in atm_model.json)")
    p.add_argument("--model", default=None, help="reference HF model dir (default: the exported one)")
    p.add_argument("--max-tokens", type=int, default=64, help="answer length limit")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: min(cores, 4))")
    p.add_argument("--out", default=None, help="report path (default: $ATM_HOME/reports/NAME-fidelity.json)")
    p.add_argument("--home", default=None, help="registry root (default: $ATM_HOME or the user data dir)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-store", action="store_true", help="do not write the figures into the manifests")
    p.set_defaults(func=cmd_check)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def cmd_gguf(args: argparse.Namespace) -> int:
    from atm.export.gguf import export_gguf
    from atm.export.modelfile import ollama_create, write_modelfiles

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = export_gguf(args.model, name=args.name, quants=args.quant, home=args.home,
                              threads=args.threads, pre_tokenizer=args.pre_tokenizer)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for e in entries:
        t = e.provenance.get("timings", {})
        print(f"{e.ref:<12} {e.quant:<7} {e.size / 2**20:8.2f} MiB  sha256 {e.sha256[:12]}  {e.path}")
    if t:
        print("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    if not args.no_modelfiles:
        paths = write_modelfiles(entries, args.modelfiles_dir)
        for p in paths:
            print(f"wrote {p}")
        if args.ollama:
            for e, p in zip(entries, paths):
                print(ollama_create(e, p).strip() or f"ollama create {e.ref}: done")
    elif args.ollama:
        print("--ollama needs the Modelfiles; drop --no-modelfiles", file=sys.stderr)
        return 2
    if args.check:
        from atm.export.check import fidelity_check, format_report

        rep = fidelity_check(args.name, n=args.n, home=args.home)
        print(format_report(rep))
        print(f"report: {rep['report_path']}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from atm.export.check import fidelity_check, format_report

    tags = [t.strip() for t in args.tags.split(",") if t.strip()] if args.tags else None
    rep = fidelity_check(args.name, n=args.n, home=args.home, data=args.data, model=args.model,
                         tags=tags, max_tokens=args.max_tokens, threads=args.threads, out=args.out,
                         store=not args.no_store)
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
    else:
        print(format_report(rep))
        print(f"report: {rep['report_path']}")
    return 0
