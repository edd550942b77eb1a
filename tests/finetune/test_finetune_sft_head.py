"""SFT on CPU scores only the labelled positions (atm.finetune.sft): the same loss, per-token
log-probs, entropy, top-1 and LoRA gradients as TRL's fused LM head, on the tiny base
(assistant-only loss) and a real family's vocabulary and template (completion-only loss)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm2_tiny(session_tmp) -> Path:
    from atm.finetune.families import build_tiny_family_base

    out = session_tmp / "sft-head-smollm2-tiny"
    return out if out.exists() else build_tiny_family_base("smollm2", out)


def _trainer(base: Path, data: Path, out: Path, *sets: str):
    from atm.finetune.train import build_trainer, load_config, load_model_for_training, load_split

    cfg = load_config("sft", ROOT / "finetune" / "tiny-cpu.yaml", [
        f"model={base}", f"data={data}", f"output_dir={out}", "per_device_train_batch_size=3", *sets])
    model, tok = load_model_for_training(cfg)
    return build_trainer("sft", cfg, model, tok, load_split(data, "sft", "train", ["messages"]).select(range(6)), [])


def _grads(model, loss) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_label_positions_head_equals_trls_fused_head(which, tiny_base, smollm2_tiny, sample_dataset, tmp_path):
    import torch

    if which == "tiny":
        trainer = _trainer(tiny_base, sample_dataset, tmp_path / "run")
    else:
        trainer = _trainer(smollm2_tiny, sample_dataset, tmp_path / "run", "lora.modules_to_save=[]",
                           "sft.assistant_only_loss=false", "sft.completion_only_loss=true")
    peft_model = trainer.model
    base = peft_model.get_base_model()
    assert hasattr(base, "atm_trl_forward"), "the CPU head should be in place"
    batch = {k: v.to(trainer.args.device) for k, v in next(iter(trainer.get_train_dataloader())).items()}
    labelled = (batch["labels"][:, 1:] != -100).sum().item()
    assert 0 < labelled < batch["labels"][:, 1:].numel()  # a loss on part of the positions

    ours = peft_model(**batch, fused_lm_head=True)
    theirs = base.atm_trl_forward(**batch, fused_lm_head=True)
    assert torch.equal(ours.label_mask, theirs.label_mask)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    m = ours.label_mask
    torch.testing.assert_close(ours.log_probs[m], theirs.log_probs[m], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.entropy[m], theirs.entropy[m], rtol=1e-4, atol=1e-5)
    assert torch.equal(ours.is_top1[m], theirs.is_top1[m])
    assert not ours.log_probs[~m].any()
    g_ours, g_theirs = _grads(peft_model, ours.loss), _grads(peft_model, theirs.loss)
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) > 0
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=1e-3, atol=1e-6, msg=name)


def test_sft_trains_through_the_cpu_head_with_trls_metrics(tiny_base, sample_dataset, tmp_path):
    from atm.finetune.train import read_log, train

    run = train("sft", ROOT / "finetune" / "tiny-cpu.yaml", [
        f"model={tiny_base}", f"data={sample_dataset}", f"output_dir={tmp_path / 'sft'}",
        "max_steps=3", "logging_steps=1", "max_train_samples=12"])
    logs = [r for r in read_log(run) if "loss" in r and "step" in r]
    assert len(logs) == 3
    assert all(0.0 <= r["mean_token_accuracy"] <= 1.0 and r["entropy"] > 0 for r in logs)
    assert logs[-1]["num_tokens"] > logs[0]["num_tokens"] > 0
