"""bf16 only where the CPU computes it natively: a recipe's bf16 runs as fp32 on an AVX2-only CPU.

On AVX2 (no avx512_bf16 / amx_bf16) torch's bf16 matmuls ran at 0.8 GFLOP/s against 59 in fp32 on
2 threads. ``$ATM_CPU_FLAGS`` stands in for /proc/cpuinfo's flags, so this machine (whatever its
CPU) runs the AVX2 branch and the native-bf16 branch alike; no test here assumes either CPU.
"""

from __future__ import annotations

import json

import pytest

from atm.finetune.train import cpu_precision, load_config
from conftest import ROOT, run_cli

AVX2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c"
AVX512_BF16 = AVX2 + " avx512f avx512bw avx512vl avx512_bf16"


@pytest.mark.parametrize("flags, native", [(AVX2, False), (AVX512_BF16, True), (AVX2 + " amx_bf16", True)])
def test_cpu_precision_follows_the_cpu(monkeypatch, flags, native):
    monkeypatch.setenv("ATM_CPU_FLAGS", flags)
    cfg = load_config("sft", ROOT / "finetune" / "sft-a100.yaml")
    assert cfg.bf16  # the A100 recipe asks for bf16
    got, note = cpu_precision(cfg)
    if native:
        assert got.bf16 and note is None
    else:
        assert not got.bf16 and "fp32" in note and "native bf16" in note
    cpu_recipe = load_config("sft", ROOT / "finetune" / "tiny-cpu.yaml")
    assert cpu_precision(cpu_recipe) == (cpu_recipe, None)  # an fp32 recipe stays as it is


def test_every_cpu_recipe_is_fp32():
    for name in ("tiny-cpu.yaml", "smollm2-cpu.yaml"):
        cfg = load_config("sft", ROOT / "finetune" / name)
        assert not cfg.bf16 and not cfg.fp16, name


def test_doctor_says_which_precision_applies():
    rep = json.loads(run_cli("doctor", "--json", env={"ATM_CPU_FLAGS": AVX2}).stdout)["cpu"]
    assert rep["isa"] == "avx2" and rep["native_bf16"] is False and "runs as fp32" in rep["training on this CPU"]
    rep = json.loads(run_cli("doctor", "--json", env={"ATM_CPU_FLAGS": AVX512_BF16}).stdout)["cpu"]
    assert rep["isa"] == "avx512_bf16" and rep["native_bf16"] is True


@pytest.mark.slow
def test_a_bf16_recipe_trains_in_fp32_on_an_avx2_cpu(monkeypatch, tiny_base, sample_dataset, tmp_path):
    """The A100 recipe, two steps on the tiny model as an AVX2-only CPU: fp32, and the run says so."""
    monkeypatch.setenv("ATM_CPU_FLAGS", AVX2)
    from atm.finetune.train import train

    out = train("sft", ROOT / "finetune" / "sft-a100.yaml", overrides=[
        f"model={tiny_base}", f"data={sample_dataset}", f"output_dir={tmp_path / 'sft'}", "max_steps=2",
        "per_device_train_batch_size=2", "max_train_samples=8", "optim=adamw_torch"])
    run = json.loads((out / "atm_run.json").read_text())
    assert run["status"] == "done" and run["config"]["bf16"] is False
    assert "fp32" in run["precision_note"] and run["distributed"]["mixed_precision"] == "no"
    assert run["provenance"]["machine"]["cpu"]["native_bf16"] is False
