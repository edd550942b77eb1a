"""Every recipe in finetune/ loads and validates; CLI help; accelerate configs validate."""

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
def test_accelerate_configs_validate_as_accelerate_launch_reads_them(conf):
    """Each config goes through what `accelerate launch --config_file` does with it (its config
    class, its launcher's checks and environment), then into the plugin the worker builds from that
    environment. DeepSpeed's plugin validates without deepspeed installed."""
    pytest.importorskip("accelerate")
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(conf), "--num_processes", "2",
                              "--main_process_port", "0", "-m", "atm"])
    args, defaults, _ = _validate_launch_command(args)  # unknown top-level keys raise here
    options = {a.dest for a in parser._actions}
    for key in defaults.fsdp_config:  # nested keys become launcher options; a typo would not
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in options, (conf.name, key)
    for key in defaults.deepspeed_config:
        assert key in options, (conf.name, key)
    assert args.num_processes == 2 and defaults.mixed_precision == "no"  # the recipe decides
    kind = defaults.distributed_type.value
    if kind == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        with patch_environment(**{k: v for k, v in env.items() if k.startswith("ACCELERATE_")}):
            plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == defaults.deepspeed_config["zero_stage"]
        zero = plugin.deepspeed_config["zero_optimization"]
        assert zero["stage3_gather_16bit_weights_on_model_save"] == (plugin.zero_stage == 3)
    else:
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_MIXED_PRECISION"] == "no"
        assert kind in {"MULTI_GPU", "FSDP"} and args.multi_gpu == (kind == "MULTI_GPU")
    if kind == "FSDP":
        assert env["ACCELERATE_USE_FSDP"] == "true"
        with patch_environment(**{k: v for k, v in env.items() if k.startswith(("ACCELERATE_",
                                                                                 "FSDP_"))}):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
        assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"


def test_cli_help_has_examples(cli):
    for verb in ("base", "sft", "orpo", "dapo", "merge"):
        out = cli("finetune", verb, "--help").stdout
        assert "examples:" in out, verb
