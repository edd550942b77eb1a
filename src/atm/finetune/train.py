"""`train(method, recipe, overrides)`: SFT, ORPO and DAPO with LoRA on an ATM dataset.

Each method reads its own view of the dataset (docs/architecture.md): SFT the `sft` view
(`messages`), ORPO the `preference` view (`prompt`/`chosen`/`rejected`), DAPO the `rl` view
(`prompt` + `ret_BUY/ret_NOOP/ret_SELL`, scored by `atm.prompting.advice.score_advice`, the same
function the eval harness uses). The run dir gets the LoRA adapter, the tokenizer, checkpoints,
`log.jsonl` (every logged step, also across resumes) and `atm_run.json` (what made the run).
Under `accelerate launch` (DDP, FSDP, DeepSpeed) every rank trains and only rank 0 writes these.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

from atm.errors import AtmError, ConfigError, DataError, require
from atm.finetune.config import FinetuneConfig
from atm.utils import progress_off
from atm.finetune.data import check_lengths, dataset_summary, load_split, split_file  # noqa: F401 - used by tests

VIEWS = {"sft": ("sft", ["messages"]), "orpo": ("preference", ["prompt", "chosen", "rejected"]),
         "dapo": ("rl", ["prompt", "ret_BUY", "ret_NOOP", "ret_SELL"])}
RUN_FILE = "atm_run.json"
LOG_FILE = "log.jsonl"
log = logging.getLogger(__name__)


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch (accelerate and torchrun set RANK), or a plain run."""
    return int(os.environ.get("RANK", "0")) == 0


def load_config(method: str, recipe: str | Path | None, overrides: Iterable[str] = ()) -> FinetuneConfig:
    """The recipe + overrides, validated, with `{method}` in output_dir filled in."""
    cfg = FinetuneConfig.load(recipe, overrides=list(overrides)).for_method(method)
    if "{method}" in cfg.output_dir:
        cfg = cfg.model_copy(update={"output_dir": cfg.output_dir.replace("{method}", method)})
    return cfg


def cpu_precision(cfg: FinetuneConfig) -> tuple[FinetuneConfig, str | None]:
    """The recipe, run in fp32 where it would compute bf16 on a CPU without native bf16.

    Why: on an AVX2-only CPU torch's bf16 matmuls ran at 0.8 GFLOP/s against 59 in fp32 (2 threads),
    so a GPU recipe run on such a CPU (a smoke test, a laptop) would take ~70x as long. The change is
    logged and recorded in the run's ``atm_run.json`` (``precision_note``), never made silently."""
    from atm.utils import cpu_native_bf16, cpu_summary

    if not cfg.bf16 or not _no_accelerator() or cpu_native_bf16():
        return cfg, None
    note = (f"bf16=true asked on a CPU without native bf16 ({cpu_summary()['isa']}: no avx512_bf16 / "
            "amx_bf16); training in fp32, where bf16 runs ~70x slower. On a CPU with native bf16, or a GPU, "
            "the recipe's bf16 applies")
    log.warning("%s", note)
    return cfg.model_copy(update={"bf16": False}), note


def load_model_for_training(cfg: FinetuneConfig):
    """(model, tokenizer). A LoRA run dir as `model` is merged first (e.g. DAPO after SFT)."""
    from atm.finetune.base import load_base

    src = Path(cfg.model).expanduser()
    if (src / "adapter_config.json").exists():
        from atm.finetune.merge import load_merged

        return load_merged(src)
    kw: dict[str, Any] = {}
    if cfg.load_in_4bit:
        transformers = require("transformers", "train")
        torch = require("torch", "train")
        _check_qlora(torch)
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if cfg.bf16 else torch.float16)
        kw["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if cfg.bf16 and not cfg.load_in_4bit:
        kw["dtype"] = "bfloat16"
    model, tok = load_base(cfg.model, trust_remote_code=cfg.trust_remote_code, **kw)
    if cfg.random_init:
        model = random_twin(model, cfg.seed)
    return model, tok


def random_twin(model, seed: int):
    """The same architecture and config with freshly initialised (seeded) weights: the random-init
    control (is it the pretraining that makes a fine-tuned model good?)."""
    torch = require("torch", "train")
    if getattr(model, "is_quantized", False):
        raise ConfigError("random_init: not with a quantized (4-bit) base")
    torch.manual_seed(seed)
    twin = type(model)(model.config).to(dtype=next(model.parameters()).dtype)
    log.info("random_init: %s with random weights (seed %d) instead of %s's trained ones",
             type(model).__name__, seed, getattr(model.config, "_name_or_path", "the base"))
    return twin


def _check_qlora(torch) -> None:
    """QLoRA needs bitsandbytes' 4-bit kernels, which need a CUDA GPU: say so before loading."""
    import importlib.util

    have_bnb = importlib.util.find_spec("bitsandbytes") is not None
    have_gpu = torch.cuda.is_available()
    if have_bnb and have_gpu:
        return
    what = " and ".join(x for x, ok in (("bitsandbytes", have_bnb), ("a CUDA GPU", have_gpu)) if not ok)
    fix = ("Install it with: pip install 'atm[qlora]' -c constraints.txt (on the GPU machine)"
           if have_gpu or not have_bnb else "")
    raise ConfigError(f"load_in_4bit: true (QLoRA) needs bitsandbytes and a CUDA GPU; this machine "
                      f"lacks {what}. {fix + '. ' if fix else ''}Without a GPU, use a LoRA recipe "
                      "(finetune/tiny-cpu.yaml, or --set load_in_4bit=false --set optim=adamw_torch)")


def linear_module_names(model) -> list[str]:
    """Names (last path part) of the model's Linear layers that LoRA can target (not lm_head)."""
    torch = require("torch", "train")
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head")})


def resolve_target_modules(cfg: FinetuneConfig, model) -> list[str] | str:
    """``lora.target_modules`` for this model: ``auto`` picks the attention and MLP projections
    of the architecture (Phi-3 fuses them as qkv_proj / gate_up_proj, Llama, Qwen2 and SmolLM2
    keep q/k/v/o and gate/up/down); a list is checked against the model's own layers."""
    from atm.finetune.families import lora_targets_for

    targets = cfg.lora.target_modules
    if targets == "all-linear":
        return targets
    present = linear_module_names(model)
    arch = type(model).__name__
    if targets == "auto":
        chosen = [m for m in lora_targets_for(getattr(model.config, "model_type", None)) if m in present]
        return chosen or "all-linear"
    names = [targets] if isinstance(targets, str) else list(targets)
    missing = [m for m in names if m not in present]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not found in {arch} "
                          f"({getattr(model.config, 'model_type', '?')}); its linear layers are: "
                          f"{', '.join(present)} (or use 'auto' or 'all-linear')")
    return names


def lora_config(cfg: FinetuneConfig, model=None):
    peft = require("peft", "train")
    targets = resolve_target_modules(cfg, model) if model is not None else cfg.lora.target_modules
    if targets == "auto":
        targets = "all-linear"
    return peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                           target_modules=targets,
                           modules_to_save=cfg.lora.modules_to_save or None, task_type="CAUSAL_LM")


def sft_dataset(cfg: FinetuneConfig, tok, train_ds):
    """The SFT rows as the chosen loss needs them (see SftSettings): ``messages`` for full or
    assistant-only loss; prompt + completion for completion-only loss. Assistant-only loss needs
    ``{% generation %}`` markers (or a template TRL can swap for one that has them): checked here,
    before any tokenization, with what to do instead."""
    if cfg.sft.completion_only_loss:
        def split(row):
            msgs = row["messages"]
            if not msgs or msgs[-1]["role"] != "assistant":
                raise DataError("sft row does not end with an assistant answer (completion_only_loss "
                                "trains on that answer)", cfg.data)
            return {"prompt": msgs[:-1], "completion": msgs[-1:]}

        return train_ds.map(split, remove_columns=["messages"])
    if cfg.sft.assistant_only_loss:
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        template = tok.chat_template
        if not (isinstance(template, str) and has_generation_markers(template)):
            try:
                get_training_chat_template(tok)
            except ValueError:
                raise ConfigError(
                    f"sft.assistant_only_loss: the chat template of {cfg.model} has no "
                    "{% generation %} block, which marks the assistant tokens to train on, and TRL "
                    "has no training version of it. Use sft.completion_only_loss=true (trains on "
                    "each row's final answer, works with any template; set "
                    "sft.assistant_only_loss=false), or sft.assistant_only_loss=false to train on "
                    "every token, or add {% generation %}...{% endgeneration %} around the "
                    "assistant content in the template") from None
    return train_ds


def _common_args(cfg: FinetuneConfig) -> dict[str, Any]:
    report = list(cfg.report_to)
    for tracker in report:
        if tracker not in ("tensorboard", "wandb"):
            raise ConfigError(f"report_to: unknown tracker {tracker!r} (tensorboard, wandb)")
        require("tensorboard" if tracker == "tensorboard" else "wandb", "train")
    return dict(
        output_dir=cfg.output_dir, seed=cfg.seed, max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, bf16=cfg.bf16, fp16=cfg.fp16,
        tf32=cfg.tf32, gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        optim=cfg.optim, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, logging_strategy="steps",
        logging_steps=cfg.logging_steps, report_to=report or "none",
        dataloader_num_workers=cfg.dataloader_num_workers,
        disable_tqdm=progress_off(), use_cpu=_no_accelerator(),
    )


def _no_accelerator() -> bool:
    torch = require("torch", "train")
    return not (torch.cuda.is_available() or getattr(torch.backends, "mps", None) and
                torch.backends.mps.is_available())


def _resume_checkpoint(cfg: FinetuneConfig) -> str | None:
    out = Path(cfg.output_dir)
    if cfg.resume is False:
        return None
    if isinstance(cfg.resume, str) and cfg.resume not in ("auto", "true", "false"):
        ckpt = Path(cfg.resume)
        if not (ckpt / "trainer_state.json").exists():
            raise ConfigError(f"resume: {ckpt} is not a checkpoint (no trainer_state.json)")
        return str(ckpt)
    if cfg.resume == "false":
        return None
    last = last_complete_checkpoint(out)
    if last is None and cfg.resume in (True, "true"):
        raise ConfigError(f"resume: no checkpoint in {out}")
    return last


def last_complete_checkpoint(run_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` holding a trainer_state.json (written last by the Trainer), so a
    run killed while saving resumes from the previous, complete checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    ckpts = []
    for d in run_dir.glob("checkpoint-*"):
        suffix = d.name.split("-", 1)[1]
        if d.is_dir() and suffix.isdigit() and (d / "trainer_state.json").exists() and (
                any(d.glob("*.safetensors"))):
            ckpts.append((int(suffix), d))
    return str(max(ckpts)[1]) if ckpts else None


def make_callbacks(run_dir: Path, method: str):
    transformers = require("transformers", "train")

    class JsonlLogger(transformers.TrainerCallback):
        """Append every log event to `log.jsonl` (one JSON object per line, flushed at once so a
        killed run keeps what it logged; a resumed run appends after a `resume` event)."""

        def __init__(self):
            self.path = run_dir / LOG_FILE
            self.t0 = time.time()

        def _write(self, obj: dict[str, Any]) -> None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(obj, default=float) + "\n")
                fh.flush()

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self._write({"event": "train_begin", "method": method, "global_step": state.global_step,
                             "max_steps": state.max_steps, "time": time.time()})

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs:
                self._write({"step": state.global_step, "epoch": state.epoch,
                             "elapsed_s": round(time.time() - self.t0, 3), **logs})

        def on_train_end(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self._write({"event": "train_end", "global_step": state.global_step,
                             "time": time.time()})

    return [JsonlLogger()]


def distributed_info(cfg: FinetuneConfig, trainer) -> dict[str, Any]:
    """How accelerate really spread the run over processes. A launch config whose backend
    accelerate did not apply is refused: accelerate 1.15 sets up FSDP and DeepSpeed only on GPU-class
    devices and would train plain DDP on CPU without a word."""
    state = trainer.accelerator.state
    kind = state.distributed_type.value
    asked = next((name for name, env in (("FSDP", "ACCELERATE_USE_FSDP"),
                                         ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED"))
                  if os.environ.get(env, "false").lower() == "true"), None)
    if asked and kind != asked:
        from importlib.metadata import version

        raise ConfigError(f"the accelerate config asks for {asked}, but accelerate "
                          f"{version('accelerate')} set up {kind} on this machine ({asked} needs "
                          f"GPUs); on CPU launch with finetune/accelerate/ddp.yaml")
    recipe_precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    if state.mixed_precision != recipe_precision and is_main_process():
        log.warning("mixed precision is %s, not the recipe's %s: the accelerate config or "
                    "--mixed_precision overrides it", state.mixed_precision, recipe_precision)
    args = trainer.args
    return {"world_size": state.num_processes, "distributed_type": kind, "backend": state.backend,
            "mixed_precision": state.mixed_precision,
            "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
            * state.num_processes}


def build_trainer(method: str, cfg: FinetuneConfig, model, tok, train_ds, callbacks):
    common = _common_args(cfg)
    peft_cfg = lora_config(cfg, model)
    if method == "sft":
        trl = require("trl", "train")
        train_ds = sft_dataset(cfg, tok, train_ds)
        args = trl.SFTConfig(**common, max_length=cfg.max_length, packing=cfg.sft.packing,
                             assistant_only_loss=cfg.sft.assistant_only_loss,
                             completion_only_loss=cfg.sft.completion_only_loss,
                             dataset_num_proc=cfg.dataset_num_proc)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                                 peft_config=peft_cfg, callbacks=callbacks)
        from atm.finetune.sft import advice_labels_only, score_label_positions_only

        score_label_positions_only(trainer)  # CPU: TRL's fused head would score every position
        if cfg.sft.loss_on == "advice":
            if not cfg.sft.completion_only_loss:
                raise ConfigError("sft.loss_on=advice needs sft.completion_only_loss=true")
            advice_labels_only(trainer, tok)
        return trainer
    if method == "orpo":
        from atm.finetune.orpo import build_orpo_trainer

        return build_orpo_trainer(cfg, common, model, tok, train_ds, peft_cfg, callbacks)
    if method == "dapo":
        from atm.finetune.dapo import build_dapo_trainer

        return build_dapo_trainer(cfg, common, model, tok, train_ds, peft_cfg, callbacks)
    raise ConfigError(f"unknown method {method!r}")


def balanced_rows(method: str, ds, limit: int | None):
    """(rows with equal BUY/NOOP/SELL answers, {advice: count}): each class's rows evenly spaced
    over the train period (not its first hours), back in dataset order; the answer's advice is
    read with the eval's parser."""
    from atm.prompting.advice import parse_advice
    from atm.prompting.template import ADVICES

    if method == "dapo":
        raise ConfigError("balance_labels applies to SFT and ORPO (DAPO's reward is the realized "
                          "return, not a label)")
    col = "messages" if method == "sft" else "chosen"
    by_class: dict[str, list[int]] = {a: [] for a in ADVICES}
    for i, msgs in enumerate(ds[col]):
        advice = parse_advice(msgs[-1]["content"]).advice
        if advice in by_class:
            by_class[advice].append(i)
    per = min(len(v) for v in by_class.values())
    if limit:
        per = min(per, limit // len(ADVICES))
    if per == 0:
        counts = {a: len(v) for a, v in by_class.items()}
        raise DataError(f"balance_labels: a class has no training rows ({counts})")
    keep = sorted(v[(k * len(v)) // per] for v in by_class.values() for k in range(per))
    return ds.select(keep), {a: per for a in ADVICES}


def interleave_classes(method: str, ds, seed: int):
    """``ds`` reordered BUY, NOOP, SELL, BUY, ... (each class shuffled with ``seed``), so that any
    run of consecutive rows, a batch, holds the classes about equally (balanced_batches)."""
    import random

    from atm.prompting.advice import parse_advice
    from atm.prompting.template import ADVICES

    col = "messages" if method == "sft" else "chosen"
    by_class: dict[str, list[int]] = {a: [] for a in ADVICES}
    for i, msgs in enumerate(ds[col]):
        a = parse_advice(msgs[-1]["content"]).advice
        by_class.setdefault(a, []).append(i)
    rng = random.Random(seed)
    for v in by_class.values():
        rng.shuffle(v)
    order, k = [], 0
    while any(k < len(v) for v in by_class.values()):
        order += [v[k] for v in by_class.values() if k < len(v)]
        k += 1
    return ds.select(order)


def _in_order(trainer) -> None:
    """Make the trainer read its training rows in dataset order (balanced_batches has set it)."""
    import types

    torch = require("torch", "train")

    def sampler(self, *args, **kw):
        return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer._get_train_sampler = types.MethodType(sampler, trainer)


def _count_tokens(trainer, throughput) -> None:
    """Count each training batch's real and padded tokens (atm.finetune.curve.Throughput)."""
    import types

    from atm.finetune.curve import count_batch_tokens

    inner = trainer.training_step

    def step(self, model, inputs, *args, **kw):
        count_batch_tokens(throughput, inputs)
        return inner(model, inputs, *args, **kw)

    trainer.training_step = types.MethodType(step, trainer)


def train(method: str, recipe: str | Path | None, overrides: Iterable[str] = ()) -> Path:
    """Run one training job; returns the run dir (LoRA adapter + tokenizer + logs)."""
    cfg = load_config(method, recipe, overrides)
    require("trl", "train")
    from atm.utils import provenance, write_json_atomic

    cfg, precision_note = cpu_precision(cfg)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    view, columns = VIEWS[method]
    train_ds = load_split(cfg.data, view, "train", columns)
    label_counts = None
    val_ds = None
    if cfg.curve.every:
        from atm.finetune.curve import holdout_rows

        val_rows, pool = holdout_rows(train_ds, method, cfg.curve.per_class, cfg.curve.embargo)
        val_ds = train_ds.select(val_rows)
        train_ds = train_ds.select(pool)
    if cfg.balance_labels:
        train_ds, label_counts = balanced_rows(method, train_ds, cfg.max_train_samples)
        if cfg.balanced_batches:
            train_ds = interleave_classes(method, train_ds, cfg.seed)
    elif cfg.balanced_batches:
        raise ConfigError("balanced_batches needs balance_labels: true")
    elif cfg.max_train_samples:
        train_ds = train_ds.select(range(min(cfg.max_train_samples, len(train_ds))))
    resume_from = _resume_checkpoint(cfg)

    import transformers

    transformers.set_seed(cfg.seed)
    model, tok = load_model_for_training(cfg)
    random_base = None
    if cfg.random_init and is_main_process():
        # the adapter must be merged onto these random weights, not the trained base it names
        from atm.finetune.base import copy_tokenizer_assets

        random_base = run_dir / "random-base"
        model.save_pretrained(str(random_base))
        tok.save_pretrained(str(random_base))
        copy_tokenizer_assets(cfg.model, random_base)
    # ORPO counts every row while it tokenizes them (atm.finetune.tokenized), in build_trainer
    lengths = None if method == "orpo" else check_lengths(method, cfg, model, tok, train_ds)
    run_info = {
        "method": method, "recipe": str(recipe) if recipe else None, "overrides": list(overrides),
        "config": cfg.to_dict(), "dataset": dataset_summary(cfg.data), "view": view,
        "train_rows": len(train_ds), "base_model": cfg.model, "resumed_from": resume_from,
        "token_lengths": lengths, "balanced_labels": label_counts, "provenance": provenance(cfg),
        "precision_note": precision_note,
    }
    callbacks = make_callbacks(run_dir, method)
    from atm.finetune.curve import make_curve_callback, make_throughput_callback

    throughput = make_throughput_callback()
    callbacks.append(throughput)
    curve = None
    if val_ds is not None:
        rows_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        curve = make_curve_callback(tok, val_ds, method, cfg.curve.every, cfg.curve.batch_size,
                                    rows_per_step, callbacks[0]._write, throughput)
        callbacks.append(curve)
        run_info["curve_slice"] = {"rows": len(val_ds), "per_class": cfg.curve.per_class,
                                   "rule": "the last per_class rows of each advice in train; training "
                                   "draws from the rows before them minus the embargo"}
    trainer = build_trainer(method, cfg, model, tok, train_ds, callbacks)
    if cfg.balanced_batches:
        _in_order(trainer)
    _count_tokens(trainer, throughput)
    prepared = getattr(trainer, "atm_prepared", None)
    if prepared is not None:
        run_info["token_lengths"] = prepared.info["token_lengths"]
        run_info["tokenized"] = {k: prepared.info.get(k) for k in
                                 ("path", "key", "hit", "seconds", "built_seconds", "num_proc")}
    run_info["distributed"] = distributed_info(cfg, trainer)
    main = is_main_process()
    if main:
        write_json_atomic(run_dir / RUN_FILE, {**run_info, "status": "running"})
    if resume_from and main:
        log.info("resuming from %s", resume_from)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(str(run_dir))  # every rank: FSDP / ZeRO-3 gather the weights, rank 0 writes
    if random_base is not None:
        conf = run_dir / "adapter_config.json"
        ac = json.loads(conf.read_text())
        ac["base_model_name_or_path"] = str(random_base.resolve())
        conf.write_text(json.dumps(ac, indent=2))
    if main:
        tok.save_pretrained(str(run_dir))
        from atm.finetune.base import copy_tokenizer_assets

        copy_tokenizer_assets(cfg.model, run_dir)
        state = trainer.state
        write_json_atomic(run_dir / RUN_FILE, {
            **run_info, "status": "done", "global_step": state.global_step,
            "train_seconds": round(time.time() - t0, 2), "metrics": result.metrics,
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters()
                                        if p.requires_grad),
            "throughput": throughput.summary(),
            "curve": curve.points if curve is not None else None,
            "rows_seen": state.global_step * cfg.per_device_train_batch_size
            * cfg.gradient_accumulation_steps,
        })
        log.info("%s: %s real tokens in %.0f s of steps: %s tokens/s (padding %.0f%% of the batches)",
                 method, throughput.tokens, throughput.seconds, throughput.summary()["tokens_per_s"],
                 100 * (1 - throughput.tokens / max(throughput.padded, 1)))
    trainer.accelerator.wait_for_everyone()  # the other ranks return once the run dir is complete
    return run_dir


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's `log.jsonl` as a list of dicts."""
    p = Path(run_dir) / LOG_FILE
    if not p.exists():
        raise AtmError(f"{p}: no log (is this a run dir?)")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
