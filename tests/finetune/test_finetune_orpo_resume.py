"""ORPO on the tiny base; a run killed with SIGKILL resumes from its last checkpoint."""

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


def test_orpo_loss_decreases_and_logs_accuracy(tiny_base, sample_dataset, tmp_path):
    from atm.finetune.train import read_log, train

    run = train("orpo", ROOT / "finetune" / "tiny-cpu.yaml", overrides=[
        f"model={tiny_base}", f"data={sample_dataset}", f"output_dir={tmp_path / 'orpo'}",
        "max_steps=20", "logging_steps=5", "max_train_samples=200"])
    logs = [r for r in read_log(run) if "loss" in r and "rewards/accuracies" in r]
    assert len(logs) == 4
    assert logs[-1]["loss"] < 0.7 * logs[0]["loss"], logs
    # chosen-vs-rejected accuracy is logged and ends above chance.
    accs = [r["rewards/accuracies"] for r in logs]
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert sum(accs[-2:]) / 2 > 0.5, accs
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    assert (Path(run) / "adapter_model.safetensors").exists()


def _cmd(base, data, out):
    return [sys.executable, "-m", "atm", "finetune", "sft", "--recipe", str(ROOT / "finetune" / "tiny-cpu.yaml"),
            "--set", f"model={base}", "--set", f"data={data}", "--set", f"output_dir={out}",
            "--set", "max_steps=10", "--set", "save_steps=3", "--set", "logging_steps=1",
            "--set", "max_train_samples=100", "--set", "save_total_limit=5"]


def test_resume_after_kill_reaches_same_final_step(tiny_base, sample_dataset, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATM_NO_PROGRESS": "1"}
    proc = subprocess.Popen(_cmd(tiny_base, sample_dataset, out), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / "checkpoint-3" / "trainer_state.json").exists():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert (out / "checkpoint-3" / "trainer_state.json").exists(), "no checkpoint within 300 s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "atm_run.json").exists() or json.loads((out / "atm_run.json").read_text())["status"] == "running"
    done = subprocess.run(_cmd(tiny_base, sample_dataset, out), env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    info = json.loads((out / "atm_run.json").read_text())
    assert info["status"] == "done" and info["global_step"] == 10
    assert Path(info["resumed_from"]).name.startswith("checkpoint-")
    resumed_at = int(Path(info["resumed_from"]).name.split("-")[1])
    assert resumed_at >= 3
    state = json.loads((out / "checkpoint-9" / "trainer_state.json").read_text())
    assert state["global_step"] == 9
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    begins = [r for r in log if r.get("event") == "train_begin"]
    assert [b["global_step"] for b in begins] == [0, resumed_at]
    assert log[-1] == {**log[-1], "event": "train_end", "global_step": 10}
