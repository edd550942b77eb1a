"""``atm export check``: the fidelity report of every tag against the merged HF model."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_cpp")

FIELDS = ("valid_rate", "advice_agreement_hf", "advice_agreement_f16", "mean_abs_change_diff",
          "top1_agreement", "mean_logprob_hf", "mean_logprob", "logprob_delta", "perplexity",
          "perplexity_hf", "tokens_match_rate", "seconds", "quant", "size_mb", "n")


def test_check_report_fields(cli, tiny_gguf, atm_home, sample_dataset, tmp_path):
    out = tmp_path / "fidelity.json"
    proc = cli("export", "check", "--name", "atm", "--n", "10", "--threads", "1", "--out", str(out),
               env={"ATM_HOME": str(atm_home)})
    # the printed table names every tag and the report path
    for ref in ("atm:f16", "atm:q8", "atm:q4"):
        assert ref in proc.stdout
    assert "VALID" in proc.stdout and f"report: {out}" in proc.stdout
    rep = json.loads(out.read_text())
    assert rep["n"] == 10 and rep["data"] == str(sample_dataset)
    assert rep["template_match_rate"] == 1.0
    assert 0.0 <= rep["hf"]["valid_rate"] <= 1.0
    assert list(rep["tags"]) == ["atm:f16", "atm:q8", "atm:q4"]
    for ref, fig in rep["tags"].items():
        assert set(FIELDS) <= set(fig), ref
        assert fig["valid_rate"] == 1.0  # constrained by the schema: every answer parses
        assert fig["tokens_match_rate"] == 1.0  # llama.cpp tokenizes the prompts like HF
        assert 0.0 <= fig["top1_agreement"] <= 1.0
        assert fig["perplexity"] >= 1.0 and fig["perplexity_hf"] >= 1.0
        for key in ("advice_agreement_hf", "mean_abs_change_diff"):
            assert fig[key] is None or fig[key] >= 0.0
    # F16 is the same network in half precision: its next-token choice matches HF's
    assert rep["tags"]["atm:f16"]["top1_agreement"] >= 0.9
    assert abs(rep["tags"]["atm:f16"]["logprob_delta"]) < 0.05
    assert rep["tags"]["atm:f16"]["advice_agreement_f16"] is None
    assert rep["tags"]["atm:q8"]["advice_agreement_f16"] is not None
    # the figures were stored in each manifest
    man = json.loads((atm_home / "models" / "atm" / "q4.json").read_text())
    assert man["fidelity"]["valid_rate"] == 1.0 and man["fidelity"]["n"] == 10
    listing = cli("models", "list", env={"ATM_HOME": str(atm_home)}).stdout
    assert "1.000" in listing  # the VALID_RATE column now shows the checked figure


def test_check_unknown_name_and_missing_data(cli, tiny_gguf, atm_home, tmp_path):
    bad = cli("export", "check", "--name", "nope", env={"ATM_HOME": str(atm_home)}, check=False)
    assert bad.returncode == 2 and "known models: atm:f16" in bad.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = cli("export", "check", "--name", "atm", "--data", str(empty), "--n", "2",
              env={"ATM_HOME": str(atm_home)}, check=False)
    assert bad.returncode == 2 and "no verify prompts found" in bad.stderr
