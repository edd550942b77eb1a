"""Merged HF model -> GGUF F16 -> Q8_0 / Q4_K_M, registered as ``name:f16|q8|q4``.

Every file is written under a staging directory next to the registry's model dir and moved into
place only when all requested files were produced and checked, so a failure at any step leaves
neither a half-written file nor a registry whose tags come from different exports.

Conversion uses llama.cpp's own ``convert_hf_to_gguf.py`` from the source that matches the
installed llama-cpp-python (``atm.export.llamacpp``), run as a subprocess with this Python (it
puts its sibling ``gguf-py`` on ``sys.path`` itself). Quantization uses the ``llama-quantize``
binary when one is found, else ``llama_cpp.llama_model_quantize`` (also in a subprocess: the C
library logs to the process's stderr and a crash there must not take ATM down).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from atm.artifacts import ModelCard
from atm.errors import AtmError
from atm.export import llamacpp
from atm.export.chat_template import clean_chat_template, render_jinja
from atm.export.registry import Entry, Registry, check_name, tag_for
from atm.utils import progress, provenance, sha256_file


@dataclass(frozen=True)
class Quant:
    name: str  # lower-case CLI name: q8_0
    gguf_name: str  # llama.cpp's name: Q8_0
    ftype: int  # LLAMA_FTYPE_MOSTLY_*
    expected: frozenset[str]  # tensor types a 2-D weight may get without it being a fallback


QUANTS: dict[str, Quant] = {
    "f16": Quant("f16", "F16", 1, frozenset({"F16"})),
    "q8_0": Quant("q8_0", "Q8_0", 7, frozenset({"Q8_0"})),
    "q6_k": Quant("q6_k", "Q6_K", 18, frozenset({"Q6_K"})),
    "q5_k_m": Quant("q5_k_m", "Q5_K_M", 17, frozenset({"Q5_K", "Q6_K"})),
    "q4_k_m": Quant("q4_k_m", "Q4_K_M", 15, frozenset({"Q4_K", "Q5_K", "Q6_K"})),
    "q4_0": Quant("q4_0", "Q4_0", 2, frozenset({"Q4_0", "Q6_K"})),
}
ALIASES = {"q8": "q8_0", "q4": "q4_k_m", "q5": "q5_k_m", "q6": "q6_k", "fp16": "f16"}


class QuantFallbackWarning(UserWarning):
    """Some tensors could not take the requested type (their dimensions) and got another."""


class TokenizerMismatchWarning(UserWarning):
    """llama.cpp's tokenizer of the GGUF does not reproduce the HF tokenizer on sample prompts."""


def parse_quants(quants: str | Iterable[str]) -> list[Quant]:
    """``"q8_0,q4_k_m"`` or a list -> Quant objects (aliases q8, q4 accepted; f16 is implicit)."""
    items = quants.split(",") if isinstance(quants, str) else list(quants)
    out: list[Quant] = []
    for raw in items:
        key = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if not key or key == "f16":
            continue
        if key not in QUANTS:
            raise AtmError(f"unknown quantization {raw!r}; choose from "
                           f"{', '.join(k for k in QUANTS if k != 'f16')} (aliases: q8, q4)")
        if QUANTS[key] not in out:
            out.append(QUANTS[key])
    return out


# ---------------------------------------------------------------------------------------------
# reading GGUF files

def inspect_gguf(path: str | Path) -> dict[str, Any]:
    """Header facts of a GGUF file; AtmError naming the file when it is truncated or not a GGUF."""
    path = Path(path)
    if not path.is_file():
        raise AtmError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise AtmError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    gguf = llamacpp.import_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure of a damaged header
        raise AtmError(f"{path}: damaged or truncated GGUF file ({type(exc).__name__}: {exc}); "
                       "re-export it") from None
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise AtmError(f"{path}: truncated GGUF file: tensor data needs {end} bytes, the file has "
                       f"{size}; re-export it")

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:  # noqa: BLE001
            return None

    arch = field("general.architecture")
    types: dict[str, int] = {}
    tensors = []
    for t in reader.tensors:
        tname = t.tensor_type.name
        types[tname] = types.get(tname, 0) + 1
        tensors.append({"name": t.name, "type": tname, "shape": [int(x) for x in t.shape]})
    ftype = field("general.file_type")
    return {
        "path": str(path), "size": size, "architecture": arch,
        "file_type": gguf.LlamaFileType(ftype).name.replace("MOSTLY_", "") if ftype is not None else None,
        "context_length": field(f"{arch}.context_length") if arch else None,
        "chat_template": field("tokenizer.chat_template"),
        "n_tensors": len(reader.tensors), "tensor_types": types, "tensors": tensors,
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "add_bos_token": field("tokenizer.ggml.add_bos_token"),
        "tokenizer_model": field("tokenizer.ggml.model"),
        "pre_tokenizer": field("tokenizer.ggml.pre"),
        "name": field("general.name"),
    }


def find_fallbacks(info: dict[str, Any], quant: Quant) -> list[dict[str, Any]]:
    """Matrices whose type is outside what ``quant`` gives (llama.cpp fell back for their shape)."""
    out = []
    for t in info["tensors"]:
        if len(t["shape"]) < 2 or t["type"] in quant.expected:
            continue
        out.append({"tensor": t["name"], "shape": t["shape"], "type": t["type"],
                    "requested": quant.gguf_name})
    return out


# ---------------------------------------------------------------------------------------------
# conversion

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AtmError(f"{path}: not valid JSON ({exc})") from None


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise AtmError(f"{model_dir}: model directory not found (expected a merged HF model, e.g. "
                       "runs/X-merged from `atm finetune merge`)")
    if not (model_dir / "config.json").is_file():
        raise AtmError(f"{model_dir}: no config.json; not a Hugging Face model directory")
    if not any(model_dir.glob("*.safetensors")):
        hint = " (a LoRA adapter? merge it first: `atm finetune merge`)" \
            if (model_dir / "adapter_config.json").exists() else ""
        raise AtmError(f"{model_dir}: no *.safetensors weights{hint}")


def _stage_model_dir(model_dir: Path, stage: Path) -> dict[str, bool]:
    """Symlink the model's files into ``stage`` with the chat template cleaned for GGUF readers;
    returns the special-token flags the GGUF must carry (see :func:`_special_token_flags`).

    transformers' ``{% generation %}`` markers (for assistant-only loss) are not standard Jinja:
    llama.cpp's engine and llama-cpp-python >= 0.3.36 skip them, but other readers of a GGUF's
    template (older bindings, plain jinja2) fail on them. They do not change the rendered text, so
    they are removed here; the model directory itself is never modified.
    """
    flags: dict[str, bool] = {}
    for p in model_dir.iterdir():
        if p.name in ("tokenizer_config.json", "chat_template.jinja", "chat_template.json"):
            continue
        (stage / p.name).symlink_to(p.resolve())
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        conf = _read_json(tc)
        if isinstance(conf.get("chat_template"), str):
            conf["chat_template"] = clean_chat_template(conf["chat_template"])
        flags = _special_token_flags(model_dir, conf)
        conf.update(flags)
        (stage / tc.name).write_text(json.dumps(conf, indent=2))
    cj = model_dir / "chat_template.jinja"
    if cj.is_file():
        (stage / cj.name).write_text(clean_chat_template(cj.read_text()))
    cjs = model_dir / "chat_template.json"
    if cjs.is_file():
        data = _read_json(cjs)
        if isinstance(data.get("chat_template"), str):
            data["chat_template"] = clean_chat_template(data["chat_template"])
        (stage / cjs.name).write_text(json.dumps(data))
    return flags


def _enforce_special_token_flags(gguf_path: Path, flags: dict[str, bool]) -> dict[str, bool]:
    """Write ``flags`` into the converted file where the converter chose otherwise.

    The converter lets tokenizer.json's post-processor win over tokenizer_config.json: Llama-3's
    post-processor adds ``<|begin_of_text|>``, so its GGUF says add_bos even though the chat
    template writes that token itself, and llama-server then starts every chat prompt with two
    BOS tokens (HF's ``apply_chat_template`` has one). Returns what was changed."""
    keys = {"add_bos_token": "tokenizer.ggml.add_bos_token", "add_eos_token": "tokenizer.ggml.add_eos_token"}
    gguf = llamacpp.import_gguf()
    reader = gguf.GGUFReader(str(gguf_path), "r+")
    changed = {}
    for flag, key in keys.items():
        f = reader.fields.get(key)
        if flag in flags and f is not None and bool(f.contents()) != flags[flag]:
            f.parts[f.data[0]][0] = flags[flag]
            changed[flag] = flags[flag]
    reader.data.flush()
    del reader
    return changed


def _special_token_flags(model_dir: Path, conf: dict[str, Any]) -> dict[str, bool]:
    """``add_bos_token`` / ``add_eos_token`` for the GGUF, made explicit.

    When tokenizer_config.json does not say (transformers 5 no longer writes the flags), llama.cpp
    assumes a SentencePiece vocab adds bos, while the HF tokenizer may not; and a chat template
    that writes ``{{ bos_token }}`` itself would then get a second bos in llama-server (it renders
    the template, then tokenizes with special tokens added). The GGUF adds bos only if the HF
    tokenizer adds it to plain text and the chat template does not already write it.
    """
    tj = model_dir / "tokenizer.json"
    if not tj.is_file():
        return {}
    try:
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(tj))
    except Exception:  # noqa: BLE001 - an exotic tokenizer: leave the converter's defaults
        return {}
    bos, eos = _token_text(conf.get("bos_token")), _token_text(conf.get("eos_token"))
    ids = tok.encode("a", add_special_tokens=True).ids
    bos_id = tok.token_to_id(bos) if bos else None
    eos_id = tok.token_to_id(eos) if eos else None
    flags = {}
    if "add_bos_token" not in conf:
        adds_bos = bos_id is not None and bool(ids) and ids[0] == bos_id
        template = conf.get("chat_template") if isinstance(conf.get("chat_template"), str) \
            else hf_chat_template(model_dir)
        if adds_bos and template and bos:
            try:
                rendered = render_jinja(clean_chat_template(template), [{"role": "user", "content": "a"}],
                                         True, bos, eos or "")
                adds_bos = not rendered.startswith(bos)
            except Exception:  # noqa: BLE001
                pass
        flags["add_bos_token"] = adds_bos
    if "add_eos_token" not in conf:
        flags["add_eos_token"] = eos_id is not None and bool(ids) and ids[-1] == eos_id
    return flags


def hf_chat_template(model_dir: Path) -> str | None:
    """The chat template the HF tokenizer uses (chat_template.jinja wins, as in transformers 5)."""
    cj = model_dir / "chat_template.jinja"
    if cj.is_file():
        return cj.read_text()
    tc = model_dir / "tokenizer_config.json"
    if tc.is_file():
        t = _read_json(tc).get("chat_template")
        if isinstance(t, str):
            return t
    return None


def _tail(text: str, n: int = 15) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and "Writing:" not in ln]
    return "\n".join(lines[-n:])


# ---------------------------------------------------------------------------------------------
# the converter's pre-tokenizer check

@functools.lru_cache(maxsize=4)
def _known_pre_tokenizers(source: str) -> tuple[str, dict[str, str]]:
    """(the converter's test text, {hash of its ids: llama.cpp pre-tokenizer name}), read from
    ``get_vocab_base_pre`` in the converter's own source, so ATM checks against exactly the list
    of the llama.cpp it converts with."""
    import ast

    tree = ast.parse(Path(source).read_text(encoding="utf-8"))
    func = next((n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
                 and n.name == "get_vocab_base_pre"), None)
    if func is None:
        raise AtmError(f"{source}: no get_vocab_base_pre() (an unexpected llama.cpp version)")
    chktxt, known = None, {}
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and any(
                isinstance(t, ast.Name) and t.id == "chktxt" for t in node.targets):
            chktxt = node.value.value
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(
                node.test.left, ast.Name) and node.test.left.id == "chkhsh":
            value = node.test.comparators[0]
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) and any(
                        isinstance(t, ast.Name) and t.id == "res" for t in stmt.targets):
                    known[value.value] = stmt.value.value
    if not chktxt or not known:
        raise AtmError(f"{source}: could not read the known pre-tokenizers from get_vocab_base_pre()")
    return chktxt, known


def _converter_base_source() -> Path:
    src = llamacpp.llamacpp_source()
    base = src / "conversion" / "base.py"
    return base if base.is_file() else src / "convert_hf_to_gguf.py"


def is_byte_level_bpe(model_dir: Path) -> bool:
    """A GPT-2-style byte-level BPE (Qwen, Llama-3, SmolLM2): the vocabularies llama.cpp's
    converter identifies by hashing the ids of a test text. Byte-fallback BPEs (Llama-2 style,
    ATM's tiny base) and SentencePiece models go another way and need no such check."""
    tj = Path(model_dir) / "tokenizer.json"
    if not tj.is_file():
        return False
    model = _read_json(tj).get("model") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback")


def detect_pre_tokenizer(model_dir: str | Path) -> dict[str, Any]:
    """What llama.cpp's converter will call this tokenizer's pre-tokenizer: the same hash of the
    same test text through ``AutoTokenizer`` (bos included, as the converter encodes it).
    ``{"hash", "name"}``; ``name`` is None when the converter does not know the tokenizer."""
    from atm.errors import require

    transformers = require("transformers", "train")
    chktxt, known = _known_pre_tokenizers(str(_converter_base_source()))
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    import hashlib

    chkhsh = hashlib.sha256(str(tok.encode(chktxt)).encode()).hexdigest()
    return {"hash": chkhsh, "name": known.get(chkhsh)}


def known_pre_tokenizer_names() -> list[str]:
    _, known = _known_pre_tokenizers(str(_converter_base_source()))
    return sorted(set(known.values()))


def _unrecognised_pre_tokenizer(model_dir: Path, chkhsh: str) -> AtmError:
    names = known_pre_tokenizer_names()
    common = [n for n in ("llama-bpe", "qwen2", "smollm", "gpt-2", "deepseek-llm") if n in names]
    return AtmError(
        f"{model_dir}: llama.cpp's converter does not recognise this tokenizer's pre-tokenizer "
        f"(its test text hashes to {chkhsh}, which is not among the {len(names)} tokenizers "
        f"llama.cpp {llamacpp.llamacpp_version() or ''} knows; converting would fail). If this "
        "tokenizer splits text exactly like one llama.cpp implements (e.g. a fine-tune whose "
        "tokenizer.json gained a token), name it: `atm export gguf --pre-tokenizer NAME` "
        f"(e.g. {', '.join(common)}; all: {', '.join(names)}); then check the export's "
        "tokenization parity (recorded in the manifest). Otherwise convert with a newer llama.cpp: "
        "ATM_LLAMA_CPP_DIR=/path/to/llama.cpp")


# A converter run whose get_vocab_base_pre() answers a given name: llama.cpp's own escape hatch is
# editing the script; this does the same for one run, without touching the cached source.
_CONVERT_WITH_PRE = """
import os, runpy, sys
script, pre = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
here = os.path.dirname(os.path.abspath(script))
sys.path.insert(0, here)
sys.path.insert(1, os.path.join(here, "gguf-py"))
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
runpy.run_path(script, run_name="__main__")
"""


def converter_model_name(model_dir: Path, config: dict[str, Any]) -> str | None:
    """``--model-name`` for the converter where the name changes how llama.cpp tokenizes.

    llama.cpp strips the whitespace after Phi-3's special tokens (as Phi-3's tokenizer.json does
    with ``rstrip``) only when the GGUF's ``general.name`` contains "phi-3" or "phi3"; a fine-tuned
    Phi-3 in ``runs/orpo-merged`` would otherwise tokenize every chat prompt differently from HF."""
    if config.get("model_type") == "phi3" and (model_dir / "tokenizer.model").is_file():
        name = model_dir.name
        return name if re.search(r"phi-?3", name, re.I) else f"Phi-3 {name}"
    return None


def convert_hf_to_gguf(model_dir: str | Path, out: str | Path, outtype: str = "f16",
                       pre_tokenizer: str | None = None) -> Path:
    """Run llama.cpp's converter on ``model_dir``; ``out`` appears only if it succeeds.

    A byte-level BPE tokenizer the converter would not recognise is refused up front with what to
    do (:func:`detect_pre_tokenizer`); ``pre_tokenizer`` names llama.cpp's pre-tokenizer for it."""
    model_dir, out = Path(model_dir).resolve(), Path(out)
    check_model_dir(model_dir)
    script = llamacpp.converter_script()
    config = _read_json(model_dir / "config.json")
    if pre_tokenizer is not None:
        names = known_pre_tokenizer_names()
        if pre_tokenizer not in names:
            raise AtmError(f"--pre-tokenizer {pre_tokenizer!r} is not one llama.cpp knows: "
                           f"{', '.join(names)}")
    elif is_byte_level_bpe(model_dir):
        found = detect_pre_tokenizer(model_dir)
        if found["name"] is None:
            raise _unrecognised_pre_tokenizer(model_dir, found["hash"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".atm-convert-", dir=out.parent) as tmpd:
        stage = Path(tmpd) / "model"
        stage.mkdir()
        flags = _stage_model_dir(model_dir, stage)
        tmp_out = Path(tmpd) / "out.gguf"
        env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
        env.setdefault("OMP_NUM_THREADS", "1")
        args = [str(stage), "--outfile", str(tmp_out), "--outtype", outtype]
        name = converter_model_name(model_dir, config)
        if name:
            args += ["--model-name", name]
        if pre_tokenizer is not None:
            cmd = [sys.executable, "-c", _CONVERT_WITH_PRE, str(script), pre_tokenizer, *args]
        else:
            cmd = [sys.executable, str(script), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not tmp_out.is_file():
            raise AtmError(f"converting {model_dir} to GGUF failed (llama.cpp convert_hf_to_gguf.py, "
                           f"exit {proc.returncode}); no file was written. Its last lines:\n"
                           f"{_tail(proc.stderr + proc.stdout)}")
        _enforce_special_token_flags(tmp_out, flags)
        inspect_gguf(tmp_out)
        os.replace(tmp_out, out)
    return out


@contextlib.contextmanager
def quiet_stderr():
    """Silence C-level writes to fd 2 (llama.cpp logs) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def fix_bpe_scores(gguf_path: str | Path, model_dir: str | Path) -> dict[str, Any] | None:
    """Give a converted Llama-vocab GGUF the merge ranks of its HF BPE tokenizer as token scores.

    Why: for a ``tokenizers`` BPE with byte fallback (the tiny base, and HF-only Llama-family
    tokenizers without a ``tokenizer.model``), llama.cpp's converter writes the vocab as
    SentencePiece ("llama") with every score -1000. llama.cpp's SPM tokenizer merges the adjacent
    pair whose result scores highest, so with equal scores it merges left to right and tokenizes
    differently from the model's training tokenizer (0 of 50 prompts agreed here). Scoring each
    token by minus the rank of the merge that created it makes SPM merge in BPE order (50 of 50).
    Edits the file in place (it is a staged temp file); returns what was done, or None when the
    file does not need it.
    """
    tj_path = Path(model_dir) / "tokenizer.json"
    if not tj_path.is_file():
        return None
    tj = _read_json(tj_path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    gguf = llamacpp.import_gguf()
    import numpy as np

    reader = gguf.GGUFReader(str(gguf_path), "r+")
    kind = reader.fields.get("tokenizer.ggml.model")
    scores_field = reader.fields.get("tokenizer.ggml.scores")
    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    if kind is None or kind.contents() != "llama" or scores_field is None or tokens_field is None:
        return None
    current = np.array([scores_field.parts[i][0] for i in scores_field.data], dtype=np.float32)
    if len(current) and current.min() != current.max():
        return None  # real scores (a sentencepiece model): leave them
    token_ids = {t: i for i, t in enumerate(tokens_field.contents())}
    new = np.zeros(len(current), dtype=np.float32)
    n_set = 0
    for rank, merge in enumerate(model.get("merges") or []):
        a, b = merge if isinstance(merge, (list, tuple)) else merge.split(" ", 1)
        tid = token_ids.get(a + b)
        if tid is not None and new[tid] == 0:
            new[tid] = -float(rank + 1)
            n_set += 1
    for i, idx in enumerate(scores_field.data):
        scores_field.parts[idx][0] = new[i]
    reader.data.flush()
    del reader
    return {"scores_from_merges": n_set, "vocab": len(current)}


def tokenization_check(model_dir: str | Path, gguf_path: str | Path, texts: Sequence[str]) -> dict[str, Any]:
    """Compare the HF tokenizer (``tokenizer.json``) with llama.cpp's tokenizer of the GGUF on
    ``texts`` (rendered prompts, special tokens parsed): the share tokenized identically."""
    from atm.errors import require

    tokenizers = require("tokenizers", "train")
    llama_cpp = require("llama_cpp", "export", "llama-cpp-python")
    hf = tokenizers.Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    with quiet_stderr():  # a vocab-only load still logs a context warning from C
        llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        same = 0
        first = None
        for t in texts:
            a = hf.encode(t, add_special_tokens=False).ids
            b = llm.tokenize(t.encode(), add_bos=True, special=True)
            if a == b:
                same += 1
            elif first is None:
                k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                first = {"text": t[:200], "at_token": k, "hf": a[k:k + 8], "gguf": b[k:k + 8]}
    finally:
        if hasattr(llm, "close"):
            llm.close()
        del llm
    return {"n": len(texts), "match_rate": same / len(texts) if texts else None, "first_mismatch": first}


def sample_prompt_texts(model_dir: Path, card: ModelCard, n: int = 50) -> list[str]:
    """Rendered prompts to check tokenization on: verify prompts of the recorded dataset, else the
    template rendered on a synthetic context, else a few fixed strings."""
    template = hf_chat_template(model_dir)
    tc = _read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").is_file() else {}
    bos, eos = _token_text(tc.get("bos_token")) or "", _token_text(tc.get("eos_token")) or ""
    convs: list[list[dict[str, str]]] = []
    try:
        from atm.export.check import load_verify_prompts

        data_dir = card.dataset_dir
        if data_dir is not None:
            convs = [p["messages"] for p in load_verify_prompts(data_dir, n)]
    except AtmError:
        convs = []
    if not convs and card.template:
        from atm.prompting.template import Template

        tpl = Template.from_yaml(card.template)
        convs = [tpl.render(f'[{{"open_change": "{i - 25}.{i:08d}", "volume": "{i * 3.7:.8f}"}}]') for i in range(n)]
    if not convs:
        convs = [[{"role": "user", "content": f"Price {i * 17.25:.8f} and volume {i}; advise."}] for i in range(n)]
    if not template:
        return ["\n".join(m["content"] for m in c) for c in convs]
    return [render_jinja(clean_chat_template(template), c, True, bos, eos) for c in convs]


# ---------------------------------------------------------------------------------------------
# quantization

_PY_QUANTIZE = """
import ctypes, sys
import llama_cpp
src, dst, ftype, nthread = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = ftype
p.nthread = nthread
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
sys.exit(0 if rc == 0 else 3)
"""


def quantize(src: str | Path, dst: str | Path, quant: Quant | str, threads: int | None = None,
             tool: str | None = "auto") -> dict[str, Any]:
    """Quantize GGUF ``src`` to ``dst`` (written atomically). Returns {"engine", "seconds", "log"}."""
    q = quant if isinstance(quant, Quant) else parse_quants([quant])[0]
    src, dst = Path(src), Path(dst)
    threads = threads or os.cpu_count() or 1
    binary = llamacpp.find_tool("llama-quantize") if tool == "auto" else (Path(tool) if tool else None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    t0 = time.time()
    try:
        if binary is not None:
            engine = str(binary)
            cmd = [str(binary), str(src), str(tmp), q.gguf_name, str(threads)]
        else:
            import importlib.util

            if importlib.util.find_spec("llama_cpp") is None:  # no import: it is used in a subprocess
                from atm.errors import require

                require("llama_cpp", "export", "llama-cpp-python")
            engine = "llama_cpp.llama_model_quantize"
            cmd = [sys.executable, "-c", _PY_QUANTIZE, str(src), str(tmp), str(q.ftype), str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0 or tmp.stat().st_size == 0:
            raise AtmError(f"quantizing {src.name} to {q.gguf_name} failed ({engine}, exit "
                           f"{proc.returncode}); no file was written. Last lines:\n{_tail(log)}")
        inspect_gguf(tmp)
        _readable(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"engine": engine, "seconds": round(time.time() - t0, 3), "log": log}


# ---------------------------------------------------------------------------------------------
# the whole export

def read_atm_model(model_dir: Path) -> ModelCard:
    """``atm_model.json`` written by ``atm finetune merge`` (template, schema, encoder, configs)."""
    card = ModelCard.read(model_dir) if model_dir.is_dir() else None
    if card is None:
        warnings.warn(f"{model_dir} has no atm_model.json (not made by `atm finetune merge`): the "
                      "registry entry will carry no prompt template; the advice schema defaults to "
                      "prompts/advice.schema.json", stacklevel=3)
        return ModelCard()
    return card


def _schema_of(card: ModelCard) -> dict[str, Any]:
    """The schema the registry records: the model's answer contract's (``resolve_contract``: the
    saved schema, else the template's answer order, else the default)."""
    from atm.prompting.contract import resolve_contract

    return resolve_contract(card).schema


def export_gguf(model_dir: str | Path, name: str = "atm", quants: Sequence[str] | str = ("q8_0", "q4_k_m"),
                home: str | Path | None = None, threads: int | None = None,
                quantize_tool: str | None = "auto", check_tokenizer: bool = True,
                pre_tokenizer: str | None = None) -> list[Entry]:
    """Convert ``model_dir`` to F16 GGUF, quantize, and register ``name:f16`` + one tag per quant.

    Returns the entries (f16 first). Tensors that llama.cpp had to give a fallback type (their
    dimensions do not fit the block size) are named in a ``QuantFallbackWarning`` and recorded in
    the manifest (``fallbacks``).
    """
    model_dir = Path(model_dir).expanduser().resolve()
    check_name(name)
    qlist = parse_quants(quants)
    check_model_dir(model_dir)
    reg = Registry(home)
    meta = read_atm_model(model_dir)
    config = _read_json(model_dir / "config.json")
    tok_conf = _read_json(model_dir / "tokenizer_config.json") \
        if (model_dir / "tokenizer_config.json").is_file() else {}
    hf_template = hf_chat_template(model_dir)
    versions = llamacpp.version_info()
    mdir = reg.model_dir(name)
    mdir.parent.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    steps = 1 + len(qlist)
    with tempfile.TemporaryDirectory(prefix=f".export-{name}-", dir=mdir.parent) as stage_dir:
        stage = Path(stage_dir)
        bar = progress(total=steps, desc=f"export {name}", unit="file")
        try:
            t0 = time.time()
            bar.set_postfix_str("convert F16")
            f16 = convert_hf_to_gguf(model_dir, stage / "f16.gguf", "f16", pre_tokenizer=pre_tokenizer)
            vocab_fix = fix_bpe_scores(f16, model_dir)
            timings["convert_f16_s"] = round(time.time() - t0, 3)
            bar.update(1)
            files: list[tuple[Quant, Path, dict[str, Any]]] = [(QUANTS["f16"], f16, {"engine": "convert_hf_to_gguf.py"})]
            for q in qlist:
                bar.set_postfix_str(f"quantize {q.gguf_name}")
                dst = stage / f"{tag_for(q.name)}.gguf"
                info = quantize(f16, dst, q, threads=threads, tool=quantize_tool)
                timings[f"quantize_{q.name}_s"] = info["seconds"]
                files.append((q, dst, info))
                bar.update(1)
        finally:
            bar.close()

        infos = {q.name: inspect_gguf(p) for q, p, _ in files}
        tok_check = None
        if check_tokenizer and (model_dir / "tokenizer.json").is_file():
            tok_check = tokenization_check(model_dir, f16, sample_prompt_texts(model_dir, meta))
            tok_check["vocab_fix"] = vocab_fix
            tok_check["gguf_tokenizer"] = {k: infos["f16"][k] for k in ("tokenizer_model", "pre_tokenizer", "name")}
            if pre_tokenizer:
                tok_check["pre_tokenizer_override"] = pre_tokenizer
            if tok_check["match_rate"] is not None and tok_check["match_rate"] < 1.0:
                warnings.warn(f"{name}: llama.cpp tokenizes {1 - tok_check['match_rate']:.0%} of "
                              f"{tok_check['n']} sample prompts differently from the HF tokenizer "
                              f"(first difference: {tok_check['first_mismatch']}); served answers may "
                              "differ from the HF model's", TokenizerMismatchWarning, stacklevel=2)
        gguf_template = infos["f16"]["chat_template"]
        if hf_template and not gguf_template:
            raise AtmError(f"{model_dir}: the chat template did not travel into the GGUF "
                           "(tokenizer.chat_template missing); nothing was registered")
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        source = {"model_dir": str(model_dir), "config": config,
                  "atm_model": {k: v for k, v in meta.to_dict().items() if k not in ("template", "schema")}}
        entries: list[Entry] = []
        for q, p, qinfo in files:
            info = infos[q.name]
            fallbacks = find_fallbacks(info, q)
            if fallbacks:
                names = ", ".join(f"{f['tensor']} {tuple(f['shape'])} -> {f['type']}" for f in fallbacks[:12])
                more = f" and {len(fallbacks) - 12} more" if len(fallbacks) > 12 else ""
                warnings.warn(f"{name}:{tag_for(q.name)}: {len(fallbacks)} tensor(s) could not be "
                              f"quantized to {q.gguf_name} (dimensions not divisible by the block "
                              f"size) and used a fallback type: {names}{more}",
                              QuantFallbackWarning, stacklevel=2)
            tag = tag_for(q.name)
            final = reg.gguf_path(name, tag)
            entries.append(Entry(
                name=name, tag=tag, path=str(final), sha256=sha256_file(p), size=p.stat().st_size,
                quant=q.gguf_name, template=meta.template, schema=_schema_of(meta),
                chat_template=gguf_template, context_length=info.get("context_length")
                or config.get("max_position_embeddings"),
                eos_token=_token_text(tok_conf.get("eos_token")),
                bos_token=_token_text(tok_conf.get("bos_token")),
                add_bos_token=info.get("add_bos_token"),
                source=source, llamacpp=versions, tensor_types=info["tensor_types"],
                fallbacks=fallbacks, tokenizer_check=tok_check, created=created,
                provenance=provenance({"model_dir": str(model_dir), "name": name,
                                       "quants": [x.name for x in qlist]},
                                      engine=qinfo.get("engine"), timings=timings)))
        # Everything is produced and checked: move the files in, then write the manifests.
        mdir.mkdir(parents=True, exist_ok=True)
        for (q, p, _), e in zip(files, entries):
            os.replace(p, e.path)
            reg.add(e)
            _readable(reg.manifest_path(e.name, e.tag))
    return entries


def _readable(path: Path) -> None:
    """Temp files are created 0600; give the final file the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _token_text(tok: Any) -> str | None:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict):
        return tok.get("content")
    return None


def copy_into_registry(gguf_path: str | Path, name: str, tag: str, home: str | Path | None = None,
                       **fields: Any) -> Entry:
    """Register an existing GGUF file (copied into the registry) under ``name:tag``."""
    src = Path(gguf_path)
    info = inspect_gguf(src)
    reg = Registry(home)
    dst = reg.gguf_path(name, tag)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        _readable(Path(tmp))
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
    entry = Entry(name=name, tag=tag, path=str(dst), sha256=sha256_file(dst), size=dst.stat().st_size,
                  quant=info["file_type"] or "unknown", chat_template=info["chat_template"],
                  context_length=info["context_length"], llamacpp=llamacpp.version_info(),
                  tensor_types=info["tensor_types"],
                  created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  provenance=provenance({"source_gguf": str(src)}), **fields)
    return reg.add(entry)
