"""``atm models list|show|rm``: the registered GGUF models (``name:tag``)."""

from __future__ import annotations

import argparse
import json


def _add_home(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", default=None, help="registry root (default: $ATM_HOME or the user data dir)")


def register(parser: argparse.ArgumentParser) -> None:
    from atm.cli import Formatter

    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    p = sub.add_parser("list", help="list registered models", formatter_class=Formatter,
                       epilog="examples:\n  atm models list\n  atm models list --json")
    _add_home(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show one model's manifest", formatter_class=Formatter,
                       epilog="examples:\n  atm models show atm:q8\n  atm models show atm:q4 --json\n"
                              "  atm models show atm:q8 --verify   # recompute the sha256")
    p.add_argument("name", help="registry name, e.g. atm:q8")
    _add_home(p)
    p.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    p.add_argument("--verify", action="store_true", help="recompute the file's sha256 and compare")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("rm", help="remove a model (name:tag, or every tag of a name)",
                       formatter_class=Formatter,
                       epilog="examples:\n  atm models rm atm:q4\n  atm models rm atm   # all tags")
    p.add_argument("name", nargs="+", help="registry name(s)")
    _add_home(p)
    p.set_defaults(func=cmd_rm)
    parser.epilog = "examples:\n  atm models list\n  atm models show atm:q8\n  atm models rm atm:q4"
    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def cmd_list(args: argparse.Namespace) -> int:
    from atm.export.registry import Registry

    reg = Registry(args.home)
    entries = reg.list()
    if args.json:
        print(json.dumps([e.summary() for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no models in {reg.root} (export one with `atm export gguf`)")
        return 0
    print(format_table([e.summary() for e in entries],
                       ["name", "quant", "size_mb", "sha256", "valid_rate", "agree_hf", "created"]))
    unchecked = sorted({e.name for e in entries if not e.fidelity})
    if unchecked:
        print("VALID_RATE / AGREE_HF '-': not measured yet (`atm demo` and `atm export gguf` without --check "
              "skip it); run " + " and ".join(f"`atm export check --name {n}`" for n in unchecked))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from atm.export.registry import Registry

    reg = Registry(args.home)
    entry = reg.resolve(args.name, verify=args.verify)
    d = entry.to_dict()
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    print(f"{entry.ref}  ({entry.quant}, {entry.size / 2**20:.2f} MiB)")
    for key in ("path", "sha256", "created", "context_length", "eos_token"):
        print(f"  {key}: {d[key]}")
    print(f"  llama.cpp: {', '.join(f'{k} {v}' for k, v in entry.llamacpp.items())}")
    print(f"  source: {entry.source.get('model_dir')}")
    print(f"  tensor types: {entry.tensor_types}")
    if entry.fallbacks:
        print(f"  fallback tensors ({len(entry.fallbacks)}): "
              + ", ".join(f"{f['tensor']}->{f['type']}" for f in entry.fallbacks[:8]))
    tc = entry.tokenizer_check
    if tc and tc.get("match_rate") is not None:
        print(f"  tokenization vs HF: {round(tc['match_rate'] * tc['n'])}/{tc['n']} sample prompts identical")
    tpl = entry.template_obj() if entry.template else None
    print(f"  prompt template: {tpl.name + f' ({len(tpl.spec.examples)} k-shot examples)' if tpl else 'none recorded'}")
    print(f"  schema: {entry.schema.get('title', 'yes') if entry.schema else 'none'}")
    if entry.fidelity:
        print("  fidelity (atm export check):")
        for k, v in entry.fidelity.items():
            if not isinstance(v, (dict, list)):
                print(f"    {k}: {v}")
    if args.verify:
        print("  sha256 verified")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from atm.export.registry import Registry

    reg = Registry(args.home)
    for name in args.name:
        for e in reg.remove(name):
            print(f"removed {e.ref} ({e.path})")
    return 0


def format_table(rows: list[dict], cols: list[str]) -> str:
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) if rows else len(c) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    for r in rows:
        lines.append("  ".join(cell(r.get(c)).ljust(widths[c]) for c in cols))
    return "\n".join(lines)
