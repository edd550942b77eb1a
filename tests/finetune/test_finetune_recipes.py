"""Every recipe in finetune/ loads and validates; CLI help; accelerate configs parse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "finetune").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "finetune" / "accelerate").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"tiny-cpu.yaml", "sft-a100.yaml", "sft-4090.yaml", "orpo-a100.yaml", "orpo-4090.yaml",
            "dapo-a100.yaml", "dapo-4090.yaml"} <= names
    assert {p.stem for p in ACCELERATE} >= {"ddp", "zero2", "zero3", "fsdp"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates_for_its_methods(recipe):
    from atm.finetune.config import FinetuneConfig
    from atm.finetune.train import load_config

    raw = yaml.safe_load(recipe.read_text())
    # Precision and checkpointing are explicit in every recipe (TRL's defaults differ).
    assert "bf16" in raw and "gradient_checkpointing" in raw, recipe
    cfg = FinetuneConfig.load(recipe)
    methods = [cfg.method] if cfg.method else ["sft", "orpo", "dapo"]
    for method in methods:
        resolved = load_config(method, recipe)
        assert "{method}" not in resolved.output_dir
        assert resolved.dapo.epsilon == 0.2 and resolved.dapo.epsilon_high == 0.28
    if "4090" in recipe.name:
        assert cfg.load_in_4bit and cfg.bf16
    if "a100" in recipe.name:
        assert cfg.bf16 and not cfg.load_in_4bit


def test_recipe_errors_name_the_key(tmp_path):
    from atm.errors import ConfigError
    from atm.finetune.train import load_config

    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config("sft", ROOT / "finetune" / "tiny-cpu.yaml", ["learning_rat=1"])
    with pytest.raises(ConfigError, match="valid keys: .*epsilon_high"):
        load_config("dapo", ROOT / "finetune" / "tiny-cpu.yaml", ["dapo.eps=1"])
    with pytest.raises(ConfigError, match="for 'orpo', not 'sft'"):
        load_config("sft", ROOT / "finetune" / "orpo-a100.yaml")


@pytest.mark.parametrize("conf", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_parse(conf):
    data = yaml.safe_load(conf.read_text())
    assert data["distributed_type"] in {"MULTI_GPU", "DEEPSPEED", "FSDP"}
    assert data["mixed_precision"] == "bf16"


def test_cli_help_has_examples(cli):
    for verb in ("base", "sft", "orpo", "dapo", "merge"):
        out = cli("finetune", verb, "--help").stdout
        assert "examples:" in out, verb
