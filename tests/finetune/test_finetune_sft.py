"""Tiny base, SFT, merge and constrained generation on the real sample dataset (CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tok(path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _sft_rows(dataset, n=4, split="verify"):
    import pandas as pd

    df = pd.read_parquet(Path(dataset) / "sft" / "data" / f"{split}-00000-of-00001.parquet")
    return [[dict(m) for m in msgs] for msgs in df["messages"].head(n)]


def test_tiny_base_tokenizer_contract(tiny_base, sample_dataset):
    tok = _tok(tiny_base)
    spec = json.loads((Path(tiny_base) / "tokenizer.json").read_text())
    # Llama-2 style byte-fallback BPE: what llama.cpp's converter accepts unpatched.
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is True
    assert spec["decoder"]["type"] == "Sequence"
    assert [n["type"] for n in spec["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    vocab = tok.get_vocab()
    assert all(f"<0x{i:02X}>" in vocab for i in range(256))
    # byte pieces are plain vocabulary (as in Llama-2), not special: decoding keeps their characters
    bytes_ = [vocab[f"<0x{b:02X}>"] for b in b"2."]
    assert not set(bytes_) & set(tok.all_special_ids)
    assert tok.decode(bytes_, skip_special_tokens=True) == "2."
    assert tok.decode([vocab["<0xC3>"], vocab["<0xA9>"]], skip_special_tokens=True) == "\u00e9"
    # Digits are single tokens: no piece mixes a digit with anything else.
    assert not [p for p in vocab if re.search(r"\d", p) and not re.fullmatch(r"\d|<0x[0-9A-F]{2}>", p)]
    cfg = json.loads((Path(tiny_base) / "config.json").read_text())
    assert cfg["vocab_size"] == len(tok)
    assert cfg["hidden_size"] % 256 == 0 and cfg["intermediate_size"] % 256 == 0
    for messages in _sft_rows(sample_dataset):
        full = tok.apply_chat_template(messages)["input_ids"]
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"]
        # The generation prompt is an exact token prefix; the answer ends exactly at one eos.
        assert full[:len(prompt)] == prompt
        assert full[-1] == tok.eos_token_id and full[-2] != tok.eos_token_id
        assert full.count(tok.bos_token_id) == 1
        answer = tok.decode(full[len(prompt):], skip_special_tokens=True)
        assert answer == messages[-1]["content"]
        mask = tok.apply_chat_template(messages, return_assistant_tokens_mask=True,
                                       return_dict=True)["assistant_masks"]
        assert sum(mask) == len(full) - len(prompt)  # {% generation %}: answer + eos only


def test_load_base_refuses_pickle_and_missing(tmp_path, tiny_base):
    from atm.errors import AtmError
    from atm.finetune.base import load_base

    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(AtmError, match="safetensors"):
        load_base(tmp_path)
    model, tok = load_base(tiny_base)
    assert model.config.vocab_size == len(tok)


def test_sft_reduces_loss_and_writes_run(tiny_sft):
    from atm.finetune.train import read_log

    log = read_log(tiny_sft)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) >= 4
    assert losses[-1] < 0.6 * losses[0], losses
    assert any(r.get("event") == "train_end" and r["global_step"] == 30 for r in log)
    run = json.loads((Path(tiny_sft) / "atm_run.json").read_text())
    assert run["status"] == "done" and run["global_step"] == 30 and run["method"] == "sft"
    assert run["config"]["sft"]["assistant_only_loss"] is True
    assert run["dataset"]["path"] and run["provenance"]["versions"]["trl"]
    assert (Path(tiny_sft) / "adapter_model.safetensors").exists()


def test_merge_matches_adapter_logits(tiny_base, tiny_sft, tiny_merged, sample_dataset):
    peft = pytest.importorskip("peft")
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_merged)).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_base))
    adapted = peft.PeftModel.from_pretrained(base, str(tiny_sft)).eval()
    tok = _tok(tiny_merged)
    ids = torch.tensor([tok.apply_chat_template(_sft_rows(sample_dataset, 1)[0])["input_ids"]])
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    # ...and the adapter really changed the base (the comparison is not vacuous).
    with adapted.disable_adapter(), torch.no_grad():
        c = adapted(ids).logits
    assert (a - c).abs().max().item() > 1e-2
    card = json.loads((Path(tiny_merged) / "atm_model.json").read_text())
    assert card["template"] and "name: seed" in card["template"]
    assert card["schema"]["properties"]["advice"]["enum"] == ["BUY", "NOOP", "SELL"]
    assert card["training"][0]["method"] == "sft" and card["dataset"]
    assert list(Path(tiny_merged).glob("*.safetensors")) and not list(Path(tiny_merged).glob("*.bin"))


def test_merged_generates_schema_valid_advice(tiny_merged, sample_dataset):
    from atm.prompting.hf_constraint import generate_constrained
    from atm.prompting.advice import load_schema, parse_advice

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_merged)).eval()
    tok = _tok(tiny_merged)
    for messages in _sft_rows(sample_dataset, 3):
        text = generate_constrained(model, tok, messages[:-1], load_schema(), max_new_tokens=48)
        parsed = parse_advice(text)
        assert parsed.valid, (text, parsed)
