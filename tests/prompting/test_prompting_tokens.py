"""Real token counts: each family's tokenizer and chat template as transformers applies them, the shared
prefix a prefix cache reuses, the dataset card's token table, and `atm prompts show --family/--model`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leakage import raw_sample_frame

from atm.prompting import tokens as tk
from atm.prompting.dataset import BuildConfig, build_dataset
from atm.prompting.encoders import get_encoder
from atm.prompting.template import Template

ROOT = Path(__file__).resolve().parents[2]
ZIPS = sorted((ROOT / "datasets/samples/binance/data/spot/daily/klines/BTCUSDT/1m").glob("*.zip"))


@pytest.fixture(scope="module")
def hf_tokenizers():
    """The families' tokenizers as transformers loads them (ATM builds them into its cache once)."""
    from atm.finetune.families import build_tokenizer

    return {f: build_tokenizer(f) for f in tk.FAMILIES}


@pytest.fixture(scope="module")
def df():
    return raw_sample_frame(ZIPS)


def _hf_ids(tok, messages, gen=True):
    enc = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def _prompts(df):
    """Every shipped template over its own encoder's real contexts, plus edge texts."""
    out = []
    for path in sorted((ROOT / "prompts").glob("*.yaml")):
        t = Template.load(path)
        enc = get_encoder(t.spec.encoder or "seed-json", **t.spec.encoder_config)
        for ctx in enc.encode(df, np.array([enc.lookback + 3, 9000])) + ["", " lead", "tab\there \u00e9\U0001F600"]:
            out.append(t.render(ctx))
            out.append(t.render(ctx) + [{"role": "assistant", "content": t.answer("SELL", -12.5)}])
    return out


def test_families_are_the_ones_atm_rebuilds():
    from atm.finetune.families import FAMILIES, family, tokenizer_cache_dir

    assert tk.FAMILIES == tuple(FAMILIES)
    assert all(tokenizer_cache_dir(family(f)) == tk.family_tokenizer_dir(f) for f in tk.FAMILIES)


def test_fast_counter_equals_transformers_apply_chat_template(hf_tokenizers, df):
    prompts = _prompts(df)
    for fam, tok in hf_tokenizers.items():
        c = tk.load_counter(fam)
        assert c.name == fam and c.source == str(tk.family_tokenizer_dir(fam).resolve())
        for msgs in prompts:
            gen = msgs[-1]["role"] == "user"
            assert c.render(msgs, gen) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert c.prompt_ids(msgs, gen) == _hf_ids(tok, msgs, gen), (fam, msgs[-1]["content"][:40])
    assert tk.load_counter("smollm2") is tk.load_counter("SmolLM2")  # loaded once per process


def test_counter_of_a_model_dir(tiny_base, df):
    """Any HF model dir (here the tiny base ATM trains): the same counts as transformers."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_base))
    c = tk.load_counter(str(tiny_base))
    assert c.name == tiny_base.name
    for msgs in _prompts(df)[:12]:
        assert c.prompt_ids(msgs) == _hf_ids(tok, msgs)


def test_unknown_and_unbuilt_tokenizers_say_what_to_do(tmp_path, monkeypatch):
    from atm.errors import AtmError

    with pytest.raises(AtmError, match="neither a model family"):
        tk.load_counter(str(tmp_path / "nope"))
    monkeypatch.setenv("ATM_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(tk.TokenizerUnavailable, match="atm doctor --build"):
        tk.load_counter("qwen2.5")


@pytest.mark.parametrize("name", ["seed", "compact", "seed-compat", "natural"])
def test_shared_prefix_is_everything_before_the_context(hf_tokenizers, df, name):
    """The prefix count is the tokens of the prompt text up to the context (system, k-shot pairs, the
    user turn's header and instruction), found independently by tokenizing that text alone."""
    t = Template.load(name)
    enc = get_encoder(t.spec.encoder or "seed-json", **t.spec.encoder_config)
    contexts = enc.encode(df, np.array([enc.lookback + 1, 4000, 12000]))
    for fam, tok in hf_tokenizers.items():
        c = tk.load_counter(fam)
        n = tk.prefix_tokens(t, c, contexts)
        full = c.render(t.render(contexts[0]), True)
        head = full[: full.index(contexts[0])]
        ids = _hf_ids(tok, t.render(contexts[0]))
        assert n == len(tok(head, add_special_tokens=False)["input_ids"]), (fam, name)
        assert ids[:n] == tok(head, add_special_tokens=False)["input_ids"]
        # every item's prompt starts with those tokens; the rest is the item's own
        for ctx in contexts:
            assert _hf_ids(tok, t.render(ctx))[:n] == ids[:n]
        counts = tk.count_items(t, c, contexts, [t.answer("BUY", 1.0)] * len(contexts))
        assert counts.prefix == n
        assert list(counts.prompt) == [len(_hf_ids(tok, t.render(x))) for x in contexts]
        assert list(counts.per_item) == list(counts.prompt - n)
        assert list(counts.context) == [len(tok(x, add_special_tokens=False)["input_ids"]) for x in contexts]
        assert (counts.per_item > counts.context).all()  # the context, then the turn's end and the reply header


def test_compact_context_costs_under_half_the_seed_json_tokens(df):
    rows = np.arange(11, len(df), 97)
    seed = get_encoder("seed-json").encode(df, rows)
    compact = get_encoder("compact").encode(df, rows)
    for fam in tk.FAMILIES:
        c = tk.load_counter(fam)
        ratio = c.count(compact).sum() / c.count(seed).sum()
        assert ratio < 0.5, (fam, ratio)


def test_card_reports_real_counts_per_family(sample_dataset):
    info = json.loads((sample_dataset / "dataset.json").read_text())
    card = (sample_dataset / "README.md").read_text()
    tokens = info["tokens"]
    samp = tokens["sample"]
    for split in ("train", "verify"):
        n = info["splits"][split]["items"]
        k = BuildConfig.model_fields["token_sample"].default
        assert samp["items"][split] == n and samp["counted"][split] == min(k, n) == len(samp["rows"][split])
        # evenly spaced over the split's items, first and last included
        items = __import__("pyarrow.parquet", fromlist=["x"]).read_table(
            sample_dataset / "items" / "data" / f"{split}-00000-of-00001.parquet", columns=["row"]).column("row").to_numpy()
        assert samp["rows"][split][0] == items[0] and samp["rows"][split][-1] == items[-1]
        assert set(samp["rows"][split]) <= set(items.tolist())
    assert list(tokens["counters"]) == list(tk.FAMILIES)
    assert "## Tokens per item (real tokenizers)" in card and "chars/4" not in card
    template = Template.from_yaml(info["template"]["yaml"])
    import pyarrow.parquet as pq

    verify = pq.read_table(sample_dataset / "items" / "data" / "verify-00000-of-00001.parquet").to_pylist()
    by_row = {r["row"]: r for r in verify}
    for fam, entry in tokens["counters"].items():
        a = entry["all"]
        assert a["items"] == sum(samp["counted"].values())
        assert a["prompt"]["p50"] == a["prefix"] + a["per_item"]["p50"]
        assert f"| {fam} | {a['prefix']} | {a['per_item']['p50']:.0f} (" in card
        # recount one sampled verify item from the stored prompt, independently
        item = by_row[samp["rows"]["verify"][0]]
        c = tk.load_counter(fam)
        assert len(c.prompt_ids(item["prompt"])) >= entry["verify"]["prompt"]["min"]
        assert tk.prefix_tokens(template, c) >= a["prefix"]


def _run_build(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


BUILD = """
import json, sys
{pre}
from atm.prompting.dataset import BuildConfig, build_dataset
out = build_dataset(BuildConfig(klines={klines!r}, out={out!r}, encoder="compact", template="compact"))
info = json.loads((out / "dataset.json").read_text())
print(json.dumps({{"tokens": info["tokens"], "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules}}))
"""


def test_build_counts_without_torch_or_transformers(tmp_path, btc_parquet):
    r = _run_build(BUILD.format(pre="", klines=str(btc_parquet), out=str(tmp_path / "ds")))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["torch"] is False and res["transformers"] is False
    assert set(res["tokens"]["counters"]) == set(tk.FAMILIES) and res["tokens"]["note"] is None


def test_build_without_tokenizers_or_family_cache_notes_it_in_the_card(tmp_path, btc_parquet):
    r = _run_build(BUILD.format(pre="sys.modules['tokenizers'] = None", klines=str(btc_parquet),
                                out=str(tmp_path / "no-pkg")))
    assert r.returncode == 0, r.stderr
    tokens = json.loads(r.stdout.strip().splitlines()[-1])["tokens"]
    assert tokens["counters"] == {} and "tokenizers not installed" in tokens["note"]
    assert "pip install 'atm[tokens]'" in (tmp_path / "no-pkg" / "README.md").read_text()
    r = _run_build(BUILD.format(pre="", klines=str(btc_parquet), out=str(tmp_path / "no-cache")),
                   env={"ATM_CACHE": str(tmp_path / "empty-cache")})
    assert r.returncode == 0, r.stderr
    tokens = json.loads(r.stdout.strip().splitlines()[-1])["tokens"]
    assert all("atm doctor --build" in c["error"] for c in tokens["counters"].values())
    card = (tmp_path / "no-cache" / "README.md").read_text()
    assert "| smollm2 | not counted: " in card


def test_token_config_is_checked(tmp_path, btc_parquet):
    from atm.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model families"):
        BuildConfig.load(None, klines="a", out="b", token_families=["gpt-2"])
    out = build_dataset(BuildConfig(klines=str(btc_parquet), out=str(tmp_path / "off"), token_families=[],
                                    token_sample=5))
    info = json.loads((out / "dataset.json").read_text())
    assert info["tokens"]["counters"] == {} and "off" in info["tokens"]["note"]
    assert info["tokens"]["sample"]["counted"] == {"train": 5, "verify": 5}


def test_cli_show_counts_with_families_and_a_model_dir(cli, sample_dataset, tiny_base, btc_parquet):
    r = cli("prompts", "show", "--dataset", str(sample_dataset), "--n", "2", "--family", "smollm2,qwen2.5",
            "--model", str(tiny_base), "--json")
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2
    for s in lines:
        tc = s["token_counts"]
        assert list(tc) == ["smollm2", "qwen2.5", tiny_base.name]
        c = tk.load_counter("smollm2")
        assert s["tokens"] == tc["smollm2"]["prompt"] == len(c.prompt_ids(s["messages"]))
        for name, v in tc.items():
            assert v["prompt"] == v["prefix"] + v["per_item"]
            # (the tiny vocabulary, trained on these prompts, merges the instruction's end with the context)
            assert v["context"] < v["per_item"] or name == tiny_base.name
    r = cli("prompts", "show", "--dataset", str(sample_dataset), "--n", "1")
    assert "dataset card:" in r.stdout and "smollm2" in r.stdout  # the card's real counts, then the estimate
    r = cli("prompts", "show", "--klines", str(btc_parquet), "--template", "compact", "--n", "1", "--family", "llama-3.2")
    assert "llama-3.2: " in r.stdout and "shared prefix" in r.stdout and "open_changes (x0.01):" in r.stdout
