"""The ``atm`` command line: ``atm <stage> <verb>``, plus the ``atm-eval`` entry point.

Stage commands live next to their code (``atm/<stage>/cli.py``) and are imported lazily: only
the module of the command being run is imported, so ``atm --help`` and ``atm data ...`` never pay
for torch or llama.cpp. Each module exposes ``register(parser)`` which adds its verbs to the
stage's own parser and sets ``func`` (called with the parsed args; returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

from atm import __version__
from atm.errors import AtmError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("atm.market.cli", "download Binance klines and build a checked parquet (+ labels, features, splits)"),
    "prompts": ("atm.prompting.cli", "render market prompts and build preference-pair datasets"),
    "finetune": ("atm.finetune.cli", "tiny base, SFT / ORPO / DAPO with LoRA, merge"),
    "export": ("atm.export.cli", "convert to GGUF, quantize, write Modelfiles, check fidelity"),
    "models": ("atm.export.registry_cli", "list / show / remove registered models (name:tag)"),
    "serve": ("atm.serve.cli", "serve models through an OpenAI- and Ollama-compatible API"),
    "chat": ("atm.serve.chat_cli", "open the Gradio chat over market state (a client of `atm serve`)"),
    "eval": ("atm.eval.cli", "evaluate models against baselines and classic models (same as atm-eval)"),
    "demo": ("atm.demo", "run the whole path on the shipped sample data"),
    "doctor": ("atm.doctor", "report which tools (llama.cpp, llama-server, browser, Go, GPU) are found"),
}

EPILOG = """examples:
  atm data build --raw datasets/samples/binance --symbol BTCUSDT
  atm demo
  atm-eval run --model atm:q8 --model baseline:majority
run `atm COMMAND --help` for the verbs of each stage."""


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written; ``(default: X)`` added only where the help does not already say
    its default and there is one worth showing (not None, not an empty list, not a store_true's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, [], False) \
                or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser(wanted: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atm", description="ATM: market advice from small fine-tuned LLMs, measured honestly.",
        epilog=EPILOG, formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"atm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=Formatter)
        if name == wanted:
            mod = importlib.import_module(module)
            mod.register(p)
            if not p.epilog:
                p.epilog = _examples_from_verbs(p)
    return parser


def verb_parsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:  # argparse keeps subparsers here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _examples_from_verbs(p: argparse.ArgumentParser) -> str | None:
    """A stage's help lists the first example of each of its verbs."""
    lines = []
    for verb in verb_parsers(p).values():
        epilog = verb.epilog or ""
        body = epilog.split("examples:", 1)[1] if "examples:" in epilog else ""
        first = next((ln.strip() for ln in body.splitlines() if ln.strip()), None)
        if first:
            lines.append("  " + first)
    return "examples:\n" + "\n".join(lines) if lines else None


def run(argv: list[str] | None = None, prog_command: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if prog_command:
        argv = [prog_command, *argv]
    wanted = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(wanted if wanted in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unrecognized(parser, argv, extra)
    func: Callable | None = getattr(args, "func", None)
    if func is None:
        if args.command:
            parser.parse_args([args.command, "--help"])
        parser.print_help()
        return 0
    from atm import logs

    logs.configure()  # library code logs; the command shows it (atm.logs)
    try:
        rc = func(args)
    except AtmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `atm ... | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the exit-time flush does not raise again
        return 0
    return int(rc or 0)


def _unrecognized(parser: argparse.ArgumentParser, argv: list[str], extra: list[str]) -> None:
    """Unknown arguments: the usage of the (sub)command they were given to, with a "did you mean"
    for a mistyped flag (argparse would print the top-level ``atm`` usage). Exits 2."""
    import difflib

    node = parser
    for tok in argv:  # the deepest command/verb named on the line
        if not tok.startswith("-"):
            nxt = verb_parsers(node).get(tok)
            if nxt is not None:
                node = nxt
    flags = [o for a in node._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for tok in extra:
        if tok.startswith("--"):
            close = difflib.get_close_matches(tok.split("=", 1)[0], flags, n=1, cutoff=0.6)
            if close:
                hints.append(f"{tok.split('=', 1)[0]} -> {close[0]}")
    msg = f"unrecognized arguments: {' '.join(extra)}"
    if hints:
        msg += f" (did you mean {', '.join(hints)}?)"
    node.error(msg)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


def eval_main(argv: list[str] | None = None) -> None:
    """``atm-eval ...`` is ``atm eval ...``."""
    sys.exit(run(argv, prog_command="eval"))


def add_config_args(p: argparse.ArgumentParser, recipe_name: str = "--config") -> None:
    """The standard pair: a YAML file plus repeatable ``--set key=value`` overrides."""
    p.add_argument(recipe_name, dest="config", default=None, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set key=value")


if os.environ.get("ATM_DEBUG") == "1":  # pragma: no cover
    import faulthandler

    faulthandler.enable()
