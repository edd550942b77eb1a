"""`atm-eval run --model vllm:DIR`: the merged tiny model served by a real vLLM that the provider
launches for the run (through atm.runtime.vllm, behind its own key) and stops at the end. Skips,
saying why, where no vLLM can be installed (the `vllm_binary` fixture)."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_atm_eval_vllm_provider_loglik(vllm_binary, tiny_merged, sample_dataset, tmp_path, cli):
    from atm.eval.rundir import read_results

    out = tmp_path / "run"
    spec = f"vllm:{tiny_merged}"
    cli("eval", "run", "--model", spec, "--data", str(sample_dataset), "--limit", "8",
            "--concurrency", "2", "--mode", "loglik", "--no-baselines", "--no-report", "--out", str(out),
            env={"ATM_VLLM_ARGS": "--enforce-eager"}, timeout=900)
    man = json.loads((out / "manifest.json").read_text())
    entry = man["models"][spec]
    assert entry["status"] == "done" and entry["mode"] == "loglik", entry
    d = entry["describe"]
    assert d["engine"] == "vllm" and d["vllm"]["version"] and d["vllm"]["binary"] == vllm_binary
    assert d["vllm"]["args"]["max_num_seqs"] == 2 and d["vllm"]["args"]["max_model_len"] == 2048
    recs = read_results(out / entry["file"])
    assert len(recs) == 8
    for r in recs.values():
        assert r["valid"], r
        assert set(r["probs"]) == {"BUY", "NOOP", "SELL"} and math.isclose(sum(r["probs"].values()), 1, abs_tol=1e-6)
