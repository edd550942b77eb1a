"""Every recipe under datasets/recipes/ documents, in its comment, commands that work in that order on
a fresh clone (issue 22: `atm prompts build --config datasets/recipes/sample-compact.yaml` failed on
`runs/data/btcusdt.parquet: klines parquet not found`, because `atm data build` writes
runs/data/btcusdt-1m.parquet). This runs them, as written, in an empty directory holding only the
shipped sample (what a fresh clone has), each recipe's commands in order."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

RECIPES = sorted((ROOT / "datasets" / "recipes").glob("*.yaml"))


def documented(recipe: Path) -> list[list[str]]:
    """The `atm ...` command lines of a recipe's leading comment (a trailing `# ...` dropped)."""
    out = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        cmd = line.lstrip("#").strip()
        if cmd.startswith("atm "):
            out.append(shlex.split(cmd.split("  #", 1)[0]))
    return out


def test_every_recipe_documents_its_commands():
    assert RECIPES
    for recipe in RECIPES:
        cmds = documented(recipe)
        assert cmds and cmds[-1] == ["atm", "prompts", "build", "--config", f"datasets/recipes/{recipe.name}"], \
            recipe.name
        assert cmds[0][:3] == ["atm", "data", "build"], f"{recipe.name}: the klines it reads are built first"


def test_documented_recipe_commands_run_on_a_fresh_clone(tmp_path):
    # what a fresh clone holds (tracked files): no runs/, no datasets/build/
    clone = tmp_path / "clone"
    (clone / "datasets").mkdir(parents=True)
    for name in ("prompts", "eval", "finetune", "serve", "datasets/samples", "datasets/recipes"):
        (clone / name).symlink_to(ROOT / name)
    done: set[tuple[str, ...]] = set()
    for recipe in RECIPES:
        for cmd in documented(recipe):
            if tuple(cmd) in done:  # the shared first step (the same klines) runs once
                continue
            proc = subprocess.run([sys.executable, "-m", "atm", *cmd[1:]], cwd=clone, capture_output=True,
                                  text=True, timeout=600, env={**os.environ, "ATM_NO_PROGRESS": "1"})
            assert proc.returncode == 0, f"{recipe.name}: `{shlex.join(cmd)}` failed:\n{proc.stderr[-2000:]}"
            done.add(tuple(cmd))
        out = yaml.safe_load(recipe.read_text())["out"]
        assert (clone / out / "dataset.json").is_file(), recipe.name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_klines_is_what_atm_data_build_writes_by_default(recipe):
    assert yaml.safe_load(recipe.read_text())["klines"] == "runs/data/btcusdt-1m.parquet"
