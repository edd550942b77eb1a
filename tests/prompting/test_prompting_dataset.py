"""build_dataset on the real sample: layout, loading with `datasets`, a truthful card, pairs, few-shot
from train only, atomic writes, the CLI, and TRL's ORPO trainer reading the preference view."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from atm.errors import AtmError
from atm.prompting.advice import parse_advice, score_advice
from atm.prompting.dataset import VIEWS, BuildConfig, build_dataset, view_file
from atm.prompting.encoders import get_encoder
from atm.prompting.template import Template
from atm.utils import sha256_file

ROOT = Path(__file__).resolve().parents[2]


def _items(ds: Path, split: str) -> pd.DataFrame:
    return pq.read_table(view_file(ds, "items", split)).to_pandas()


def _build(tmp: Path, btc_parquet: Path, name: str, **kw) -> Path:
    cfg = BuildConfig(klines=str(btc_parquet), out=str(tmp / name), **kw)
    return build_dataset(cfg)


def test_layout_and_load_dataset(sample_dataset):
    import datasets

    for view in VIEWS:
        for split in ("train", "verify"):
            assert view_file(sample_dataset, view, split).is_file()
    for f in ("klines.parquet", "dataset.json", "README.md"):
        assert (sample_dataset / f).is_file()
    pref = datasets.load_dataset("parquet", data_dir=str(sample_dataset / "preference"))
    assert set(pref) == {"train", "verify"}
    row = pref["train"][0]
    assert {"prompt", "chosen", "rejected", "id", "margin"} <= set(row)
    assert row["id"] == "BTCUSDT-2025-08-01T00:11:00"  # symbol + the minute's open time
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
    assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    sft = datasets.load_dataset("parquet", data_dir=str(sample_dataset / "sft"))
    rl = datasets.load_dataset("parquet", data_dir=str(sample_dataset / "rl"))
    items = datasets.load_dataset("parquet", data_dir=str(sample_dataset / "items"))
    assert sft["train"].num_rows == rl["train"].num_rows == items["train"].num_rows == pref["train"].num_rows
    assert {"ret_BUY", "ret_NOOP", "ret_SELL", "prompt", "id"} <= set(rl["verify"].column_names)
    # the views agree on every minute: sft = prompt + chosen answer; items carry the same prompt
    s, p, it = sft["verify"][5], pref["verify"][5], items["verify"][5]
    assert s["id"] == p["id"] == it["id"]
    assert s["messages"] == p["prompt"] + p["chosen"]
    assert it["prompt"] == p["prompt"] and it["answer"] == p["chosen"][0]["content"]
    # the card's front matter declares the views as configs
    assert datasets.load_dataset(str(sample_dataset), "items")["verify"].num_rows == items["verify"].num_rows


def test_card_and_dataset_json_are_truthful(sample_dataset, btc_parquet):
    info = json.loads((sample_dataset / "dataset.json").read_text())
    card = (sample_dataset / "README.md").read_text()
    assert info["source"]["sha256"] == sha256_file(btc_parquet)
    assert sha256_file(sample_dataset / "klines.parquet") == sha256_file(btc_parquet)
    for rel, digest in info["files"].items():
        assert sha256_file(sample_dataset / rel) == digest
    raw = json.loads(Path(str(btc_parquet) + ".meta.json").read_text())["files"]
    assert len(info["source"]["files"]) == len(raw) == 11
    for f in raw:
        assert f["sha256"] in card
    for split in ("train", "verify"):
        items = _items(sample_dataset, split)
        counts = items["label"].value_counts().to_dict()
        assert info["splits"][split]["label_balance"] == {a: counts.get(a, 0) for a in ("BUY", "NOOP", "SELL")}
        pref = pq.read_table(view_file(sample_dataset, "preference", split)).to_pandas()
        ch = pref["chosen_advice"].value_counts().to_dict()
        assert info["splits"][split]["chosen_balance"] == {a: ch.get(a, 0) for a in ("BUY", "NOOP", "SELL")}
        lb = info["splits"][split]["label_balance"]
        assert f"{lb['BUY']:,} / {lb['NOOP']:,} / {lb['SELL']:,}" in card
        assert info["splits"][split]["items"] == len(items) and items["id"].is_unique
    assert "embargo 180 minutes" in card and "Label rule: `seed`" in card and "`seed-json`" in card
    # the whole build's row accounting adds up
    assert info["rows"]["items"] + sum(info["rows"]["dropped"].values()) == info["rows"]["klines"]


def test_template_travels_and_re_renders_the_stored_prompts(sample_dataset):
    """One renderer: the template + encoder config in dataset.json rebuild the stored prompts exactly."""
    from atm.market.klines import read_klines_parquet

    info = json.loads((sample_dataset / "dataset.json").read_text())
    template = Template.from_yaml(info["template"]["yaml"])
    enc = info["encoder"]
    encoder = get_encoder(enc.pop("name"), **enc)
    df = read_klines_parquet(sample_dataset / "klines.parquet")
    items = _items(sample_dataset, "verify").iloc[::500]
    contexts = encoder.encode(df, items["row"].to_numpy())
    for ctx, prompt, stored_ctx in zip(contexts, items["prompt"], items["context"]):
        assert ctx == stored_ctx
        assert template.render(ctx) == [dict(m) for m in prompt]


def test_splits_are_chronological_with_the_embargo(sample_dataset):
    train, verify = _items(sample_dataset, "train"), _items(sample_dataset, "verify")
    gap = verify["open_time"].min() - train["open_time"].max()
    assert gap >= pd.Timedelta(minutes=181)
    assert train["row"].max() < verify["row"].min()
    # verify is the last ~2 days of the sample
    assert str(verify["open_time"].min())[:10] == "2025-08-09"


def test_fewshot_examples_come_from_train_only(tmp_path, btc_parquet):
    ds = _build(tmp_path, btc_parquet, "fs", encoder="seed-json", template="seed", fewshot_k=3, fewshot_seed=7)
    info = json.loads((ds / "dataset.json").read_text())
    rows = info["template"]["example_rows"]
    assert len(rows) == 3
    template = Template.from_yaml(info["template"]["yaml"])
    assert sorted(e.advice for e in template.spec.examples) == ["BUY", "NOOP", "SELL"]
    assert all(e.split == "train" for e in template.spec.examples)
    train, verify = _items(ds, "train"), _items(ds, "verify")
    first_verify = verify["row"].min()
    for r in rows:
        assert r < first_verify - 180
        assert r not in set(train["row"]) and r not in set(verify["row"])  # not trained or scored on
    prompt = verify["prompt"].iloc[0]
    assert [m["role"] for m in prompt] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2 + ["user"]
    for seed in (1, 2, 3):  # whatever the seed, never a verify minute
        other = _build(tmp_path, btc_parquet, f"fs{seed}", template="seed", fewshot_k=6, fewshot_seed=seed)
        ex = json.loads((other / "dataset.json").read_text())["template"]["example_rows"]
        assert len(ex) == 6 and max(ex) < first_verify - 180


def test_reward_pairs_use_the_one_scorer(tmp_path, btc_parquet):
    ds = _build(tmp_path, btc_parquet, "rw", encoder="seed-json", template="seed", label="fee-aware",
                pairs="reward", all_worse=True, min_margin=5.0)
    info = json.loads((ds / "dataset.json").read_text())
    pref = pq.read_table(view_file(ds, "preference", "verify")).to_pandas()
    items = _items(ds, "verify").set_index("id")
    assert (pref["margin"] >= 5.0).all()
    assert info["pairs"]["dropped"]["pairs_dropped_below_min_margin"] > 0
    for _, p in pref.iloc[::50].iterrows():
        it = items.loc[p["id"]]
        ret = {a: it[f"ret_{a}"] for a in ("BUY", "NOOP", "SELL")}
        chosen = score_advice(p["chosen"][0]["content"], ret)
        rejected = score_advice(p["rejected"][0]["content"], ret)
        assert chosen - rejected == pytest.approx(p["margin"])
        assert chosen == max(score_advice(it["answer"].replace(it["label"], a), ret) for a in ret)
        assert it["label"] == p["chosen_advice"]  # fee-aware label == best realized advice
    # all_worse: a minute can give two pairs (best vs each worse advice)
    assert pref["id"].duplicated().any()


def test_compat_dataset_replicates_the_original(tmp_path, btc_parquet):
    ds = _build(tmp_path, btc_parquet, "compat", template="seed-compat", label="seed", pairs="random")
    info = json.loads((ds / "dataset.json").read_text())
    assert info["encoder"]["name"] == "seed-json-compat"  # the template's encoder
    pref = pq.read_table(view_file(ds, "preference", "train")).to_pandas()
    rejected = [json.loads(r[0]["content"]) for r in pref["rejected"]]
    assert {r["predicted_open_change"] for r in rejected} == {"0.00000000"}
    assert all(r["advice"] != c for r, c in zip(rejected, pref["chosen_advice"]))
    roles = [m["role"] for m in pref["prompt"].iloc[0]]
    assert roles == ["system"] + ["user", "assistant"] * 3 + ["user"]
    df = pq.read_table(ds / "klines.parquet").to_pandas()
    items = _items(ds, "train").iloc[:50]
    o = df["open"].to_numpy()
    assert items["change"].tolist() == ["%.8f" % (o[r] - o[r - 10]) for r in items["row"]]


def test_chunked_build_equals_one_chunk(tmp_path, btc_parquet, sample_dataset):
    ds = _build(tmp_path, btc_parquet, "chunked", encoder="seed-json", template=str(ROOT / "prompts/seed.yaml"),
                label="seed", pairs="random", chunk_rows=997)
    for view in VIEWS:
        for split in ("train", "verify"):
            a = pq.read_table(view_file(ds, view, split))
            b = pq.read_table(view_file(sample_dataset, view, split))
            assert a.equals(b), (view, split)


def test_build_is_atomic(tmp_path, btc_parquet):
    out = tmp_path / "atomic"
    with pytest.raises(Exception):  # noqa: B017 - any failure; a failure late in the build (an unreadable tokenizer dir)
        build_dataset(BuildConfig(klines=str(btc_parquet), out=str(out), tokenizer=str(tmp_path / "no-such-tok")))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp folder left behind
    build_dataset(BuildConfig(klines=str(btc_parquet), out=str(out)))
    with pytest.raises(AtmError, match="already exists"):
        build_dataset(BuildConfig(klines=str(btc_parquet), out=str(out)))
    before = sha256_file(out / "dataset.json")
    build_dataset(BuildConfig(klines=str(btc_parquet), out=str(out), overwrite=True, pairs="reward"))
    assert sha256_file(out / "dataset.json") != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic"]


def test_bad_inputs_name_what_is_wrong(tmp_path, btc_parquet):
    from atm.errors import ConfigError, DataError

    with pytest.raises(DataError, match="not found"):
        build_dataset(BuildConfig(klines=str(tmp_path / "nope.parquet"), out=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match="embargo"):
        build_dataset(BuildConfig(klines=str(btc_parquet), out=str(tmp_path / "x"), split={"embargo": 5}))
    with pytest.raises(ConfigError, match="unknown key"):
        BuildConfig.load(None, overrides=["klines=a", "out=b", "pair=random"])
    with pytest.raises(ConfigError, match="unknown encoder"):
        BuildConfig.load(None, klines="a", out="b", encoder="json")


def test_recipes_load():
    recipes = sorted((ROOT / "datasets" / "recipes").glob("*.yaml"))
    assert len(recipes) >= 2
    for r in recipes:
        cfg = BuildConfig.load(r)
        Template.load(ROOT / cfg.template if not Path(cfg.template).is_absolute() else cfg.template)


def test_cli_build_and_show(cli, tmp_path, btc_parquet):
    out = tmp_path / "cli-ds"
    r = cli("prompts", "build", "--config", "datasets/recipes/sample-seed.yaml", "--klines", str(btc_parquet),
            "--out", str(out), "--split", "train=0.75", "--split", "verify=0.25", "--fewshot-k", "3")
    assert "built" in r.stdout and "verify" in r.stdout
    info = json.loads((out / "dataset.json").read_text())
    assert info["split"]["verify"] == 0.25 and info["template"]["fewshot_k"] == 3
    r = cli("prompts", "show", "--dataset", str(out), "--n", "2")
    assert r.stdout.count("=== prompt") == 2 and "tokens (chars/4 estimate)" in r.stdout
    assert r.stdout.count("[assistant]") == 6  # 3-shot in each
    r = cli("prompts", "show", "--klines", str(btc_parquet), "--template", "natural", "--n", "1", "--json")
    s = json.loads(r.stdout)
    assert s["tokens"] == -(-s["chars"] // 4) and "RSI(14)" in s["messages"][-1]["content"]
    bad = cli("prompts", "build", "--klines", str(btc_parquet), "--out", str(out), check=False)
    assert bad.returncode == 2 and "already exists" in bad.stderr
    assert "examples:" in cli("prompts", "build", "--help").stdout


def test_trl_orpo_trainer_reads_the_preference_view(tmp_path, sample_dataset):
    """TRL's ORPO trainer prepares and trains one step on the dataset as written (tiny random Llama)."""
    import os

    import datasets
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    ds = datasets.load_dataset("parquet", data_dir=str(sample_dataset / "preference"))
    train = ds["train"].select(range(4))
    texts = [m["content"] for r in train for m in r["prompt"] + r["chosen"] + r["rejected"]]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts + ["system user assistant"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    args = ORPOConfig(output_dir=str(tmp_path / "orpo"), max_steps=1, per_device_train_batch_size=4, bf16=False,
                      gradient_checkpointing=False, learning_rate=1e-3, report_to=[], save_strategy="no",
                      max_length=1024, use_cpu=True, logging_steps=1, dataloader_num_workers=0)
    os.environ.setdefault("WANDB_DISABLED", "true")
    trainer = ORPOTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
    prepared = trainer.train_dataset
    assert {"chosen_input_ids", "rejected_input_ids", "prompt_input_ids"} <= set(prepared.column_names)
    # the chosen sequence is the prompt + the chosen JSON answer, tokenized as TRL does it
    assert len(prepared[0]["chosen_input_ids"]) > len(prepared[0]["prompt_input_ids"])
    out = trainer.train()
    assert out.global_step == 1 and np.isfinite(out.training_loss)


def test_advice_first_template_builds_an_advice_first_dataset(tmp_path, btc_parquet):
    """The template's answer order reaches every view and the schema dataset.json carries (which merge
    copies into atm_model.json and the registry, and constrained decoding follows)."""
    ds = _build(tmp_path, btc_parquet, "adv", template="compact-advice-first", token_families=[])
    info = json.loads((ds / "dataset.json").read_text())
    assert info["encoder"]["name"] == "compact"
    assert list(info["schema"]["properties"]) == info["schema"]["required"] == ["advice", "predicted_open_change"]
    assert Template.from_yaml(info["template"]["yaml"]).answer_format == "advice-first"
    sft = pq.read_table(view_file(ds, "sft", "verify")).to_pylist()[:50]
    pref = pq.read_table(view_file(ds, "preference", "train")).to_pylist()[:50]
    items = _items(ds, "verify").head(50)
    for text in ([r["messages"][-1]["content"] for r in sft] + [r["chosen"][0]["content"] for r in pref]
                 + [r["rejected"][0]["content"] for r in pref] + list(items["answer"])):
        assert text.startswith('{"advice": "') and parse_advice(text).valid, text
    assert all(parse_advice(a).advice == lab for a, lab in zip(items["answer"], items["label"]))
