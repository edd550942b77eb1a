"""ORPO's tokenized rows (atm.finetune.tokenized): batched, equal to TRL's per-example path id for
id on real tokenizers and chat templates, stored once and reused by reruns and resumes, rebuilt
when anything that changes the tokens changes, and never read half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["qwen2.5", "llama-3.2", "phi-3", "smollm2"]


def _rows(data: Path, n: int):
    from atm.finetune.train import load_split

    return load_split(data, "preference", "train", ["prompt", "chosen", "rejected"]).select(range(n))


def _split(data: Path) -> Path:
    from atm.finetune.train import split_file

    return split_file(data, "preference")


def _trl_reference(tok, rows, max_length: int):
    """TRL's own ORPO preparation: maybe_extract_prompt, maybe_apply_chat_template, tokenize_row
    (ATM's, as AtmORPOTrainer.tokenize_row calls it), one example at a time."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    from atm.finetune.orpo import tokenize_row

    ds = rows.map(maybe_extract_prompt, keep_in_memory=True)
    ds = ds.map(maybe_apply_chat_template, fn_kwargs={"processing_class": tok}, keep_in_memory=True)
    return ds.map(lambda ex: tokenize_row(tok, ex, max_length), keep_in_memory=True)


def _assert_same_ids(reference, prepared) -> None:
    from atm.finetune.tokenized import ORPO_COLUMNS

    assert len(reference) == len(prepared.dataset)
    ours = prepared.dataset[:]
    for col in ORPO_COLUMNS:
        assert reference[col] == ours[col], col


def _tokenizer(name: str, tiny_base: Path):
    if name == "tiny":
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(tiny_base))
    from atm.finetune.families import build_tokenizer

    return build_tokenizer(name)


@pytest.mark.parametrize("name", ["tiny", *FAMILIES])
def test_batched_rows_equal_trls_per_example_path(name, tiny_base, sample_dataset, tmp_path):
    from atm.finetune.tokenized import OrpoBatchTokenizer, prepare_orpo

    tok = _tokenizer(name, tiny_base)
    rows = _rows(sample_dataset, 96)
    batch = OrpoBatchTokenizer(tok, 1024)
    rendered = batch.render(rows[:8])
    assert batch.fast(rendered) is not None, "the prompt-once path should apply to this template"
    prepared = prepare_orpo(rows, tok, _split(sample_dataset), 1024, cache_dir=str(tmp_path))
    _assert_same_ids(_trl_reference(tok, rows, 1024), prepared)
    lengths = prepared.lengths
    assert lengths["checked"] == 96 and lengths["over"] == 0
    # each row's stored length is what check_lengths counts (apply_chat_template, tokenize=True)
    stored = prepared.dataset.with_format(None)["length"]
    for i in (0, 95):
        row = rows[i]
        assert stored[i] == max(len(tok.apply_chat_template(list(row["prompt"]) + list(row[s]),
                                                            tokenize=True)["input_ids"])
                                for s in ("chosen", "rejected"))
    assert lengths["max"] == max(stored)


def test_truncation_and_empty_answers_as_the_per_example_path(sample_dataset, tmp_path, caplog):
    from atm.finetune.families import build_tokenizer
    from atm.finetune.tokenized import prepare_orpo

    tok = build_tokenizer("smollm2")
    rows = _rows(sample_dataset, 48)
    prompt_len = len(_trl_reference(tok, rows.select([0]), 4096)[0]["prompt_input_ids"])
    for max_length in (prompt_len + 6, prompt_len - 40):  # answers cut; prompts filling max_length
        prepared = prepare_orpo(rows, tok, _split(sample_dataset), max_length, use_cache=False)
        _assert_same_ids(_trl_reference(tok, rows, max_length), prepared)
        assert prepared.lengths["over"] == 48
    assert prepared.lengths["empty_answers"] == 96
    assert "answers are empty" in caplog.text


def test_a_cut_that_is_not_an_added_token_falls_back_to_full_encodes(sample_dataset, caplog):
    """The prompt-once path only cuts at tokens the tokenizer splits out first. Cutting at an
    ordinary token ("\n\n", inside the user turn) re-tokenizes differently: the path notices and
    the plain full encodes give the ids. And when its ids differ from full encodes without it
    noticing (a fault put in its output here), the check on each batch's first rows catches it."""
    from atm.finetune.families import build_tokenizer
    from atm.finetune.tokenized import OrpoBatchTokenizer

    tok = build_tokenizer("smollm2")
    rows = _rows(sample_dataset, 16)[:]
    batch = OrpoBatchTokenizer(tok, 1024)
    plain = batch.plain(batch.render(rows))
    ordinary = tok("\n\n", add_special_tokens=False)["input_ids"]
    assert len(ordinary) == 1 and ordinary[0] not in tok.added_tokens_decoder
    batch.anchors = {ordinary[0]: "\n\n"}
    assert batch.fast(batch.render(rows)) is None
    out = batch(rows)
    assert out["prompt_input_ids"] == [p for p, *_ in plain]
    assert out["chosen_answer_ids"] == [c for _, c, *_ in plain]

    class Faulty(OrpoBatchTokenizer):
        def fast(self, rendered):
            res = super().fast(rendered)
            return [(p, c[:-1], r, n) for p, c, r, n in res]

    faulty = Faulty(tok, 1024)
    out = faulty(rows)
    assert out["chosen_answer_ids"] == [c for _, c, *_ in plain]
    assert not faulty.tail and "differs from full encodes" in caplog.text


def test_rerun_reuses_the_cache_and_any_change_rebuilds(tiny_base, sample_dataset, tmp_path):
    import transformers

    from atm.finetune.tokenized import META_FILE, prepare_orpo

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_base))
    rows = _rows(sample_dataset, 400)
    cache = str(tmp_path / "cache")
    first = prepare_orpo(rows, tok, _split(sample_dataset), 1024, cache_dir=cache)
    assert first.info["hit"] is False and Path(first.info["path"], META_FILE).is_file()
    again = prepare_orpo(rows, tok, _split(sample_dataset), 1024, cache_dir=cache)
    assert again.info["hit"] is True and again.info["key"] == first.info["key"]
    assert again.info["seconds"] < first.info["seconds"]
    assert again.dataset[:] == first.dataset[:]
    # the same tokenizer loaded from another directory is the same key
    copy = tmp_path / "tok-copy"
    tok.save_pretrained(str(copy))
    moved = prepare_orpo(rows, transformers.AutoTokenizer.from_pretrained(str(copy)),
                         _split(sample_dataset), 1024, cache_dir=cache)
    assert moved.info["hit"] is True

    keys = {first.info["key"]}
    # max_length, rows used (max_train_samples), chat template, tokenizer, data file: each rebuilds
    changed = [prepare_orpo(rows, tok, _split(sample_dataset), 512, cache_dir=cache),
               prepare_orpo(rows.select(range(300)), tok, _split(sample_dataset), 1024, cache_dir=cache)]
    templated = transformers.AutoTokenizer.from_pretrained(str(tiny_base))
    templated.chat_template = tok.chat_template.replace("{{ bos_token }}", "{{ bos_token }}Market data. ")
    changed.append(prepare_orpo(rows, templated, _split(sample_dataset), 1024, cache_dir=cache))
    other_data = tmp_path / "other.parquet"
    other_data.write_bytes(_split(sample_dataset).read_bytes() + b"\0")
    changed.append(prepare_orpo(rows, tok, other_data, 1024, cache_dir=cache))
    for c in changed:
        assert c.info["hit"] is False
        keys.add(c.info["key"])
    assert len(keys) == 5
    # a changed template changes the ids: the rebuilt rows are the new template's
    assert changed[2].dataset[0]["prompt_input_ids"] != first.dataset[0]["prompt_input_ids"]
    _assert_same_ids(_trl_reference(templated, rows, 1024), changed[2])


def test_a_killed_build_leaves_nothing_that_is_read(sample_dataset, tmp_path):
    """SIGKILL during a build: no entry appears (only a temp dir); the next build removes that
    leftover and stores a complete entry."""
    from atm.finetune.families import build_tokenizer
    from atm.finetune.tokenized import META_FILE, prepare_orpo

    cache = tmp_path / "cache"
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from atm.finetune.families import build_tokenizer\n"
        "from atm.finetune.train import load_split, split_file\n"
        "from atm.finetune.tokenized import prepare_orpo\n"
        "rows = load_split(%r, 'preference', 'train', ['prompt', 'chosen', 'rejected'])\n"
        "prepare_orpo(rows, build_tokenizer('smollm2'), split_file(%r, 'preference'), 1024, cache_dir=%r)\n"
    ) % (str(ROOT / "src"), str(sample_dataset), str(sample_dataset), str(cache))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "ATM_NO_PROGRESS": "1"})
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            tmp = [p for p in cache.glob(".orpo-*.tmp-*") if any(p.iterdir())]  # writing
            if tmp:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert tmp, "no build started within 300 s"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []
    left = [p for p in cache.iterdir()]
    assert left and not any((p / META_FILE).exists() for p in left)

    from atm.finetune.train import load_split

    rows = load_split(sample_dataset, "preference", "train", ["prompt", "chosen", "rejected"])
    done = prepare_orpo(rows, build_tokenizer("smollm2"), _split(sample_dataset), 1024, cache_dir=str(cache))
    assert done.info["hit"] is False and len(done.dataset) == len(rows)
    assert [p.name for p in cache.iterdir()] == [Path(done.info["path"]).name]


def test_orpo_run_resumes_on_the_cached_rows(tiny_base, sample_dataset, tmp_path):
    from atm.finetune.train import read_log, train

    cache = tmp_path / "cache"
    out = tmp_path / "orpo"
    sets = [f"model={tiny_base}", f"data={sample_dataset}", f"output_dir={out}", "max_train_samples=64",
            "logging_steps=1", "save_steps=2", f"tokenized_cache_dir={cache}"]
    train("orpo", ROOT / "finetune" / "tiny-cpu.yaml", [*sets, "max_steps=2"])
    first = json.loads((out / "atm_run.json").read_text())
    assert first["tokenized"]["hit"] is False and first["token_lengths"]["checked"] == 64
    train("orpo", ROOT / "finetune" / "tiny-cpu.yaml", [*sets, "max_steps=4"])  # resumes checkpoint-2
    second = json.loads((out / "atm_run.json").read_text())
    assert Path(second["resumed_from"]).name == "checkpoint-2" and second["global_step"] == 4
    assert second["tokenized"]["hit"] is True and second["tokenized"]["key"] == first["tokenized"]["key"]
    assert second["tokenized"]["seconds"] < first["tokenized"]["built_seconds"]
    assert second["token_lengths"] == first["token_lengths"]
    assert [r["step"] for r in read_log(out) if "loss" in r and "step" in r] == [1, 2, 3, 4]
    # a changed max_length is another entry: built, not reused
    train("orpo", ROOT / "finetune" / "tiny-cpu.yaml", [*sets, "max_steps=1", "max_length=900",
                                                        f"output_dir={tmp_path / 'other'}"])
    third = json.loads((tmp_path / "other" / "atm_run.json").read_text())
    assert third["tokenized"]["hit"] is False and third["tokenized"]["key"] != first["tokenized"]["key"]
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_the_trainer_refuses_prepared_rows_that_differ_from_trls(tiny_base, sample_dataset, tmp_path):
    """The probe check is live: rows whose ids are not TRL's are refused before training."""
    from atm.errors import AtmError
    from atm.finetune.tokenized import Prepared, expand_orpo
    from atm.finetune.train import build_trainer, load_config, load_model_for_training

    cfg = load_config("orpo", ROOT / "finetune" / "tiny-cpu.yaml", [
        f"model={tiny_base}", f"data={sample_dataset}", f"output_dir={tmp_path / 'run'}",
        f"tokenized_cache_dir={tmp_path / 'cache'}"])
    model, tok = load_model_for_training(cfg)
    rows = _rows(sample_dataset, 32)
    trainer = build_trainer("orpo", cfg, model, tok, rows, [])
    good = trainer.atm_prepared
    assert good.info["hit"] is False and len(trainer.train_dataset) == 32
    # the same rows with each prompt's last id dropped: what a wrong tokenization looks like
    stored = good.dataset.with_format(None)
    bad = stored.map(lambda ex: {"prompt_input_ids": ex["prompt_input_ids"][:-1]}, keep_in_memory=True)
    with pytest.raises(AtmError, match="differs from TRL's per-example path"):
        type(trainer)(model=trainer.model.get_base_model(), args=trainer.args, train_dataset=rows,
                      prepared=Prepared(bad.with_transform(expand_orpo), rows, good.info),
                      processing_class=tok)
