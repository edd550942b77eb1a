"""`atm demo` profiles: every file in demos/ is a valid DemoConfig, and names resolve."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "demos").glob("*.yaml"))


def test_profiles_exist():
    assert {p.stem for p in PROFILES} >= {"tiny", "smollm2"}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_profile_loads_and_names_real_files(path):
    from atm.demo import DemoConfig

    cfg = DemoConfig.load(path)
    for rel in (cfg.dataset_recipe, cfg.recipe, cfg.shipped_dataset_recipe):
        if rel:
            assert (ROOT / rel).is_file(), rel
    assert cfg.base == "tiny" or cfg.base.startswith("gguf:")


def test_tiny_profile_is_the_default():
    from atm.demo import DemoConfig

    assert DemoConfig.load(ROOT / "demos" / "tiny.yaml").to_dict() == DemoConfig().to_dict()


def test_unknown_profile_lists_the_known_ones(cli):
    proc = cli("demo", "--profile", "gpt-9", check=False)
    assert proc.returncode != 0 and "no demo profile 'gpt-9'" in proc.stderr and "smollm2, smollm2-learn, tiny" in proc.stderr


def test_balanced_training_rows(sample_dataset):
    from atm.finetune.train import balanced_rows, load_split

    ds = load_split(sample_dataset, "sft", "train", ["messages"])
    rows, counts = balanced_rows("sft", ds, 300)
    assert counts == {"BUY": 100, "NOOP": 100, "SELL": 100} and len(rows) == 300
    # spread over the train period, not its first hours; in dataset (chronological) order
    ids = rows["id"] if "id" in rows.column_names else None
    from atm.prompting.advice import parse_advice

    got = [parse_advice(m[-1]["content"]).advice for m in rows["messages"]]
    assert got.count("NOOP") == 100
    pref = load_split(sample_dataset, "preference", "train", ["prompt", "chosen", "rejected"])
    _, c2 = balanced_rows("orpo", pref, None)
    assert len(set(c2.values())) == 1 and c2["BUY"] >= 500
    with pytest.raises(Exception, match="SFT and ORPO"):
        balanced_rows("dapo", ds, 30)
    del ids


def test_eval_shard_is_checked_when_the_profile_loads():
    from atm.demo import DemoConfig
    from atm.errors import AtmError

    cfg = DemoConfig.load(ROOT / "demos" / "smollm2.yaml")
    assert cfg.eval_shard == "1/10" and cfg.eval_limit is None
    for bad in ("11/10", "0/4", "half"):
        with pytest.raises((AtmError, ValueError), match="eval_shard"):
            DemoConfig.load(ROOT / "demos" / "smollm2.yaml", overrides=[f"eval_shard={bad}"])


def test_a_stage_runs_once_and_a_rerun_says_how_long_it_took(tmp_path, capsys):
    from atm.demo import DemoConfig, Pipeline

    cfg = DemoConfig(workdir=str(tmp_path / "w"))
    out = tmp_path / "made.txt"
    calls = []

    def fn() -> dict:
        calls.append(1)
        out.write_text("x")
        return {"outputs": [str(out)]}

    for run in range(2):
        pipe = Pipeline(cfg, tmp_path)
        pipe.stage("make", 1, [], {"p": 1}, fn)
    assert calls == [1]
    assert "[1/1] make: done earlier in 0 s, reused" in capsys.readouterr().out
    Pipeline(cfg, tmp_path).stage("make", 1, [], {"p": 2}, fn)  # other params: runs again
    assert calls == [1, 1]


def test_help_lists_every_setting_with_its_default(cli):
    from atm.demo import DemoConfig

    out = cli("demo", "--help").stdout
    for name in DemoConfig.model_fields:
        assert f"  {name} (default " in out, name
    assert "quants (default ['q8_0', 'q4_k_m'])" in out and "PydanticUndefined" not in out
