"""LLM providers end to end on the tiny pipeline: atm:q8 (llama.cpp in process), hf: (transformers),
openai: and ollama: against the real `atm serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, timeout=900):
    p = subprocess.run([sys.executable, "-m", "atm", "eval", *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "ATM_NO_PROGRESS": "1"}, timeout=timeout)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}"
    return p


def _suite(**kw):
    from atm.eval.harness import load_suite

    return load_suite(None, ["metrics.n_boot=200", *[f"{k}={v}" for k, v in kw.items()]])


def _records(out: Path, spec: str) -> list[dict]:
    from atm.eval.rundir import read_results

    man = json.loads((out / "manifest.json").read_text())
    return list(read_results(out / man["models"][spec]["file"]).values())


@pytest.mark.slow
def test_atm_q8_generate_end_to_end(tiny_gguf, sample_dataset, tmp_path):
    out = tmp_path / "q8"
    p = _cli("run", "--model", "atm:q8", "--data", str(sample_dataset), "--limit", "30", "--out", str(out),
             "--set", "metrics.n_boot=200")
    assert "verdict: atm:q8 is " in p.stdout
    recs = _records(out, "atm:q8")
    assert len(recs) == 30
    # the grammar makes every answer parse under the schema (the tiny model is barely trained)
    assert all(r["valid"] for r in recs), [r["reason"] for r in recs if not r["valid"]][:3]
    assert all(r["latency"] > 0 and r["prompt_hash"] for r in recs)
    md = (out / "report.md").read_text()
    assert "atm:q8 is " in md and "baseline:majority" in md
    man = json.loads((out / "manifest.json").read_text())
    d = man["models"]["atm:q8"]["describe"]
    assert d["sha256"] and d["template_check"] == {"checked": True, "mismatch": None}


@pytest.mark.slow
def test_atm_loglik_probabilities_match_full_evaluation(tiny_gguf, sample_dataset, tmp_path):
    """loglik's class probabilities equal an independent full-sequence evaluation (logits_all)."""
    import llama_cpp

    from atm.eval.harness import run_eval

    out = tmp_path / "ll"
    m = run_eval(["atm:q8"], _suite(), out, data=str(sample_dataset), limit=12, mode="loglik", quiet=True)
    res = m["models"]["atm:q8"]
    assert res["mode"] == "loglik" and res["calibration"]["n"] == 12
    recs = _records(out, "atm:q8")
    for r in recs:
        assert r["valid"] and abs(sum(r["probs"].values()) - 1) < 1e-9
        assert r["advice"] == max(r["probs"], key=r["probs"].get)
    # independent reference: evaluate prompt + the whole answer for each option with logits_all
    from atm.eval.harness import load_items, model_items
    from atm.eval.backends.atm import AtmProvider

    meta = json.loads((sample_dataset / "dataset.json").read_text())
    prov = AtmProvider("atm:q8", "q8", dataset_meta=meta)
    prov._load()
    from atm.eval.rundir import spaced_rows

    verify = load_items(sample_dataset, "verify")
    items = {it["id"]: it for it in model_items(verify.iloc[spaced_rows(len(verify), 12)])}  # what --limit 12 took
    ref = llama_cpp.Llama(str(prov.entry.path), n_ctx=2048, n_threads=1, logits_all=True, verbose=False)
    for r in recs[:3]:
        prompt, add_bos = prov.prompt_text(items[r["id"]]["prompt"])
        change = json.loads(r["raw"])["predicted_open_change"]  # the decoded string (a float loses digits)
        seqs = {a: ref.tokenize((prompt + '{"predicted_open_change": "' + change + '", "advice": "' + a + '"}').encode(),
                                add_bos=add_bos, special=True) for a in ("BUY", "NOOP", "SELL")}
        shared = 0
        while all(len(s) > shared for s in seqs.values()) and len({s[shared] for s in seqs.values()}) == 1:
            shared += 1
        lp = {}
        for a, t in seqs.items():
            ref.reset()
            ref.eval(t)
            lg = np.asarray(ref.scores[:len(t)], dtype=np.float64)
            mx = lg.max(1, keepdims=True)
            ls = lg - mx - np.log(np.exp(lg - mx).sum(1, keepdims=True))
            lp[a] = sum(ls[j - 1, t[j]] for j in range(shared, len(t)))
        for a in lp:
            assert r["extra"]["logprob"][a] == pytest.approx(lp[a], abs=0.05), (a, r["extra"]["logprob"], lp)
    prov.close()


@pytest.mark.slow
def test_template_mismatch_is_flagged(tiny_gguf, btc_parquet, session_tmp, tmp_path):
    """A model trained on one prompt and asked with another (the original experiment's failure mode)
    is evaluated, but the report says so."""
    from atm.eval.harness import run_eval
    from atm.eval.report import write_report
    from atm.prompting.dataset import BuildConfig, build_dataset

    ds = build_dataset(BuildConfig(klines=str(btc_parquet), encoder="seed-json-compat",
                                   template=str(ROOT / "prompts" / "seed-compat.yaml"), label="seed",
                                   out=str(session_tmp / "datasets" / "btc-compat-eval")))
    m = run_eval(["atm:q8"], _suite(), tmp_path / "mm", data=str(ds), limit=3, with_baselines=False, quiet=True)
    note = m["models"]["atm:q8"]["note"] or ""
    assert "template differs" in note and "system" in note
    write_report([tmp_path / "mm"], metrics=[m])  # the CLI does this after run_eval
    assert "template differs" in (tmp_path / "mm" / "report.md").read_text()


@pytest.mark.slow
def test_hf_provider_generate_and_loglik(tiny_merged, sample_dataset, tmp_path):
    from atm.eval.harness import run_eval

    m = run_eval([f"hf:{tiny_merged}"], _suite(), tmp_path / "hf", data=str(sample_dataset), limit=6,
                 with_baselines=False, quiet=True)
    r = m["models"][f"hf:{tiny_merged}"]
    assert r["n"] == 6 and r["failed"] == 0 and r["validity"]["valid"] == 6  # constrained to the schema
    m2 = run_eval([f"hf:{tiny_merged}"], _suite(), tmp_path / "hf-ll", data=str(sample_dataset), limit=6,
                  mode="loglik", with_baselines=False, quiet=True)
    recs2 = _records(tmp_path / "hf-ll", f"hf:{tiny_merged}")
    assert len(recs2) == 6 and all(abs(sum(x["probs"].values()) - 1) < 1e-6 for x in recs2)
    assert m2["models"][f"hf:{tiny_merged}"]["calibration"]["n"] == 6


@pytest.mark.slow
def test_hf_provider_constrains_a_random_model_to_the_schema(tiny_base, sample_dataset, tmp_path):
    """The untrained base writes no JSON on its own; under the schema processor every answer parses."""
    import torch

    from atm.eval.harness import load_items, load_suite, model_items, run_eval, select_items
    from atm.eval.backends.hf import HFProvider
    from atm.prompting.advice import parse_advice

    spec = f"hf:{tiny_base}"
    m = run_eval([spec], _suite(), tmp_path / "hf-base", data=str(sample_dataset), limit=4,
                 with_baselines=False, quiet=True)
    assert m["models"][spec]["validity"]["valid"] == 4
    assert all(x["valid"] for x in _records(tmp_path / "hf-base", spec))
    # the same prompts decoded freely: what the constraint prevents
    items = model_items(select_items(load_items(sample_dataset, "verify"), load_suite(None), 4))
    prov = HFProvider(spec, str(tiny_base), generation={"max_tokens": 64})
    prov._load()
    enc = prov.tok(prov._prompts(items), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = prov._model.generate(**enc, max_new_tokens=64, do_sample=False, pad_token_id=prov.tok.pad_token_id)
    free = prov.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert not any(parse_advice(t).valid for t in free)


@pytest.mark.slow
def test_openai_and_ollama_providers_against_atm_serve(tiny_merged, sample_dataset, tmp_path):
    from atm.eval.harness import run_eval
    from atm.runtime import free_port
    from atm.serve.testing import ServerProcess

    port = free_port()
    srv = ServerProcess(["--model", f"tiny={tiny_merged}", "--engine", "transformers", "--parallel", "2"], port,
                        log=tmp_path / "serve.log")
    try:
        srv.wait_ready(180)
        spec = f"openai:tiny@http://127.0.0.1:{port}/v1"
        m = run_eval([spec], _suite(), tmp_path / "oa", data=str(sample_dataset), limit=4, concurrency=2,
                     with_baselines=False, quiet=True)
        r = m["models"][spec]
        assert r["n"] == 4 and r["failed"] == 0, r["validity"]
        os.environ["OLLAMA_HOST"] = f"http://127.0.0.1:{port}"
        try:
            m = run_eval(["ollama:tiny"], _suite(), tmp_path / "ol", data=str(sample_dataset), limit=4,
                         with_baselines=False, quiet=True)
        finally:
            os.environ.pop("OLLAMA_HOST", None)
        r = m["models"]["ollama:tiny"]
        assert r["n"] == 4 and r["failed"] == 0, r["validity"]
        # loglik through an OpenAI-compatible server: probabilities from logprobs, or a stated fallback
        m = run_eval([spec], _suite(), tmp_path / "oa-ll", data=str(sample_dataset), limit=3, mode="loglik",
                     with_baselines=False, quiet=True)
        r = m["models"][spec]
        recs = _records(tmp_path / "oa-ll", spec)
        assert all(x["probs"] for x in recs if x["valid"]) or "no logprobs" in (r["note"] or "")
    finally:
        srv.stop()


@pytest.mark.slow
@pytest.mark.native
def test_atm_concurrency_runs_a_llama_server_engine(tiny_gguf, sample_dataset, tmp_path):
    from atm.eval.harness import run_eval
    from atm.export.llamacpp import find_tool

    if find_tool("llama-server") is None:
        pytest.skip("llama-server is not built here (atm doctor --build builds it)")
    m = run_eval(["atm:q8"], _suite(), tmp_path / "srv", data=str(sample_dataset), limit=16, concurrency=4,
                 with_baselines=False, quiet=True)
    man = json.loads((tmp_path / "srv" / "manifest.json").read_text())
    assert man["models"]["atm:q8"]["describe"]["engine"] == "llama-server"
    r = m["models"]["atm:q8"]
    assert r["n"] == 16 and r["failed"] == 0 and r["validity"]["rate"] == 1.0
    # the engine process is gone when the run ends
    import subprocess as sp

    out = sp.run(["pgrep", "-af", str(man["models"]["atm:q8"]["describe"]["path"])], capture_output=True, text=True)
    assert "llama-server" not in out.stdout
