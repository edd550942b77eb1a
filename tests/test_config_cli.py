"""The shared config system and the CLI shell: unknown keys rejected, overrides typed, help everywhere."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import Field

from atm.cli import COMMANDS
from atm.config import AtmConfig
from atm.errors import ConfigError


class Inner(AtmConfig):
    r: int = Field(8, description="LoRA rank")


class Demo(AtmConfig):
    learning_rate: float = Field(1e-4, description="peak learning rate")
    name: str = Field("x", description="run name")
    lora: Inner = Field(default_factory=Inner, description="LoRA settings")


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("learning_rate: 0.01\nlora:\n  r: 4\n")
    cfg = Demo.load(p, overrides=["name=run1", "lora.r=16"])
    assert cfg.learning_rate == 0.01 and cfg.name == "run1" and cfg.lora.r == 16


def test_unknown_key_rejected_with_suggestion(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("learnin_rate: 0.01\n")
    with pytest.raises(ConfigError) as exc:
        Demo.load(p)
    msg = str(exc.value)
    assert "unknown key 'learnin_rate'" in msg and "did you mean 'learning_rate'" in msg
    assert str(p) in msg


def test_nested_unknown_key_and_bad_type():
    with pytest.raises(ConfigError, match="unknown key 'lora.rank'"):
        Demo.load(overrides=["lora.rank=3"])
    with pytest.raises(ConfigError, match="learning_rate"):
        Demo.load(overrides=["learning_rate=fast"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        Demo.load(overrides=["learning_rate"])
    with pytest.raises(ConfigError, match="not found"):
        Demo.load(tmp_path / "nope.yaml")


def test_every_command_and_verb_has_help_with_example():
    from atm.cli import build_parser, verb_parsers

    for name in COMMANDS:
        proc = subprocess.run([sys.executable, "-m", "atm", name, "--help"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, (name, proc.stderr)
        assert "examples:" in proc.stdout, f"`atm {name} --help` shows no example"
        stage = verb_parsers(build_parser(name)).get(name)
        for verb, vp in verb_parsers(stage).items():
            assert "examples:" in vp.format_help(), f"`atm {name} {verb} --help` shows no example"


def test_atm_eval_is_atm_eval_alias():
    a = subprocess.run([sys.executable, "-c", "from atm.cli import eval_main; eval_main(['--help'])"],
                       capture_output=True, text=True, timeout=120)
    b = subprocess.run([sys.executable, "-m", "atm", "eval", "--help"], capture_output=True, text=True, timeout=120)
    assert a.returncode == 0 and a.stdout.replace("atm-eval", "atm eval") == b.stdout.replace("atm-eval", "atm eval")


def test_top_level_help_is_light():
    """`atm --help` must not import torch or llama.cpp (heavy deps live in extras, loaded lazily)."""
    code = ("import sys, contextlib, io\n"
            "from atm.cli import run\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    rc = run([])\n"
            "print(rc, sorted(m for m in ('torch', 'llama_cpp', 'transformers', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "0 []", out.stdout + out.stderr
