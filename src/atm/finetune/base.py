"""Base models: an offline tiny Llama built from a dataset, or any HF causal LM (safetensors only).

The tiny base exists so the whole path (train -> merge -> GGUF -> serve -> eval) runs with no network
and in minutes on 2 CPU cores. Its shape is chosen for the later stages, not for quality:

- The tokenizer is a `tokenizers` BPE with ``byte_fallback`` and a Llama-2 style normalizer/decoder
  (prepend "▁", spaces -> "▁"), because llama.cpp's converter reads that as a Llama vocab unpatched
  (a GPT-2 ByteLevel BPE fails there: "BPE pre-tokenizer was not recognized").
- Digits are split one per token: prices and changes then tokenize the same way everywhere and the
  answer JSON stays short (~25 tokens) and easy to constrain.
- Roles are special tokens and the template has no text between a role token and its content, so the
  prompt rendered with ``add_generation_prompt`` is an exact token prefix of the training sequence.
- The assistant turn ends exactly at eos (TRL would append a second eos otherwise) and is wrapped in
  ``{% generation %}`` so SFT can train on assistant tokens only.
- Hidden size and FFN are multiples of 256 so llama.cpp's K-quants apply to every matrix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field

from atm.artifacts import DatasetDir
from atm.config import AtmConfig
from atm.errors import AtmError, DataError, require

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
ROLES = ("system", "user", "assistant")

# Jinja chat template (transformers and llama.cpp's minja both run it). The assistant content and the
# eos sit inside {% generation %} so `assistant_only_loss` trains exactly the answer plus its stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class TinyBaseConfig(AtmConfig):
    """Shape of the offline tiny base (tokenizer + LlamaConfig)."""

    vocab_size: int = Field(1024, description="BPE vocab size asked of the trainer (it may stop "
                            "earlier when the text has no more merges); the model's embedding rows "
                            "always equal the tokenizer's real size.")
    min_frequency: int = Field(2, description="Minimum pair frequency for a BPE merge.")
    max_texts: int = Field(20000, description="At most this many dataset messages feed the tokenizer "
                           "trainer (the rest add nothing but time).")
    hidden_size: int = Field(256, description="Model width; keep a multiple of 256 for K-quants.")
    intermediate_size: int = Field(768, description="FFN width; keep a multiple of 256 for K-quants.")
    num_hidden_layers: int = Field(6, description="Decoder layers.")
    num_attention_heads: int = Field(8, description="Attention heads (head dim = hidden/heads).")
    num_key_value_heads: int = Field(4, description="KV heads (grouped-query attention).")
    max_position_embeddings: int = Field(2048, description="Context length the model is built for.")
    rope_theta: float = Field(10000.0, description="RoPE base frequency.")
    tie_word_embeddings: bool = Field(False, description="Share input and output embeddings (off: "
                                      "llama.cpp's Llama path expects a separate output matrix).")
    seed: int = Field(0, description="Seed of the random initialisation.")


def _iter_texts(data_dir: Path, max_texts: int) -> Iterator[str]:
    """Messages of the dataset's sft (else preference) view, both splits: prompts and answers."""
    import pyarrow.parquet as pq

    files = sorted(DatasetDir(data_dir).view_dir("sft").glob("*.parquet"))
    column = "messages"
    if not files:
        files = sorted(DatasetDir(data_dir).view_dir("preference").glob("*.parquet"))
        column = "prompt"
    if not files:
        raise DataError("no sft/ or preference/ parquet files (is this a dataset built by "
                        "`atm prompts build`?)", str(data_dir))
    n = 0
    for f in files:
        table = pq.read_table(f)
        cols = [c for c in (column, "chosen", "rejected") if c in table.column_names]
        if column not in table.column_names:
            raise DataError(f"missing column {column!r}", str(f))
        for col in cols:
            for messages in table.column(col).to_pylist():
                for m in messages or []:
                    yield m["content"]
                    n += 1
                    if n >= max_texts:
                        return


def train_tokenizer(texts: Iterator[str], cfg: TinyBaseConfig):
    """A Llama-2 style byte-fallback BPE (see the module docstring for why each piece)."""
    tk = require("tokenizers", "train")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    tok = tk.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=SPECIAL_TOKENS + byte_tokens, show_progress=False,
                                  initial_alphabet=list("0123456789.-+{}[]\":,▁"))
    texts = list(texts)
    # BPE on templated text runs out of merges early; role names and the advice words widen it.
    extra = [f"{r} {a}" for r in ROLES for a in ("BUY", "NOOP", "SELL", "advice", "predicted_change")]
    tok.train_from_iterator(texts + extra, trainer=trainer, length=len(texts) + len(extra))
    # The trainer only takes fixed ids as "special tokens", which would make the 256 byte pieces
    # special: decoders that skip special tokens then drop every byte-fallback character ('2' as
    # <0x32>), and nothing ever emits the literal "<0x32>". In Llama-2's own tokenizer.json they are
    # plain vocabulary entries; make them so (same ids, same tokenization of any text).
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in set(byte_tokens)]
    return tk.Tokenizer.from_str(json.dumps(spec))


def build_tiny_base(data_dir: str | Path, out: str | Path, cfg: TinyBaseConfig | None = None) -> Path:
    """Train a tokenizer on ``data_dir`` and save a randomly initialised tiny Llama to ``out``."""
    cfg = cfg or TinyBaseConfig()
    data_dir, out = Path(data_dir), Path(out)
    if not data_dir.is_dir():
        raise DataError("dataset directory not found", str(data_dir))
    torch = require("torch", "train")
    transformers = require("transformers", "train")
    from atm.utils import provenance, write_json_atomic

    tok = train_tokenizer(_iter_texts(data_dir, cfg.max_texts), cfg)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
        model_max_length=cfg.max_position_embeddings, padding_side="left")
    hf_tok.chat_template = CHAT_TEMPLATE

    torch.manual_seed(cfg.seed)
    mcfg = transformers.LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id, torch_dtype="float32")
    model = transformers.LlamaForCausalLM(mcfg)
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.generation_config.bos_token_id = hf_tok.bos_token_id

    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    hf_tok.save_pretrained(tmp)
    _fix_tokenizer_config(tmp)
    summary = _dataset_summary(data_dir)
    write_json_atomic(tmp / "atm_base.json", provenance(
        cfg, kind="tiny", dataset=str(data_dir), dataset_summary=summary,
        parameters=sum(p.numel() for p in model.parameters()), vocab_size=len(hf_tok)))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _fix_tokenizer_config(path: Path) -> None:
    """Pin the flags llama.cpp and transformers read, so neither adds a second bos/eos."""
    p = path / "tokenizer_config.json"
    conf = json.loads(p.read_text())
    conf.update({"add_bos_token": False, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
                 "tokenizer_class": "PreTrainedTokenizerFast"})
    p.write_text(json.dumps(conf, indent=2) + "\n")


def _dataset_summary(data_dir: Path) -> dict[str, Any]:
    return DatasetDir(data_dir).summary(("name", "counts", "splits", "config", "provenance"))


def load_base(model: str | Path, trust_remote_code: bool = False, dtype: str | None = None,
              device_map: Any = None, quantization_config: Any = None):
    """Load ``(model, tokenizer)`` from a hub id or local dir; safetensors only, no remote code.

    ``use_safetensors=True`` refuses pickle checkpoints (``pytorch_model.bin`` can run code when
    loaded); ``trust_remote_code`` stays off unless the user asks.
    """
    transformers = require("transformers", "train")
    path = Path(str(model)).expanduser()
    if path.exists() and not path.is_dir():
        raise AtmError(f"{model}: expected a model directory or a hub id")
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise AtmError(f"{model}: no *.safetensors weights found (pickle checkpoints are refused)")
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if dtype:
        kw["dtype"] = dtype
    if device_map is not None:
        kw["device_map"] = device_map
    if quantization_config is not None:
        kw["quantization_config"] = quantization_config
    src = str(path) if path.is_dir() else str(model)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
        lm = transformers.AutoModelForCausalLM.from_pretrained(src, **kw)
    except OSError as exc:
        raise AtmError(f"{model}: cannot load model ({exc})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise AtmError(f"{model}: tokenizer has no chat template; ATM trains conversational data")
    return lm, tok


# Tokenizer files a transformers ``save_pretrained`` of a fast tokenizer does not write back, but
# later stages read: llama.cpp's converter takes Phi-3's (and other SentencePiece models')
# vocabulary from tokenizer.model itself.
TOKENIZER_ASSETS = ("tokenizer.model",)


def copy_tokenizer_assets(src: str | Path, dst: str | Path) -> list[str]:
    """Copy :data:`TOKENIZER_ASSETS` from model dir ``src`` into ``dst`` where ``dst`` lacks them."""
    src, dst = Path(str(src)).expanduser(), Path(dst)
    copied = []
    if not src.is_dir():
        return copied
    for name in TOKENIZER_ASSETS:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def copy_base(model: str | Path, out: str | Path, trust_remote_code: bool = False) -> Path:
    """Validate a real base (loads, has a chat template, safetensors) and save a copy to ``out``."""
    lm, tok = load_base(model, trust_remote_code=trust_remote_code)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    lm.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    copy_tokenizer_assets(model, tmp)
    from atm.utils import provenance, write_json_atomic

    write_json_atomic(tmp / "atm_base.json", provenance(None, kind="copy", source=str(model),
                                                         parameters=sum(p.numel() for p in lm.parameters())))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
