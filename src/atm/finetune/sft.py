"""SFT on CPU: score only the positions the loss reads.

TRL's SFTTrainer replaces the model's LM head with a fused, chunked one (``add_fused_lm_head``:
per-token log-probs, entropy and top-1 without the ``(batch, seq, vocab)`` logits). On CUDA/XPU its
Triton kernel scores only the positions whose label is not -100; elsewhere it scores every position
of the batch, in torch tiles, and recomputes them in the backward. With completion-only loss a
SmolLM2 row has ~540 positions and ~30 labels: on 2 CPU cores that head took ~4.6 s of a ~14.7 s
step, and SFT ran at 0.82x a bare PyTorch LoRA loop (benchmarks/bench_finetune.py --smollm2).

``score_label_positions_only`` wraps that head, on devices without Triton, with one that runs the
backbone, projects only the labelled positions through the LM head and returns the same
``FusedCausalLMOutput`` fields TRL's ``compute_loss`` reads (loss, log_probs, entropy, is_top1,
label_mask), equal to the fused head's up to float rounding (tests/finetune/test_finetune_sft_head.py).
Models whose head TRL transforms (temperature, logit scale or soft-capping, MoE router losses) and
calls with pre-shifted labels keep TRL's head.
"""

from __future__ import annotations

import functools
import logging
import types

log = logging.getLogger(__name__)

# Config fields that change the logits TRL's fused head scores: such models keep TRL's head.
_TRANSFORMED = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                "logits_scaling", "output_router_logits")


def score_label_positions_only(trainer) -> bool:
    """Give the trainer's model a head that scores only labelled positions when its device runs
    TRL's fused head without Triton (CPU, MPS, ...). Returns whether it did."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    if trainer.args.device.type in ("cuda", "xpu"):
        return False
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    text_config = model.config.get_text_config()
    if any(getattr(text_config, k, None) not in (None, False) for k in _TRANSFORMED):
        return False
    fused = model.forward  # TRL's fused forward (the original one when fused_lm_head=False)

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head or labels is None or shift_labels is not None:
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:].to(hidden.device)
        mask = labels != -100
        target = labels[mask]
        logits = self.get_output_embeddings()(hidden[mask]).float()
        logp = logits.log_softmax(-1)
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
            top1 = logits.argmax(-1) == target  # the first maximum, as the fused head's rule

        def spread(x):  # per labelled position -> (batch, seq - 1), zero elsewhere
            return x.new_zeros(mask.shape).masked_scatter(mask, x)

        log_probs = spread(picked)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=spread(entropy),
                                   log_sum_sq_probs=None, mean_logits=None, is_top1=spread(top1),
                                   label_mask=mask, aux_loss=None)

    model.forward = types.MethodType(forward, model)
    model.atm_trl_forward = fused  # kept for the test that compares the two heads
    log.info("SFT on %s: the LM head scores only labelled positions (TRL's fused head scores every "
             "position without Triton)", trainer.args.device.type)
    return True


def advice_end(tok, ids: list[int]) -> int | None:
    """How many of the answer tokens ``ids`` it takes to write the advice value completely
    (``{"advice": "BUY`` plus the token that holds its closing quote); None if it never does."""
    from atm.constants import ADVICES
    from atm.prompting.answer import ADVICE_KEY

    for j in range(1, len(ids) + 1):
        text = tok.decode(ids[:j])
        m = ADVICE_KEY.search(text)
        if m and any(text[m.end():].startswith(a + '"') for a in ADVICES):
            return j
    return None


def advice_labels_only(trainer, tok) -> None:
    """SFT loss on the advice only (``sft.loss_on: advice``): the collator's labels are cut after
    the token that closes the advice value of each row's answer."""
    collate = trainer.data_collator

    def collator(features):
        batch = collate(features)
        labels = batch["labels"]
        for r in range(labels.shape[0]):
            pos = (labels[r] != -100).nonzero().flatten()
            if not len(pos):
                continue
            k = advice_end(tok, labels[r, pos].tolist())
            if k is not None:
                labels[r, pos[k:]] = -100
        return batch

    trainer.data_collator = collator
    log.info("SFT loss on the advice value only (sft.loss_on=advice)")
