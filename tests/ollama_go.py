"""Go's own text/template, as an Ollama server runs a Modelfile TEMPLATE (tests/export/gotemplate).

Used by the Modelfile tests (tests/export/) and the real-family path (tests/test_families.py); the
session fixture ``gotemplate`` in conftest.py builds the tool once with Debian's golang-go.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

GO_SRC = Path(__file__).resolve().parent / "export" / "gotemplate" / "main.go"


def build_gotemplate(out: Path) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (scripts/setup.sh --tests installs Debian's golang-go): "
                    "the Modelfile TEMPLATE cannot be rendered by Go here")
    env = {**os.environ, "GOCACHE": str(out / "cache"), "GOPATH": str(out / "gopath"), "GOPROXY": "off",
           "GOTOOLCHAIN": "local", "GOFLAGS": "", "CGO_ENABLED": "0"}
    proc = subprocess.run([go, "build", "-o", str(out / "gotemplate"), str(GO_SRC)], env=env,
                          capture_output=True, text=True, cwd=out)
    assert proc.returncode == 0, proc.stderr
    return out / "gotemplate"


def go_render(exe: Path, modelfile: str, requests: list[list[dict]]) -> list[str]:
    """The prompts an Ollama server would build from ``modelfile`` for each chat request."""
    proc = subprocess.run([str(exe)], input=json.dumps({"modelfile": modelfile, "requests": requests}),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["prompts"]
