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


# ------------------------------------------------------------------ issue 22: what a new user meets
def _run(argv, capsys):
    from atm.cli import run

    with pytest.raises(SystemExit) as exc:
        run(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize("argv,usage,hint", [
    (["serve", "--modle", "atm:q8"], "usage: atm serve ", "--modle -> --model"),
    (["eval", "run", "--model", "baseline:majority", "--limt", "5"], "usage: atm eval run ", "--limt -> --limit"),
    (["data", "build", "--raw", "x", "--symbol", "BTCUSDT", "--fil-gaps"], "usage: atm data build ",
     "--fil-gaps -> --fill-gaps"),
])
def test_unknown_flag_gets_the_subcommands_usage_and_a_suggestion(argv, usage, hint, capsys):
    """It printed `usage: atm [-h] [--version] COMMAND ...` for a flag of a subcommand."""
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert err.startswith(usage), err
    assert "unrecognized arguments" in err and f"(did you mean {hint}?)" in err


def test_a_set_typo_names_set_and_the_full_dotted_key(tmp_path):
    """It blamed the shipped YAML and suggested only the last part of the key."""
    p = tmp_path / "r.yaml"
    p.write_text("name: a\n")
    with pytest.raises(ConfigError) as exc:
        Demo.load(p, overrides=["lora.rr=3"])
    msg = str(exc.value)
    assert msg.startswith("--set: invalid Demo:") and str(p) not in msg
    assert "--set lora.rr: unknown key 'lora.rr' (did you mean 'lora.r'?)" in msg
    p.write_text("lora:\n  rr: 3\n")  # the same typo in the file names the file
    with pytest.raises(ConfigError, match=f"^{p}: invalid Demo:\n  - unknown key 'lora.rr' "
                                          r"\(did you mean 'lora.r'\?\)"):
        Demo.load(p)


def test_suite_set_typo_suggests_metrics_n_boot():
    from atm.eval.harness import load_suite

    with pytest.raises(ConfigError) as exc:
        load_suite(None, ["metrics.nboot=5"])
    msg = str(exc.value)
    assert msg.startswith("--set: invalid SuiteConfig") and "default.yaml" not in msg
    assert "did you mean 'metrics.n_boot'?" in msg


def test_help_shows_each_default_once_and_market_has_help():
    from atm.cli import build_parser, verb_parsers

    serve = verb_parsers(build_parser("serve"))["serve"].format_help()
    assert "(default: None)" not in serve and "(default: [])" not in serve
    assert "(default 127.0.0.1: this machine only)" in serve
    data = verb_parsers(verb_parsers(build_parser("data"))["data"])
    for verb in ("build", "download"):
        text = " ".join(data[verb].format_help().split())
        assert "USD-M" in text and "(default: spot)" in text, text


def test_progress_bars_only_on_a_terminal(monkeypatch):
    """Sent to a file, a 15-line eval log was 15.7 KB of bars: no bars without a terminal."""
    import io

    from atm.utils import progress, progress_off

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for stream, env, off in ((io.StringIO(), None, True), (Tty(), None, False), (Tty(), "1", True),
                             (io.StringIO(), "0", False)):
        monkeypatch.setattr(sys, "stderr", stream)
        if env is None:
            monkeypatch.delenv("ATM_NO_PROGRESS", raising=False)
        else:
            monkeypatch.setenv("ATM_NO_PROGRESS", env)
        assert progress_off() is off
        bar = progress(range(50), desc="x")
        for _ in bar:
            pass
        bar.close()
        assert (stream.getvalue() == "") is off, (env, stream.getvalue()[:80])
