"""DAPO: the dynamic-sampling group filter (fake rewards) and short real runs on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[2]


def test_group_keep_mask_on_fake_rewards():
    from atm.finetune.dapo import group_keep_mask

    nan = float("nan")
    rewards = torch.tensor([
        -100.0, -100.0, -100.0, -100.0,   # all invalid: no signal
        0.0, 0.0, 0.0, 0.0,               # all NOOP: no signal
        -20.0, 0.0, 0.0, 0.0,             # one BUY among NOOPs: signal
        5.0, 5.0, 5.0 + 1e-9, 5.0,        # equal within atol: no signal
        nan, 3.0, nan, nan,               # one scorable completion: no spread
        nan, 3.0, -1.0, nan,              # two scorable, different: signal
    ])
    keep = group_keep_mask(rewards, num_generations=4, atol=1e-6)
    assert keep.tolist() == [False, False, True, False, False, True]
    with pytest.raises(ValueError):
        group_keep_mask(torch.zeros(6), num_generations=4)


def test_select_and_concat_repad_prompts_left_completions_right():
    from atm.finetune.dapo import concat_batches, select_rows

    a = {"prompt_ids": torch.tensor([[9, 1, 2], [1, 2, 3]]), "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
         "completion_ids": torch.tensor([[5, 6], [7, 9]]), "completion_mask": torch.tensor([[1, 1], [1, 0]]),
         "advantages": torch.tensor([0.5, -0.5]), "num_items_in_batch": torch.tensor(3)}
    b = {"prompt_ids": torch.tensor([[4]]), "prompt_mask": torch.tensor([[1]]),
         "completion_ids": torch.tensor([[8, 8, 8]]), "completion_mask": torch.tensor([[1, 1, 1]]),
         "advantages": torch.tensor([1.0]), "num_items_in_batch": torch.tensor(3)}
    out = concat_batches([select_rows(a, torch.tensor([1])), select_rows(b, torch.tensor([0]))], pad_token_id=9)
    assert out["prompt_ids"].tolist() == [[1, 2, 3], [9, 9, 4]]
    assert out["prompt_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["completion_ids"].tolist() == [[7, 9, 9], [8, 8, 8]]
    assert out["completion_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert out["advantages"].tolist() == [-0.5, 1.0]
    with pytest.raises(Exception, match="unsupported"):
        select_rows({**a, "pixel_values": torch.zeros(2, 3)}, torch.tensor([0]))


def test_recipe_rejects_group_not_dividing_batch():
    from atm.errors import ConfigError
    from atm.finetune.train import load_config

    with pytest.raises(ConfigError, match="multiple of dapo.num_generations"):
        load_config("dapo", ROOT / "finetune" / "tiny-cpu.yaml",
                    ["per_device_train_batch_size=6", "dapo.num_generations=4"])


@pytest.mark.slow
def test_dapo_after_sft_has_reward_spread_and_dynamic_sampling(tiny_sft, sample_dataset, tmp_path):
    from atm.finetune.train import read_log, train

    run = train("dapo", ROOT / "finetune" / "tiny-cpu.yaml", overrides=[
        f"model={tiny_sft}", f"data={sample_dataset}", f"output_dir={tmp_path / 'dapo'}",
        "max_steps=3", "logging_steps=1", "save_steps=3", "per_device_train_batch_size=8",
        "dapo.num_generations=4", "dapo.max_refill_rounds=2"])
    steps = [r for r in read_log(run) if "reward" in r]
    assert len(steps) == 3
    # After the SFT warm-up, completions within a group differ in reward (the DAPO reward: the
    # eval scorer plus the soft overlong penalty), so the policy gets a gradient. A 30-step tiny
    # model rarely gets the 8-decimal number right, so most of the spread comes from validity
    # and length; the scorer's values stay in its documented range.
    assert max(r["reward_std"] for r in steps) > 0, steps
    assert all(-100.0 <= r["rewards/advice_reward/mean"] <= 100.0 for r in steps)
    assert any(r["loss"] != 0 for r in steps)
    # Zero-spread groups were met, dropped and refilled.
    assert sum(r["dynamic_sampling/groups_dropped"] for r in steps) > 0
    assert sum(r["dynamic_sampling/groups_refilled"] for r in steps) > 0
    # Dynamic sampling ran and reported what it dropped and refilled.
    for r in steps:
        assert {"dynamic_sampling/groups_dropped", "dynamic_sampling/refill_rounds",
                "dynamic_sampling/frac_groups_with_signal"} <= set(r)
        assert r["dynamic_sampling/refill_rounds"] <= 2
        assert (r["dynamic_sampling/groups_dropped"] == 0) == (r["dynamic_sampling/refill_rounds"] == 0)
    info = json.loads((Path(run) / "atm_run.json").read_text())
    assert info["status"] == "done" and info["global_step"] == 3
    assert info["config"]["dapo"]["epsilon_high"] == 0.28
