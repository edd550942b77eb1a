"""`accelerate launch` with ATM's launch configs: DDP in 2 CPU processes (gloo) trains SFT and ORPO
to max_steps with one adapter written by rank 0 and resumes after the whole job is killed; FSDP is
refused on CPU and, like DeepSpeed, runs where its backend exists.

Step count: `max_steps` counts optimizer steps of the whole job. With 2 processes each step takes
2 x per_device_train_batch_size rows (one shard per rank), so a run ends at global_step == max_steps
having seen twice the rows of a 1-process run; the epoch it logs proves it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("accelerate")
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "finetune" / "tiny-cpu.yaml"
CONFIGS = ROOT / "finetune" / "accelerate"
ROWS, BATCH, PROCS = 64, 4, 2  # 64 rows in 8-row global batches: 8 optimizer steps per epoch


def _launch(config: str, method: str, out: Path, base: Path, data: Path, **sets) -> list[str]:
    """`accelerate launch` (its console script's entry point, so no PATH lookup) as a user types it."""
    sets = {"model": base, "data": data, "output_dir": out, "max_train_samples": ROWS,
            "per_device_train_batch_size": BATCH, "logging_steps": 1, **sets}
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
            "--config_file", str(CONFIGS / config), "--num_processes", str(PROCS),
            "--main_process_port", "0", "-m", "atm", "finetune", method, "--recipe", str(RECIPE),
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ATM_NO_PROGRESS": "1"}


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _assert_one_valid_adapter(out: Path) -> None:
    """One adapter in the run dir, no temp file of a second writer, and it loads onto its base."""
    import torch

    from atm.finetune.merge import load_merged

    assert sorted(p.name for p in out.glob("adapter_*")) == ["adapter_config.json",
                                                             "adapter_model.safetensors"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    model, tok = load_merged(out)
    ids = tok("BTCUSDT", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("method", ["sft", "orpo"])
def test_ddp_two_cpu_processes_train_to_max_steps(method, tiny_base, sample_dataset, tmp_path):
    out, steps = tmp_path / method, 4
    done = _run(_launch("ddp.yaml", method, out, tiny_base, sample_dataset, max_steps=steps,
                        save_steps=steps))
    assert done.returncode == 0, done.stderr[-4000:]
    info = json.loads((out / "atm_run.json").read_text())
    assert info["status"] == "done" and info["global_step"] == steps
    # What accelerate really set up: 2 gloo processes, the recipe's fp32 (not the launcher's).
    assert info["distributed"] == {"world_size": PROCS, "distributed_type": "MULTI_CPU",
                                   "backend": "gloo", "mixed_precision": "no",
                                   "global_batch_size": PROCS * BATCH}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # Rank 0 alone logs: one begin, one end, each step once.
    assert [r["event"] for r in log if "event" in r] == ["train_begin", "train_end"]
    trained = [r for r in log if "loss" in r]
    assert [r["step"] for r in trained] == list(range(1, steps + 1))
    # Each step took PROCS x BATCH rows: one process would be at steps / ceil(ROWS / BATCH).
    assert trained[-1]["epoch"] == pytest.approx(steps / math.ceil(ROWS / (PROCS * BATCH)))
    # Both ranks' RNG states are in the checkpoint (a resume restores each rank's data order).
    assert sorted(p.name for p in (out / f"checkpoint-{steps}").glob("rng_state_*.pth")) == [
        "rng_state_0.pth", "rng_state_1.pth"]
    assert done.stdout.count(f"{method}: {out}") == 1, done.stdout
    _assert_one_valid_adapter(out)


def _kill_job(launcher: subprocess.Popen) -> None:
    """SIGKILL the whole job, as a crash or a scheduler does. torchrun starts each worker in its own
    session, so killing the launcher's process group alone would leave the workers training."""
    import psutil

    if launcher.poll() is not None:  # it ended by itself (and stopped its workers)
        return
    procs = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
    for p in procs:
        try:
            pgid = os.getpgid(p.pid)
            if pgid != os.getpgid(0):
                os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait(timeout=30)
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"


def test_ddp_resumes_after_the_job_is_killed(tiny_base, sample_dataset, tmp_path):
    out, steps = tmp_path / "killed", 8
    cmd = _launch("ddp.yaml", "sft", out, tiny_base, sample_dataset, max_steps=steps, save_steps=3,
                  save_total_limit=5)
    err = tmp_path / "killed.stderr"
    with open(err, "w") as fh:  # a file, not a pipe: two chatty ranks would fill a pipe and block
        launcher = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=fh,
                                    start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and launcher.poll() is None:
            if (out / "checkpoint-3" / "trainer_state.json").exists():
                break
            time.sleep(0.2)
        assert launcher.poll() is None, err.read_text()[-4000:]
        assert (out / "checkpoint-3" / "trainer_state.json").exists(), "no checkpoint within 300 s"
    finally:
        _kill_job(launcher)
    assert json.loads((out / "atm_run.json").read_text())["status"] == "running"
    assert not (out / "adapter_model.safetensors").exists()

    done = _run(cmd)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("resuming from") == 1  # rank 0 says it, both ranks resume
    info = json.loads((out / "atm_run.json").read_text())
    assert info["status"] == "done" and info["global_step"] == steps
    assert info["distributed"]["world_size"] == PROCS
    resumed_at = int(Path(info["resumed_from"]).name.split("-")[1])
    assert 3 <= resumed_at < steps
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in log if r.get("event") == "train_begin"] == [0, resumed_at]
    assert log[-1] == {**log[-1], "event": "train_end", "global_step": steps}
    assert [r["step"] for r in log if "loss" in r][-(steps - resumed_at):] == list(
        range(resumed_at + 1, steps + 1))
    _assert_one_valid_adapter(out)


def _cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


NO_FSDP_ON_CPU = ("FSDP needs 2 CUDA GPUs: accelerate 1.15 sets FSDP up only on GPU-class devices "
                  "(on CPU its state stays MULTI_CPU, plain DDP, which ATM refuses); torch 2.13's "
                  "fully_shard itself does run on CPU/gloo")


@pytest.mark.skipif(_cuda_gpus() > 0, reason="checks the CPU-only refusal")
def test_fsdp_on_cpu_is_refused_not_run_as_plain_ddp(tiny_base, sample_dataset, tmp_path):
    out = tmp_path / "fsdp"
    done = _run(_launch("fsdp.yaml", "sft", out, tiny_base, sample_dataset, max_steps=1,
                        max_train_samples=8))
    assert done.returncode != 0
    assert "the accelerate config asks for FSDP, but accelerate 1.15" in done.stderr
    assert "set up MULTI_CPU on this machine" in done.stderr
    assert not (out / "atm_run.json").exists() and not (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("config,kind", [("fsdp.yaml", "FSDP"), ("zero2.yaml", "DEEPSPEED"),
                                         ("zero3.yaml", "DEEPSPEED")])
def test_sharded_configs_train_where_their_backend_exists(config, kind, tiny_base, sample_dataset,
                                                          tmp_path):
    if kind == "DEEPSPEED":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            pytest.skip("DeepSpeed is not installed: pip install deepspeed")
    if _cuda_gpus() < 2:
        pytest.skip(NO_FSDP_ON_CPU if kind == "FSDP" else "DeepSpeed ZeRO needs 2 CUDA GPUs")
    out, steps = tmp_path / config, 2
    done = _run(_launch(config, "sft", out, tiny_base, sample_dataset, max_steps=steps,
                        save_steps=steps))
    assert done.returncode == 0, done.stderr[-4000:]
    info = json.loads((out / "atm_run.json").read_text())
    assert info["global_step"] == steps and info["distributed"]["distributed_type"] == kind
    _assert_one_valid_adapter(out)
