"""The name:tag registry: resolve, list, show, rm (API and CLI), and what a manifest records."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest

from atm.errors import AtmError
from atm.export.gguf import copy_into_registry
from atm.export.registry import Entry, Registry, split_ref, tag_for
from atm.prompting.advice import load_schema
from atm.prompting.template import Template
from atm.utils import sha256_file


def test_manifests_record_what_consumers_need(tiny_gguf, tiny_merged, atm_home):
    reg = Registry(atm_home)
    merged_config = json.loads((tiny_merged / "config.json").read_text())
    atm_model = json.loads((tiny_merged / "atm_model.json").read_text())
    for e in tiny_gguf:
        stored = json.loads(reg.manifest_path("atm", e.tag).read_text())
        # (`atm export check`, if it ran earlier in the session, added its figures)
        assert {k: v for k, v in stored.items() if k != "fidelity"} == \
            {k: v for k, v in e.to_dict().items() if k != "fidelity"}
        assert stored["sha256"] == sha256_file(e.path) and stored["size"] == Path(e.path).stat().st_size
        assert stored["quant"] == {"f16": "F16", "q8": "Q8_0", "q4": "Q4_K_M"}[e.tag]
        assert stored["template"] == atm_model["template"]
        assert Template.from_yaml(stored["template"]).render("CTX")[-1]["content"].endswith("CTX")
        assert stored["schema"] == load_schema()
        assert stored["source"]["model_dir"] == str(tiny_merged.resolve())
        assert stored["source"]["config"] == merged_config
        assert stored["llamacpp"]["llama-cpp-python"] == metadata.version("llama-cpp-python")
        assert stored["llamacpp"]["llama.cpp"] and stored["llamacpp"]["ggml"]
        assert stored["context_length"] == merged_config["max_position_embeddings"]
        assert stored["eos_token"] == "</s>" and stored["add_bos_token"] is False
        assert stored["provenance"]["versions"]["llama-cpp-python"] == metadata.version("llama-cpp-python")
        assert e.model_dir == str(tiny_merged.resolve())


def test_resolve_and_unknown_names(tiny_gguf, atm_home):
    reg = Registry(atm_home)
    assert reg.resolve("atm:q8").path == {e.tag: e for e in tiny_gguf}["q8"].path
    assert reg.resolve("atm").tag == "q8"  # bare name: q8 first
    assert reg.names() == ["atm:f16", "atm:q4", "atm:q8"]
    for bad in ("atm:q5", "nope:q8", "nope", "../etc:q8", "ATM:Q8", ""):
        with pytest.raises(AtmError) as exc:
            reg.resolve(bad)
        assert "known models: atm:f16, atm:q4, atm:q8" in str(exc.value)
    assert split_ref("atm:q8") == ("atm", "q8") and split_ref("atm") == ("atm", None)
    assert tag_for("Q8_0") == "q8" and tag_for("q4_k_m") == "q4" and tag_for("q6_k") == "q6_k"


@pytest.fixture
def small_home(tmp_path, tiny_gguf) -> Path:
    """A private registry (copies), so removing entries does not touch the session's one."""
    home = tmp_path / "home"
    for e in tiny_gguf[1:]:
        copy_into_registry(e.path, "mini", e.tag, home=home, template=e.template, schema=e.schema)
    return home


def test_remove_and_verify(small_home):
    reg = Registry(small_home)
    q4 = reg.resolve("mini:q4")
    assert reg.verify(q4) is q4
    removed = reg.remove("mini:q4")
    assert [e.ref for e in removed] == ["mini:q4"] and not Path(q4.path).exists()
    assert reg.names() == ["mini:q8"]
    with pytest.raises(AtmError, match="known models: mini:q8"):
        reg.remove("mini:q4")
    # a file changed after export is caught by verify
    q8 = reg.resolve("mini:q8")
    data = bytearray(Path(q8.path).read_bytes())
    data[-1] ^= 0xFF
    Path(q8.path).write_bytes(bytes(data))
    with pytest.raises(AtmError, match="sha256 .* the file changed since export"):
        reg.resolve("mini:q8", verify=True)
    reg.remove("mini")
    assert reg.names() == [] and not (small_home / "models" / "mini").exists()


def test_add_refuses_missing_file_and_bad_names(tmp_path):
    reg = Registry(tmp_path)
    e = Entry(name="x", tag="q8", path=str(tmp_path / "missing.gguf"), sha256="0", size=0, quant="Q8_0")
    with pytest.raises(AtmError, match="no such file"):
        reg.add(e)
    with pytest.raises(AtmError, match="not valid"):
        reg.model_dir("Bad Name")
    (tmp_path / "models" / "x").mkdir(parents=True)
    (tmp_path / "models" / "x" / "q8.json").write_text("{broken")
    assert reg.list() == []  # a broken manifest is skipped by list ...
    with pytest.raises(AtmError, match="unreadable manifest"):
        reg.resolve("x:q8")  # ... and named when asked for


def test_models_cli(cli, small_home):
    env = {"ATM_HOME": str(small_home)}
    out = cli("models", "list", env=env).stdout
    assert "mini:q8" in out and "mini:q4" in out and "Q4_K_M" in out
    # unchecked models show '-': the listing says why and what fills them in (issue 22)
    assert "VALID_RATE / AGREE_HF '-': not measured yet" in out and "`atm export check --name mini`" in out
    listed = json.loads(cli("models", "list", "--json", env=env).stdout)
    assert {r["name"] for r in listed} == {"mini:q8", "mini:q4"}
    show = cli("models", "show", "mini:q8", "--verify", env=env).stdout
    assert "sha256 verified" in show and "prompt template: seed" in show
    full = json.loads(cli("models", "show", "mini:q4", "--json", env=env).stdout)
    assert full["quant"] == "Q4_K_M" and full["schema"] == load_schema()
    bad = cli("models", "show", "mini:q3", env=env, check=False)
    assert bad.returncode == 2 and "known models: mini:q4, mini:q8" in bad.stderr
    assert "Traceback" not in bad.stderr
    rm = cli("models", "rm", "mini:q4", env=env).stdout
    assert "removed mini:q4" in rm
    assert "mini:q4" not in cli("models", "list", env=env).stdout
    empty = cli("models", "list", "--home", str(small_home / "none")).stdout
    assert "no models in" in empty
