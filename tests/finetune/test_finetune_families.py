"""Real model families offline: rebuilt tokenizers are the real ones, tiny models of the real
architectures, the SmolLM2 GGUF as a trained base, and the errors a user meets on the way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atm.errors import AtmError, ConfigError

FAMILIES = ["qwen2.5", "llama-3.2", "phi-3", "smollm2"]


@pytest.mark.parametrize("name", FAMILIES)
def test_rebuilt_tokenizer_gives_llamacpp_ids_on_its_46_test_strings(name):
    from atm.finetune.families import build_tokenizer, tokenizer_cases, tokenizer_parity

    tok = build_tokenizer(name)
    cases = tokenizer_cases(name)
    assert len(cases) == 46
    parity = tokenizer_parity(name, tok)
    assert parity == {**parity, "n": 46, "match_rate": 1.0, "first_mismatch": None}
    # the check can fail: a tokenizer without the family's own splitting rules differs
    if name in ("qwen2.5", "smollm2"):  # digits one by one; a BPE merging them gives other ids
        from tokenizers import pre_tokenizers

        broken = build_tokenizer(name)
        broken.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        assert tokenizer_parity(name, broken)["match_rate"] < 1.0


@pytest.mark.parametrize("name", FAMILIES)
def test_llamacpp_converter_recognises_the_pre_tokenizer(name):
    from atm.export.gguf import detect_pre_tokenizer, is_byte_level_bpe
    from atm.finetune.families import family, tokenizer_cache_dir

    fam = family(name)
    d = tokenizer_cache_dir(fam)
    if fam.pre_tokenizer is None:  # SentencePiece: the converter reads tokenizer.model instead
        assert not is_byte_level_bpe(d) and (d / "tokenizer.model").is_file()
        return
    assert is_byte_level_bpe(d)
    assert detect_pre_tokenizer(d)["name"] == fam.pre_tokenizer


def test_special_tokens_and_templates_are_the_families_own():
    from atm.finetune.families import build_tokenizer

    qwen = build_tokenizer("qwen2.5")
    assert len(qwen) == 151665 and qwen.eos_token == "<|im_end|>" and qwen.bos_token is None
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|file_sep|>"]) == [151643, 151644, 151664]
    llama = build_tokenizer("llama-3.2")
    assert llama.encode("a")[0] == 128000  # its post-processor adds <|begin_of_text|>
    assert llama.convert_tokens_to_ids(["<|eot_id|>", "<|reserved_special_token_247|>"]) == [128009, 128255]
    msgs = [{"role": "user", "content": "x"}]
    text = llama.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system") and "Today Date: 26 Jul 2024" in text
    phi = build_tokenizer("phi-3")
    assert len(phi) == 32011 and phi.convert_tokens_to_ids("<|user|>") == 32010
    # llama.cpp's Phi-3 rule: whitespace after its special tokens is stripped, so HF must do so too
    assert phi.encode("<|user|>\nhi", add_special_tokens=False) == phi.encode("<|user|>hi", add_special_tokens=False)
    smol = build_tokenizer("smollm2")
    assert smol.encode("2025", add_special_tokens=False) == [smol.convert_tokens_to_ids(c) for c in "2025"]


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_family_base_from_the_cli(name, tmp_path, cli):
    out = tmp_path / f"tiny-{name}"
    proc = cli("finetune", "base", "--family", name, "--tiny", "--out", str(out))
    assert f"tiny {name} base: {out}" in proc.stdout
    assert "llama.cpp's 46 test strings identical: 100%" in proc.stdout
    from atm.finetune.families import chat_template, family

    fam = family(name)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [fam.architecture] and config["vocab_size"] == fam.vocab_size
    assert (out / "chat_template.jinja").read_text() == chat_template(fam)
    assert any(out.glob("*.safetensors"))
    base = json.loads((out / "atm_base.json").read_text())
    assert base["family"] == name and base["tokenizer"]["llamacpp_parity"]["match_rate"] == 1.0
    assert base["versions"]["transformers"] and base["config"]["hidden_size"] == 64
    if name == "phi-3":
        assert (out / "tokenizer.model").is_file()


def test_unknown_family_and_family_without_tiny(cli, tmp_path):
    proc = cli("finetune", "base", "--family", "gpt-9", "--tiny", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode != 0 and "unknown model family 'gpt-9'; choose from qwen2.5, llama-3.2, phi-3, smollm2" in proc.stderr
    proc = cli("finetune", "base", "--family", "qwen2.5", "--model", "x", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode != 0 and "--family builds a tiny random-weight model: add --tiny" in proc.stderr


@pytest.fixture(scope="session")
def smollm2_base(session_tmp):
    from atm.finetune.sources import base_from_gguf

    return base_from_gguf("smollm2-135m-instruct", session_tmp / "base-smollm2")


def test_smollm2_gguf_becomes_a_trained_hf_base(smollm2_base):
    import torch
    import transformers

    from atm.finetune.families import smollm2_gguf
    from atm.utils import sha256_file

    info = json.loads((smollm2_base / "atm_base.json").read_text())
    src = info["source"]
    assert src["sha256"] == sha256_file(smollm2_gguf()) and src["dequantized"] is True
    assert src["file_type"] == "Q4_1" and src["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert info["tokenizer"]["llamacpp_parity"]["match_rate"] == 1.0
    assert info["parameters"] == 134515008
    config = json.loads((smollm2_base / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_base)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_base)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])  # real trained weights


def test_gguf_source_by_cli_prints_provenance(cli, tmp_path, smollm2_base):
    # the CLI path on a copy of the same file (the name resolves to the installed package's GGUF)
    from atm.finetune.families import smollm2_gguf

    proc = cli("finetune", "base", "--gguf", "nope-1b", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode != 0 and "not a model ATM knows by name (smollm2-135m-instruct)" in proc.stderr
    d = tmp_path / "dir"
    d.mkdir()
    proc = cli("finetune", "base", "--gguf", str(d), "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode != 0 and "name one GGUF file in it (it has none)" in proc.stderr
    assert smollm2_gguf().is_file()


def test_gguf_sources_transformers_cannot_load_are_refused(tmp_path):
    from atm.finetune.families import llamacpp_models_dir
    from atm.finetune.sources import base_from_gguf

    with pytest.raises(AtmError, match="GGUF architecture 'refact' cannot be loaded by transformers"):
        base_from_gguf(llamacpp_models_dir() / "ggml-vocab-refact.gguf", tmp_path / "a")
    with pytest.raises(AtmError, match="holds no tensors .a vocabulary-only file"):
        base_from_gguf(llamacpp_models_dir() / "ggml-vocab-qwen2.gguf", tmp_path / "b")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(AtmError, match="not a GGUF file"):
        base_from_gguf(bad, tmp_path / "c")
    assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())


def test_unrecognised_pre_tokenizer_is_named_with_what_to_pass(tmp_path):
    """A byte-level BPE whose splitting llama.cpp does not know: refused before converting, with
    its hash and the --pre-tokenizer escape; naming one converts (and the parity check tells)."""
    import warnings

    from tokenizers import Regex, pre_tokenizers

    from atm.export.gguf import TokenizerMismatchWarning, export_gguf
    from atm.finetune.families import build_tiny_family_base

    model = build_tiny_family_base("smollm2", tmp_path / "m")
    tj = json.loads((model / "tokenizer.json").read_text())
    tok = __import__("tokenizers").Tokenizer.from_str(json.dumps(tj))
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # each space its own word: no model llama.cpp knows
        pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.save(str(model / "tokenizer.json"))
    home = tmp_path / "home"
    with pytest.raises(AtmError) as err:
        export_gguf(model, name="odd", quants=(), home=home)
    msg = str(err.value)
    assert "does not recognise this tokenizer's pre-tokenizer" in msg and "--pre-tokenizer NAME" in msg
    assert "smollm" in msg and not list(home.rglob("*.gguf"))
    with pytest.raises(AtmError, match="is not one llama.cpp knows"):
        export_gguf(model, name="odd", quants=(), home=home, pre_tokenizer="smollm3000")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = export_gguf(model, name="odd", quants=(), home=home, pre_tokenizer="smollm")
    check = entries[0].tokenizer_check
    assert check["gguf_tokenizer"]["pre_tokenizer"] == "smollm" and check["pre_tokenizer_override"] == "smollm"
    # llama.cpp keeps ' world' one word while this tokenizer splits off the space: the check says so
    assert check["match_rate"] < 1.0
    assert any(issubclass(w.category, TokenizerMismatchWarning) for w in caught)


def test_lora_targets_auto_per_architecture_and_absent_ones_refused(tmp_path):
    import transformers

    from atm.finetune.families import build_tiny_family_base
    from atm.finetune.train import load_config, resolve_target_modules

    phi = build_tiny_family_base("phi-3", tmp_path / "phi")
    model = transformers.AutoModelForCausalLM.from_pretrained(phi)
    root = Path(__file__).resolve().parents[2]
    cfg = load_config("sft", root / "finetune" / "tiny-cpu.yaml", [f"model={phi}"])
    assert cfg.lora.target_modules == "auto"
    assert resolve_target_modules(cfg, model) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    cfg = load_config("sft", root / "finetune" / "tiny-cpu.yaml",
                      [f"model={phi}", "lora.target_modules=[q_proj,v_proj]"])
    with pytest.raises(ConfigError, match=r"\['q_proj', 'v_proj'\] not found in Phi3ForCausalLM .phi3.; "
                                          r"its linear layers are: down_proj, gate_up_proj, o_proj, qkv_proj"):
        resolve_target_modules(cfg, model)


def test_qlora_recipe_without_bitsandbytes_names_the_qlora_extra(tiny_base, sample_dataset, tmp_path, cli):
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
        pytest.skip("bitsandbytes and a GPU are here: QLoRA would run")
    root = Path(__file__).resolve().parents[2]
    proc = cli("finetune", "orpo", "--recipe", str(root / "finetune" / "orpo-4090.yaml"),
               "--set", f"model={tiny_base}", "--set", f"data={sample_dataset}",
               "--set", f"output_dir={tmp_path / 'q'}", check=False)
    assert proc.returncode != 0
    assert "needs bitsandbytes and a CUDA GPU" in proc.stderr
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "pip install 'atm[qlora]'" in proc.stderr
    assert "atm[train]" not in proc.stderr


def test_assistant_only_loss_without_generation_block_and_rows_over_max_length(sample_dataset, tmp_path, cli):
    root = Path(__file__).resolve().parents[2]
    base = tmp_path / "llama"
    cli("finetune", "base", "--family", "llama-3.2", "--tiny", "--out", str(base))
    common = ["--recipe", str(root / "finetune" / "tiny-cpu.yaml"), "--set", f"model={base}",
              "--set", f"data={sample_dataset}", "--set", f"output_dir={tmp_path / 'run'}",
              "--set", "lora.modules_to_save=[]", "--set", "max_train_samples=8"]
    proc = cli("finetune", "sft", *common, check=False)
    assert proc.returncode != 0
    assert "has no {% generation %} block" in proc.stderr and "sft.completion_only_loss=true" in proc.stderr
    proc = cli("finetune", "orpo", *common, "--set", "max_length=64", check=False)
    assert proc.returncode != 0
    assert "8 of 8 rows checked are longer than max_length=64 tokens" in proc.stderr
    proc = cli("finetune", "orpo", *common, "--set", "max_length=9000", check=False)
    assert proc.returncode != 0 and "max_length=9000 is longer than the context" in proc.stderr
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
