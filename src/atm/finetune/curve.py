"""What a run learns as it trains: a fixed validation slice from the end of train, scored at
checkpoints, and the training throughput.

- ``holdout_rows(ds, method, per_class, embargo)``: the last ``per_class`` rows of each advice
  class in the train split (chronological order) become the validation slice; training then only
  draws from the rows before the slice's first minute minus ``embargo`` rows, so no neighbouring
  minute is in both.
- ``LearningCurve``: a ``TrainerCallback`` that scores the slice before the first step, every
  ``every`` steps and after the last: for each prompt, the advice whose first answer token the model
  ranks highest right after the answer's advice key (``{"advice": "``, an advice-first answer), the
  choice greedy constrained decoding makes at that token. It logs balanced accuracy, per-class
  recall and rows seen to ``log.jsonl`` (``"event": "curve"``) and keeps the points for
  ``atm_run.json``. The seconds it spends are left out of the throughput.
- ``Throughput``: a ``TrainerCallback`` that times the optimizer steps (curve scoring excluded) and
  counts the real (unpadded) tokens each step trained on, from the attention masks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from atm.constants import ADVICES
from atm.errors import ConfigError, require

log = logging.getLogger(__name__)


def _advice_of(row: dict[str, Any], method: str) -> str | None:
    from atm.prompting.advice import parse_advice

    msgs = row["messages"] if method == "sft" else row["chosen"]
    return parse_advice(msgs[-1]["content"]).advice


def _prompt_of(row: dict[str, Any], method: str) -> list[dict[str, str]]:
    return list(row["messages"][:-1]) if method == "sft" else list(row["prompt"])


def holdout_rows(ds, method: str, per_class: int, embargo: int) -> tuple[list[int], list[int]]:
    """(validation rows, rows training may draw from): see the module docstring."""
    if method == "dapo":
        raise ConfigError("curve: the learning curve is for SFT and ORPO (labelled rows)")
    col = "messages" if method == "sft" else "chosen"
    from atm.prompting.advice import parse_advice

    by_class: dict[str, list[int]] = {a: [] for a in ADVICES}
    for i, msgs in enumerate(ds[col]):
        a = parse_advice(msgs[-1]["content"]).advice
        if a in by_class:
            by_class[a].append(i)
    if any(len(v) < 2 * per_class for v in by_class.values()):
        counts = {a: len(v) for a, v in by_class.items()}
        raise ConfigError(f"curve.per_class={per_class}: the train split has too few rows of a class "
                          f"for a validation slice and training ({counts})")
    val = sorted(i for v in by_class.values() for i in v[-per_class:])
    cut = max(0, val[0] - embargo)
    return val, list(range(cut))


def class_first_tokens(tok, prompt_text: str, prefix: str = '{"advice": "') -> tuple[int, list[int]]:
    """(length of the shared token prefix, the first token of each advice after it)."""
    ids = [tok(prompt_text + prefix + a, add_special_tokens=False)["input_ids"] for a in ADVICES]
    n = 0
    while all(n < len(x) for x in ids) and len({x[n] for x in ids}) == 1:
        n += 1
    firsts = [x[n] for x in ids]
    if len(set(firsts)) != len(ADVICES):
        raise ConfigError("curve: the advices do not start with distinct tokens for this tokenizer")
    return n, firsts


def balanced_accuracy(truth: list[str], pred: list[str]) -> tuple[float, dict[str, float]]:
    recall = {}
    for a in ADVICES:
        idx = [i for i, t in enumerate(truth) if t == a]
        recall[a] = sum(pred[i] == a for i in idx) / len(idx) if idx else float("nan")
    vals = [v for v in recall.values() if v == v]
    return (sum(vals) / len(vals) if vals else float("nan")), recall


def make_curve_callback(tok, val_ds, method: str, every: int, batch_size: int, rows_per_step: int,
                        write, throughput=None):
    """A ``LearningCurve`` callback (see the module docstring); ``write(obj)`` appends to the log."""
    transformers = require("transformers", "train")
    torch = require("torch", "train")

    prompts, truth = [], []
    for row in val_ds:
        msgs = _prompt_of(row, method)
        prompts.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        truth.append(_advice_of(row, method))
    encoded = []
    for p in prompts:
        n, firsts = class_first_tokens(tok, p)
        ids = tok(p + '{"advice": "' + ADVICES[0], add_special_tokens=False)["input_ids"][:n]
        encoded.append((ids, firsts))

    class LearningCurve(transformers.TrainerCallback):
        def __init__(self):
            self.points: list[dict[str, Any]] = []

        def score(self, model) -> tuple[float, dict[str, float], dict[str, int]]:
            was_training = model.training
            model.eval()
            preds = []
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            dev = next(model.parameters()).device
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            backbone = getattr(base, base.base_model_prefix)
            head = base.get_output_embeddings()
            with torch.no_grad():
                for s in range(0, len(encoded), batch_size):
                    chunk = encoded[s:s + batch_size]
                    width = max(len(ids) for ids, _ in chunk)
                    x = torch.full((len(chunk), width), pad, dtype=torch.long)
                    m = torch.zeros((len(chunk), width), dtype=torch.long)
                    for j, (ids, _) in enumerate(chunk):
                        x[j, :len(ids)] = torch.tensor(ids)
                        m[j, :len(ids)] = 1
                    # the backbone, then the LM head at each prompt's last position only (the
                    # full (batch, seq, vocab) logits cost as much as the rest of the model)
                    hidden = backbone(input_ids=x.to(dev), attention_mask=m.to(dev),
                                      use_cache=False).last_hidden_state
                    last = torch.stack([hidden[j, len(ids) - 1] for j, (ids, _) in enumerate(chunk)])
                    logits = head(last)
                    for j, (_, firsts) in enumerate(chunk):
                        preds.append(ADVICES[int(torch.argmax(logits[j, firsts]))])
            if was_training:
                model.train()
            bal, recall = balanced_accuracy(truth, preds)
            return bal, recall, {a: preds.count(a) for a in ADVICES}

        def _point(self, state, model):
            t0 = time.time()
            bal, recall, counts = self.score(model)
            dt = time.time() - t0
            if throughput is not None:
                throughput.excluded += dt
            p = {"event": "curve", "step": state.global_step, "rows_seen": state.global_step * rows_per_step,
                 "balanced_accuracy": round(bal, 4), "recall": {k: round(v, 4) for k, v in recall.items()},
                 "predicted": counts, "n": len(truth), "seconds": round(dt, 2)}
            self.points.append(p)
            if state.is_world_process_zero:
                write(p)
            log.info("curve: step %d, %d rows seen: balanced accuracy %.3f on %d validation rows "
                     "(recall %s) in %.1f s", state.global_step, p["rows_seen"], bal, len(truth),
                     ", ".join(f"{k} {v:.2f}" for k, v in recall.items()), dt)

        def on_train_begin(self, args, state, control, model=None, **kw):
            if model is not None and not any(pt["step"] == state.global_step for pt in self.points):
                self._point(state, model)

        def on_step_end(self, args, state, control, model=None, **kw):
            if every and state.global_step % every == 0 and model is not None:
                self._point(state, model)

        def on_train_end(self, args, state, control, model=None, **kw):
            if model is not None and not any(pt["step"] == state.global_step for pt in self.points):
                self._point(state, model)

    return LearningCurve()


def make_throughput_callback():
    """A ``Throughput`` callback (see the module docstring)."""
    transformers = require("transformers", "train")

    class Throughput(transformers.TrainerCallback):
        def __init__(self):
            self.t0: float | None = None
            self.excluded = 0.0
            self.tokens = 0
            self.padded = 0
            self.seconds = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.peak = matmul_gflops()
            self.t0 = time.time()
            self.excluded = 0.0

        def on_train_end(self, args, state, control, **kw):
            if self.t0 is not None:
                self.seconds = time.time() - self.t0 - self.excluded

        def summary(self) -> dict[str, Any]:
            s = self.seconds
            return {"tokens": self.tokens, "padded_tokens": self.padded, "seconds": round(s, 2),
                    "tokens_per_s": round(self.tokens / s, 1) if s > 0 else None,
                    "fp32_matmul_gflops": getattr(self, "peak", None)}

    return Throughput()


def matmul_gflops(seconds: float = 1.0) -> float:
    """This process's fp32 matmul rate (GFLOP/s) on a (512 x 576) @ (576 x 1536) product, the
    shape of a SmolLM2 MLP projection at a batch of 512 tokens, with torch's current threads: the
    peak a training step's FLOP rate is compared with, measured where and when it trains."""
    import torch

    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return round(2 * 512 * 576 * 1536 * n / (time.perf_counter() - t0) / 1e9, 1)


def count_batch_tokens(throughput, inputs: dict[str, Any]) -> None:
    """Add a batch's real and padded token counts (every ``*attention_mask`` column) to ``throughput``.
    DAPO's steps take raw rows (a list of dicts) and make their tokens inside the step: not counted."""
    if not hasattr(inputs, "items"):
        return
    for k, v in inputs.items():
        if k.endswith("attention_mask") and hasattr(v, "sum"):
            if k.startswith("prompt_"):
                continue  # ORPO: the prompt is counted inside each side's concatenated sequence
            throughput.tokens += int(v.sum())
            throughput.padded += int(v.numel())
