"""DAPO on TRL's GRPOTrainer, plus the one piece TRL lacks: dynamic sampling.

TRL's GRPOTrainer already has the DAPO loss (`loss_type="dapo"`: token-level normalisation),
clip-higher (`epsilon`, `epsilon_high`), `mask_truncated_completions` and the soft overlong
punishment reward. What it lacks is dynamic sampling (DAPO paper, sec. 3.2): a prompt group whose
completions all get the same reward has zero advantage everywhere, so it adds no gradient but still
counts in the token normaliser, shrinking the update. DAPO drops such groups and samples new prompts
until the batch is full of groups with signal.

Extension point: `GRPOTrainer._generate_and_score_completions(inputs)` turns one generation batch
(each prompt repeated `num_generations` times, consecutively) into the padded tensors the loss uses.
`DynamicSamplingGRPOTrainer` calls it, finds the zero-spread groups from the rewards it just computed
(`_calculate_rewards` is wrapped to keep them), and while groups are missing calls it again on fresh
prompts drawn from the train set (bounded by `max_refill_rounds`), then concatenates the kept groups
(re-padding prompts on the left and completions on the right). If the rounds run out, the batch is
completed with zero-signal groups whose completion tokens are masked out, so they are dropped in
effect and the batch keeps its shape. Counts go to the logs as `dynamic_sampling/*`.

Groups never straddle processes: the config check requires the per-device generation batch to be a
multiple of `num_generations`; every process runs the same number of refill rounds (the collectives
inside TRL's step must stay matched), sized by the largest shortfall across processes.
"""

from __future__ import annotations

import hashlib
from typing import Any

from atm.errors import AtmError, require

LEFT_PADDED = {"prompt_ids": "pad", "prompt_mask": 0}
RIGHT_PADDED = {"completion_ids": "pad", "completion_mask": 0, "tool_mask": 1,
                "old_per_token_logps": 0.0, "ref_per_token_logps": 0.0,
                "sampling_per_token_logps": 0.0}
PER_ROW = {"advantages"}


def group_keep_mask(rewards, num_generations: int, atol: float = 1e-6):
    """True for each group of `num_generations` consecutive rewards that are not all equal.

    NaN rewards (unscorable completions) are ignored; a group with fewer than two scorable
    completions has no spread. ``rewards`` is 1-D with a length divisible by ``num_generations``.
    """
    torch = require("torch", "train")
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of "
                         f"{num_generations}")
    g = rewards.view(-1, num_generations).float()
    finite = ~torch.isnan(g)
    hi = torch.where(finite, g, torch.full_like(g, -float("inf"))).max(dim=1).values
    lo = torch.where(finite, g, torch.full_like(g, float("inf"))).min(dim=1).values
    return (finite.sum(dim=1) >= 2) & ((hi - lo) > atol)


def select_rows(batch: dict[str, Any], rows) -> dict[str, Any]:
    """The rows ``rows`` (a 1-D index tensor) of one `_generate_and_score_completions` output."""
    out = {}
    for key, value in batch.items():
        if key == "num_items_in_batch":
            continue
        if key not in LEFT_PADDED and key not in RIGHT_PADDED and key not in PER_ROW:
            raise AtmError(f"dynamic sampling: unsupported batch field {key!r} (multimodal, tool "
                           f"or vLLM importance-sampling batches are not supported); set "
                           f"dapo.dynamic_sampling=false")
        out[key] = value[rows]
    return out


def concat_batches(parts: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Concatenate row-selected batches, re-padding prompt (left) and completion (right) columns."""
    torch = require("torch", "train")
    F = torch.nn.functional
    parts = [p for p in parts if p and next(iter(p.values())).shape[0] > 0]
    if not parts:
        raise ValueError("no rows to concatenate")
    out: dict[str, Any] = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        if key in PER_ROW:
            out[key] = torch.cat(tensors, dim=0)
            continue
        left = key in LEFT_PADDED
        fill = (LEFT_PADDED if left else RIGHT_PADDED)[key]
        fill = pad_token_id if fill == "pad" else fill
        width = max(t.shape[1] for t in tensors)
        padded = []
        for t in tensors:
            extra = width - t.shape[1]
            padded.append(F.pad(t, (extra, 0) if left else (0, extra), value=fill) if extra else t)
        out[key] = torch.cat(padded, dim=0)
    return out


def _trl_grpo():
    trl = require("trl", "train")
    return trl.GRPOTrainer


def make_trainer_class():
    """Built lazily so importing atm.finetune.dapo stays light (no torch/trl at import)."""
    torch = require("torch", "train")
    GRPOTrainer = _trl_grpo()

    class DynamicSamplingGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with DAPO dynamic sampling (see the module docstring)."""

        def __init__(self, *args, dynamic_sampling: bool = True, max_refill_rounds: int = 4,
                     reward_std_atol: float = 1e-6, **kwargs):
            super().__init__(*args, **kwargs)
            self.dynamic_sampling = dynamic_sampling
            self.max_refill_rounds = max_refill_rounds
            self.reward_std_atol = reward_std_atol
            self._last_rewards_per_func = None
            self._refill_calls = 0

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._last_rewards_per_func = rewards  # gathered over processes, (N_global, n_funcs)
            return rewards

        def _local_keep(self, n_local: int):
            r = self._last_rewards_per_func
            weights = self.reward_weights.to(r.device).unsqueeze(0)
            total = (r * weights).nansum(dim=1)
            total[torch.isnan(r).all(dim=1)] = float("nan")
            start = self.accelerator.process_index * n_local
            return group_keep_mask(total[start:start + n_local].cpu(), self.num_generations,
                                   self.reward_std_atol)

        def _refill_inputs(self, n_groups: int, round_: int) -> list[dict[str, Any]]:
            # Deterministic per (seed, step, round, process): a resumed run draws the same prompts.
            key = f"{self.args.seed}:{self.state.global_step}:{round_}:{self.accelerator.process_index}"
            gen = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))
            idx = torch.randint(len(self.train_dataset), (n_groups,), generator=gen).tolist()
            rows = [self.train_dataset[i] for i in idx]
            return [dict(row) for row in rows for _ in range(self.num_generations)]

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if not self.dynamic_sampling or not self.model.training:
                return out
            G = self.num_generations
            n_groups = len(inputs) // G
            keep = self._local_keep(len(inputs))
            kept, spare = [], []
            dropped = int((~keep).sum())

            def split(batch, keep_mask):
                rows_keep = torch.nonzero(keep_mask.repeat_interleave(G)).flatten()
                rows_drop = torch.nonzero((~keep_mask).repeat_interleave(G)).flatten()
                dev = batch["advantages"].device
                if len(rows_keep):
                    kept.append(select_rows(batch, rows_keep.to(dev)))
                if len(rows_drop):
                    spare.append(select_rows(batch, rows_drop.to(dev)))

            split(out, keep)
            have = int(keep.sum())
            rounds = refilled = 0
            while rounds < self.max_refill_rounds:
                need = torch.tensor([max(n_groups - have, 0)], device=self.accelerator.device)
                need = int(self.accelerator.gather(need).max().item())
                if need == 0:
                    break
                rounds += 1
                refill = self._refill_inputs(need, rounds)
                refilled += need
                more = super()._generate_and_score_completions(refill)
                k = self._local_keep(len(refill))
                dropped += int((~k).sum())
                split(more, k)
                have += int(k.sum())

            pad_id = self._tokenizer.pad_token_id
            batch = concat_batches(kept, pad_id) if kept else None
            n_kept_rows = batch["advantages"].shape[0] if batch is not None else 0
            short = 0
            if n_kept_rows >= n_groups * G:
                batch = select_rows(batch, torch.arange(n_groups * G, device=batch["advantages"].device))
            else:
                # Out of rounds: complete the batch with zero-signal groups, their tokens masked
                # out of the loss and of the token normaliser (dropped in effect, same shape).
                missing = n_groups * G - n_kept_rows
                short = missing // G
                filler = concat_batches(spare, pad_id)
                filler = select_rows(filler, torch.arange(missing, device=filler["advantages"].device))
                filler["completion_mask"] = torch.zeros_like(filler["completion_mask"])
                filler["advantages"] = torch.zeros_like(filler["advantages"])
                batch = concat_batches([batch, filler] if batch is not None else [filler], pad_id)
            loss_mask = batch["completion_mask"] if "tool_mask" not in batch else \
                batch["completion_mask"] * batch["tool_mask"]
            batch["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()

            m = self._metrics["train"]
            m["dynamic_sampling/groups_dropped"].append(float(dropped))
            m["dynamic_sampling/groups_refilled"].append(float(refilled))
            m["dynamic_sampling/refill_rounds"].append(float(rounds))
            m["dynamic_sampling/groups_short"].append(float(short))
            m["dynamic_sampling/frac_groups_with_signal"].append(1.0 - short / max(n_groups, 1))
            return batch

    return DynamicSamplingGRPOTrainer


class ScaledAdviceReward:
    """`atm.prompting.advice.advice_reward` (THE scorer) times a constant; picklable."""

    __name__ = "advice_reward"

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, *args, **kwargs) -> list[float]:
        from atm.prompting.advice import advice_reward

        return [self.scale * r for r in advice_reward(*args, **kwargs)]


def reward_functions(cfg) -> list:
    """The DAPO reward: the eval scorer, plus TRL's soft overlong punishment when enabled."""
    funcs: list = [ScaledAdviceReward(cfg.dapo.reward_scale)]
    if cfg.dapo.overlong_penalty:
        rewards = require("trl.rewards", "train", package="trl")
        funcs.append(rewards.get_soft_overlong_punishment(cfg.dapo.max_completion_length,
                                                          cfg.dapo.overlong_cache))
    return funcs


def build_dapo_trainer(cfg, common: dict[str, Any], model, tok, train_ds, peft_cfg, callbacks):
    trl = require("trl", "train")
    d = cfg.dapo
    args = trl.GRPOConfig(
        **common, loss_type="dapo", epsilon=d.epsilon, epsilon_high=d.epsilon_high, beta=d.beta,
        num_generations=d.num_generations, max_completion_length=d.max_completion_length,
        temperature=d.temperature, top_p=d.top_p, num_iterations=d.num_iterations,
        steps_per_generation=d.steps_per_generation,
        mask_truncated_completions=d.mask_truncated_completions, scale_rewards="group",
        remove_unused_columns=False, log_completions=False)
    Trainer = make_trainer_class()
    return Trainer(model=model, reward_funcs=reward_functions(cfg), args=args, train_dataset=train_ds,
                   processing_class=tok, peft_config=peft_cfg, callbacks=callbacks,
                   dynamic_sampling=d.dynamic_sampling, max_refill_rounds=d.max_refill_rounds,
                   reward_std_atol=d.reward_std_atol)
