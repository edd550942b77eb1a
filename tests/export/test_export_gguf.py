"""GGUF export on the real pipeline: the tiny merged model -> atm:f16|q8|q4 (conftest ``tiny_gguf``).

Files load in llama.cpp, constrained generation parses 100%, HF and llama.cpp tokenize the same
50 prompts identically, the chat template travels, fallbacks are named, and failures leave no file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from atm.errors import AtmError
from atm.export.gguf import (QuantFallbackWarning, copy_into_registry, export_gguf, hf_chat_template,
                             clean_chat_template, inspect_gguf, quantize, QUANTS)
from atm.export.registry import Registry
from atm.prompting.advice import load_schema, parse_advice

llama_cpp = pytest.importorskip("llama_cpp")


def _verify_prompts(dataset: Path, n: int) -> list[list[dict]]:
    from atm.export.check import load_verify_prompts

    return [p["messages"] for p in load_verify_prompts(dataset, n)]


def _llama(path: str, **kw):
    from atm.export.gguf import quiet_stderr

    with quiet_stderr():
        return llama_cpp.Llama(model_path=path, verbose=False, n_threads=1, seed=0, **kw)


def test_f16_q8_q4_exist_with_their_types(tiny_gguf, atm_home):
    by_tag = {e.tag: e for e in tiny_gguf}
    assert list(by_tag) == ["f16", "q8", "q4"]
    for e in tiny_gguf:
        assert Path(e.path).is_file() and Path(e.path).parent == atm_home / "models" / "atm"
        info = inspect_gguf(e.path)
        assert info["architecture"] == "llama" and info["file_type"] == e.quant
        assert e.tensor_types == info["tensor_types"]
    assert by_tag["q8"].tensor_types.get("Q8_0", 0) > 0
    assert by_tag["q4"].tensor_types.get("Q4_K", 0) > 0
    assert by_tag["f16"].size > by_tag["q8"].size > by_tag["q4"].size
    # the tiny base is shaped for K-quants: nothing fell back
    assert all(not e.fallbacks for e in tiny_gguf)


@pytest.mark.parametrize("tag", ["f16", "q8", "q4"])
def test_loads_in_llama_cpp_and_constrained_answers_parse(tiny_gguf, sample_dataset, tag):
    entry = {e.tag: e for e in tiny_gguf}[tag]
    llm = _llama(entry.path, n_ctx=1024)
    schema = entry.schema
    assert schema == load_schema()
    results = []
    for messages in _verify_prompts(sample_dataset, 12):
        out = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=64,
                                         response_format={"type": "json_object", "schema": schema})
        results.append(parse_advice(out["choices"][0]["message"]["content"]))
    assert all(r.valid for r in results), [r for r in results if not r.valid][:3]


def test_tokenization_of_50_prompts_is_identical(tiny_merged, tiny_gguf, sample_dataset):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_merged))
    llm = _llama({e.tag: e for e in tiny_gguf}["q8"].path, vocab_only=True)
    prompts = _verify_prompts(sample_dataset, 50)
    assert len(prompts) == 50
    for messages in prompts:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        hf_ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf_ids
    # the export recorded the same check in the manifest
    assert all(e.tokenizer_check["match_rate"] == 1.0 for e in tiny_gguf)


def test_chat_template_travels_into_the_gguf(tiny_merged, tiny_gguf, sample_dataset):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    hf_template = hf_chat_template(tiny_merged)
    for e in tiny_gguf:
        assert inspect_gguf(e.path)["chat_template"] == clean_chat_template(hf_template) == e.chat_template
    tok = AutoTokenizer.from_pretrained(str(tiny_merged))
    fmt = Jinja2ChatFormatter(template=tiny_gguf[0].chat_template, eos_token=tiny_gguf[0].eos_token,
                              bos_token=tiny_gguf[0].bos_token)
    for messages in _verify_prompts(sample_dataset, 5):
        assert fmt(messages=messages).prompt == tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)


def test_fallback_tensors_are_named(tmp_path, sample_dataset):
    """A model whose widths are not multiples of 256 cannot take Q4_K everywhere."""
    from atm.finetune.base import TinyBaseConfig, build_tiny_base

    model = build_tiny_base(sample_dataset, tmp_path / "narrow", TinyBaseConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    with pytest.warns(QuantFallbackWarning, match=r"blk\.0\.attn_q\.weight \(64, 64\) -> Q5_0"):
        entries = export_gguf(model, name="narrow", quants="q4_k_m", home=tmp_path / "home")
    q4 = {e.tag: e for e in entries}["q4"]
    assert any(f["tensor"] == "blk.0.ffn_up.weight" and f["requested"] == "Q4_K_M" for f in q4.fallbacks)
    stored = json.loads(Path(Registry(tmp_path / "home").manifest_path("narrow", "q4")).read_text())
    assert stored["fallbacks"] == q4.fallbacks


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_failed_conversion_leaves_no_file(tmp_path, tiny_merged, tiny_gguf):
    home = tmp_path / "home"
    keep = copy_into_registry(tiny_gguf[2].path, "keep", "q4", home=home)
    before = _tree(home)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_merged, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    with pytest.raises(AtmError, match=r"converting .*broken to GGUF failed .*no file was written"):
        export_gguf(broken, name="atm", home=home)
    assert _tree(home) == before  # no half file, no staging dir, no manifest
    assert Registry(home).names() == [keep.ref]


def test_not_a_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(AtmError, match="model directory not found"):
        export_gguf(tmp_path / "nope", home=tmp_path / "h")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "config.json").write_text("{}")
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(AtmError, match="merge it first"):
        export_gguf(tmp_path / "adapter", home=tmp_path / "h")
    with pytest.raises(AtmError, match="unknown quantization 'q3'"):
        export_gguf(tmp_path / "adapter", quants="q3", home=tmp_path / "h")


@pytest.mark.parametrize("tool", [None, "auto"], ids=["llama_cpp-binding", "llama-quantize-or-binding"])
def test_quantize_engines_agree(tmp_path, tiny_gguf, tool):
    q8 = {e.tag: e for e in tiny_gguf}["q8"]
    info = quantize(tiny_gguf[0].path, tmp_path / "q8.gguf", QUANTS["q8_0"], threads=1, tool=tool)
    assert info["engine"].endswith("llama-quantize") or info["engine"] == "llama_cpp.llama_model_quantize"
    if tool is None:
        assert info["engine"] == "llama_cpp.llama_model_quantize"
    assert inspect_gguf(tmp_path / "q8.gguf")["tensor_types"] == q8.tensor_types


def test_failed_quantization_leaves_no_file(tmp_path, tiny_gguf):
    dst = tmp_path / "out" / "q4.gguf"
    with pytest.raises(AtmError, match="quantizing f16.gguf to Q4_K_M failed"):
        quantize(tiny_gguf[0].path, dst, QUANTS["q4_k_m"], tool="/bin/false")
    assert not dst.exists() and os.listdir(dst.parent) == []
    # the same through the Python binding on a source that is not a GGUF
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(AtmError, match="failed"):
        quantize(bad, dst, QUANTS["q8_0"], tool=None)
    assert os.listdir(dst.parent) == []


def test_truncated_gguf_gives_a_clear_error(tmp_path, tiny_gguf):
    src = Path(tiny_gguf[1].path)
    cut = tmp_path / "cut.gguf"
    for keep in (src.stat().st_size // 2, src.stat().st_size - 1, 200):
        cut.write_bytes(src.read_bytes()[:keep])
        with pytest.raises(AtmError, match=r"cut\.gguf: (damaged or )?truncated GGUF file"):
            inspect_gguf(cut)
    (tmp_path / "notgguf.gguf").write_text("hello")
    with pytest.raises(AtmError, match="not a GGUF file"):
        inspect_gguf(tmp_path / "notgguf.gguf")
    # a registered file truncated afterwards is refused by the registry
    home = tmp_path / "home"
    e = copy_into_registry(src, "cut", "q8", home=home)
    Path(e.path).write_bytes(src.read_bytes()[:1000])
    with pytest.raises(AtmError, match="truncated or replaced"):
        Registry(home).resolve("cut:q8")


def test_cli_export_writes_registry_and_modelfiles(cli, tiny_merged, tmp_path):
    home, mf = tmp_path / "home", tmp_path / "mf"
    proc = cli("export", "gguf", "--model", str(tiny_merged), "--name", "clitest", "--quant", "q8",
               "--modelfiles-dir", str(mf), "--home", str(home))
    assert "clitest:f16" in proc.stdout and "clitest:q8" in proc.stdout and "Q8_0" in proc.stdout
    assert sorted(p.name for p in mf.iterdir()) == ["clitest-f16.Modelfile", "clitest-q8.Modelfile"]
    assert Registry(home).names() == ["clitest:f16", "clitest:q8"]
    if shutil.which("ollama") is None:
        bad = cli("export", "gguf", "--model", str(tiny_merged), "--name", "clitest", "--quant", "q8",
                  "--modelfiles-dir", str(mf), "--home", str(home), "--ollama", check=False)
        assert bad.returncode == 2 and "no `ollama` binary on PATH" in bad.stderr
