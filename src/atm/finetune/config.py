"""Recipe configs for `atm finetune sft|orpo|dapo` (YAML in `finetune/` + `--set key=value`).

One model for all three methods, in the spirit of trl's Config classes: a common block (model, data,
optimisation, precision, LoRA, checkpoints, logging) plus one nested block per method (`sft`, `orpo`,
`dapo`) so a single recipe such as `finetune/tiny-cpu.yaml` serves every method and a typo anywhere
is rejected with the list of valid keys. Precision and gradient checkpointing have no silent
defaults worth trusting (TRL defaults to bf16 + checkpointing, transformers to neither): recipes set
them, and the defaults here are the conservative CPU ones.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from atm.config import AtmConfig
from atm.errors import ConfigError

Method = Literal["sft", "orpo", "dapo"]


class LoraSettings(AtmConfig):
    """LoRA adapter (peft). Training always produces an adapter; `atm finetune merge` folds it in."""

    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        "auto", description="Modules that get LoRA matrices: 'auto' (the architecture's attention "
        "and MLP projections, chosen by ATM: q/k/v/o + gate/up/down for Llama, Qwen2, SmolLM2; "
        "Phi-3's fused qkv_proj, gate_up_proj + o/down), 'all-linear', or a list of names (checked "
        "against the model's layers).")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and stored in the adapter (e.g. "
        "embed_tokens, lm_head for the randomly initialised tiny base, whose frozen random "
        "embeddings would otherwise limit what LoRA can learn).")


class SftSettings(AtmConfig):
    """Supervised fine-tuning on the dataset's `sft` view (the warm-up before DAPO)."""

    assistant_only_loss: bool = Field(True, description="Train only on assistant tokens, k-shot "
                                      "example answers included (needs {% generation %} markers in "
                                      "the chat template, or one TRL knows a training version of).")
    completion_only_loss: bool = Field(False, description="Train only on each row's final answer: "
                                       "the conversation becomes prompt + completion, which works "
                                       "with any chat template (real families' official ones have "
                                       "no generation markers). Set assistant_only_loss false.")
    packing: bool = Field(False, description="Pack several conversations into one sequence.")
    loss_on: Literal["answer", "advice"] = Field(
        "answer", description="With completion_only_loss: 'answer' trains every token of the answer; "
        "'advice' only the answer's tokens up to its advice value (an advice-first answer: "
        "{\"advice\": \"BUY\"), so a predicted change that is noise does not drown the advice "
        "in the loss; constrained decoding still writes a valid change.")


class OrpoSettings(AtmConfig):
    """ORPO (trl.experimental.orpo) on the dataset's `preference` view."""

    beta: float = Field(0.1, gt=0.0, description="Weight of the odds-ratio term (lambda in the "
                        "ORPO paper).")


class DapoSettings(AtmConfig):
    """DAPO (TRL GRPOTrainer, loss_type='dapo') on the dataset's `rl` view."""

    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group); "
                                 "must divide the per-device generation batch.")
    max_completion_length: int = Field(48, ge=4, description="Max new tokens per completion.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature for rollouts.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling for rollouts.")
    epsilon: float = Field(0.2, gt=0.0, description="Lower clip range (ratio >= 1 - epsilon).")
    epsilon_high: float = Field(0.28, gt=0.0, description="Upper clip range (ratio <= 1 + "
                                "epsilon_high): DAPO's clip-higher.")
    beta: float = Field(0.0, ge=0.0, description="KL coefficient against the reference (DAPO uses 0).")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes per generation batch.")
    steps_per_generation: int | None = Field(None, description="Optimizer micro-steps per "
                                             "generation batch (None: gradient_accumulation_steps).")
    mask_truncated_completions: bool = Field(True, description="Exclude completions cut at "
                                             "max_completion_length from the loss.")
    overlong_penalty: bool = Field(True, description="Add TRL's soft overlong punishment reward.")
    overlong_cache: int = Field(16, ge=1, description="Soft overlong punishment buffer: penalty "
                                "ramps over the last N tokens before max_completion_length.")
    dynamic_sampling: bool = Field(True, description="Drop prompt groups whose rewards are all "
                                   "equal and refill the batch with new prompts (DAPO).")
    max_refill_rounds: int = Field(4, ge=0, description="Bound on refill generations per batch; "
                                   "when reached, the batch is completed with zero-signal groups "
                                   "whose tokens are masked out of the loss.")
    reward_std_atol: float = Field(1e-6, ge=0.0, description="Groups with reward std <= this count "
                                   "as zero-spread.")
    reward_scale: float = Field(1.0, gt=0.0, description="Multiplier on atm.prompting.advice."
                                "score_advice (the eval scorer) as the task reward.")


class CurveSettings(AtmConfig):
    """A learning curve: balanced accuracy on a fixed validation slice from the end of train,
    scored at checkpoints (atm.finetune.curve). SFT and ORPO; off when ``every`` is 0."""

    every: int = Field(0, ge=0, description="Score the slice every N optimizer steps (and before the "
                       "first and after the last); 0: no curve and no slice held out.")
    per_class: int = Field(40, ge=1, description="Validation rows per advice class: the last ones "
                           "of the train split (held out of training).")
    embargo: int = Field(30, ge=0, description="Train rows dropped before the slice's first row.")
    batch_size: int = Field(32, ge=1, description="Prompts per forward pass while scoring.")


class FinetuneConfig(AtmConfig):
    """A training recipe. Paths are resolved against the current directory."""

    method: Method | None = Field(None, description="Method this recipe is for; None: any "
                                  "(the command's method is used).")
    model: str = Field(..., description="Base model: local HF dir (e.g. runs/base-tiny, or a LoRA "
                       "run dir, whose adapter is merged first) or hub id. Safetensors only.")
    data: str = Field(..., description="Dataset dir built by `atm prompts build` "
                      "(datasets/build/NAME).")
    output_dir: str = Field(..., description="Run dir: adapter, checkpoints, log.jsonl, atm_run.json.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off).")
    seed: int = Field(42, description="Seed for init, shuffling and sampling.")
    max_steps: int = Field(-1, description="Optimizer steps; -1: use num_train_epochs.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs when max_steps is -1.")
    max_train_samples: int | None = Field(None, description="Use at most this many training rows.")
    balance_labels: bool = Field(False, description="Draw the training rows class-balanced: the "
                                 "same number of BUY, NOOP and SELL answers (as many as the rarest "
                                 "class has, or max_train_samples / 3), in their chronological "
                                 "order. The seed label is ~91% NOOP on the sample, and an "
                                 "unbalanced SFT learns to always answer NOOP. SFT and ORPO only.")
    balanced_batches: bool = Field(False, description="With balance_labels: feed the rows in a "
                                   "fixed interleaved order (BUY, NOOP, SELL, BUY, ..., each class "
                                   "shuffled by the seed) instead of a random shuffle, so every batch "
                                   "holds each class about equally.")
    random_init: bool = Field(False, description="Control: the base model's architecture with random "
                              "weights (seeded), trained with the same recipe: whether pretraining "
                              "matters.")
    curve: CurveSettings = Field(default_factory=CurveSettings, description="Learning curve on a "
                                 "validation slice from the end of train.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps for LR warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    per_device_train_batch_size: int = Field(4, ge=1, description="Micro-batch per device (rows; "
                                             "for DAPO: completions).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, ge=16, description="Max tokens of prompt + answer (longer rows "
                            "are truncated by TRL).")
    bf16: bool = Field(False, description="bfloat16 mixed precision (set explicitly per recipe).")
    fp16: bool = Field(False, description="float16 mixed precision (older GPUs).")
    tf32: bool | None = Field(None, description="Allow TF32 matmuls on Ampere+ GPUs.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory "
                                         "(set explicitly per recipe).")
    load_in_4bit: bool = Field(False, description="QLoRA: load the base in 4-bit NF4 via "
                               "bitsandbytes (GPU only).")
    optim: str = Field("adamw_torch", description="transformers optimizer name (e.g. "
                       "paged_adamw_8bit for QLoRA).")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapter settings.")
    sft: SftSettings = Field(default_factory=SftSettings, description="SFT-only settings.")
    orpo: OrpoSettings = Field(default_factory=OrpoSettings, description="ORPO-only settings.")
    dapo: DapoSettings = Field(default_factory=DapoSettings, description="DAPO-only settings.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(2, description="Keep at most N checkpoints.")
    logging_steps: int = Field(1, ge=1, description="Log every N optimizer steps.")
    report_to: list[str] = Field(default_factory=list, description="Extra trackers: tensorboard, "
                                 "wandb (need the package installed). log.jsonl is always written.")
    resume: bool | str = Field("auto", description="'auto': resume from the last checkpoint in "
                               "output_dir when there is one; true: require one; false: start "
                               "fresh; or a checkpoint path.")
    dataloader_num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    dataset_num_proc: int | None = Field(None, ge=1, description="Processes that tokenize the "
                                         "training rows (ORPO's batched build, TRL's SFT "
                                         "preparation). None: one process; the fast tokenizer "
                                         "already uses every core for its batch calls, so on 2 "
                                         "cores more processes only pay their start-up; worth it "
                                         "on machines with many cores.")
    tokenized_cache: bool = Field(True, description="Keep ORPO's tokenized rows and reuse them on "
                                  "reruns and resumes with the same data, tokenizer, chat "
                                  "template and max_length (any change builds a new entry).")
    tokenized_cache_dir: str | None = Field(None, description="Where tokenized rows are kept "
                                            "(None: $ATM_CACHE/tokenized, by default "
                                            "~/.cache/atm/tokenized; ~2 KB per ORPO pair).")

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are exclusive")
        if isinstance(self.resume, str) and self.resume == "":
            raise ValueError("resume: use auto, true, false or a checkpoint path")
        if self.sft.assistant_only_loss and self.sft.completion_only_loss:
            raise ValueError("sft.assistant_only_loss and sft.completion_only_loss are exclusive "
                             "(completion-only trains the final answer; set the other false)")
        if self.dapo.epsilon_high < self.dapo.epsilon:
            raise ValueError("dapo.epsilon_high must be >= dapo.epsilon (clip-higher)")
        return self

    def for_method(self, method: str) -> "FinetuneConfig":
        if method not in ("sft", "orpo", "dapo"):
            raise ConfigError(f"unknown method {method!r}: expected sft, orpo or dapo")
        if self.method is not None and self.method != method:
            raise ConfigError(f"this recipe is for {self.method!r}, not {method!r} "
                              f"(remove `method:` to use it for any method)")
        if method == "dapo":
            gen_batch = self.per_device_train_batch_size * (self.dapo.steps_per_generation
                                                            or self.gradient_accumulation_steps)
            if gen_batch % self.dapo.num_generations:
                raise ConfigError(
                    f"dapo: per_device_train_batch_size * steps_per_generation = {gen_batch} must be "
                    f"a multiple of dapo.num_generations = {self.dapo.num_generations}")
        return self
