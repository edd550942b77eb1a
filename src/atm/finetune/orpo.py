"""ORPO (``trl.experimental.orpo``) with the model's own chat template deciding every token.

TRL's ORPO tokenizer puts a BOS in front of every prompt whose first token is not BOS, and an EOS
after every answer whose last token is not EOS. With real chat templates both change what the
model is trained on relative to what it is served:
- Phi-3's template writes no ``<s>``, and neither transformers' ``apply_chat_template`` nor
  llama.cpp adds one, yet ORPO would train every prompt after an ``<s>``;
- ChatML templates (Qwen2.5, SmolLM2) end a turn with ``<|im_end|>\\n``, so ORPO would append a
  second ``<|im_end|>`` after the newline: a sequence no engine ever produces or sees.
So rows are tokenized here exactly as the template renders them (``add_special_tokens=False``:
the template writes whatever special tokens it wants, as in SFT, the server and the eval), and the
answer tokens are the rendered conversation's tokens after the prompt's. The rest of ORPO (loss,
collation, logging) is TRL's.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from atm.errors import AtmError, DataError, require

log = logging.getLogger(__name__)


def tokenize_preference(tok, prompt: str, answer: str, max_length: int) -> dict[str, list[int]]:
    """Prompt ids, and prompt + answer ids with the prompt masked in the labels, from the rendered
    prompt text and answer text (a tokenizer may merge across the boundary: then the answer is
    tokenized on its own and appended, as TRL's ``build_tokenized_answer`` does)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + answer, add_special_tokens=False)["input_ids"]
    ans = full[len(p):] if full[:len(p)] == p else tok(answer, add_special_tokens=False)["input_ids"]
    if len(p) + len(ans) > max_length:
        ans = ans[:max(0, max_length - len(p))]
    return {"prompt": p, "answer": ans}


def tokenize_row(tok, feature: dict[str, str], max_length: int) -> dict[str, list[int]]:
    """One rendered row (prompt, chosen, rejected text, as TRL's ``maybe_apply_chat_template``
    leaves it) as the columns TRL's ORPO collator pads: the per-example reference path."""
    prompt = feature["prompt"]
    if not isinstance(prompt, str):
        raise DataError(f"ORPO prompt should be rendered text, got {type(prompt).__name__}")
    batch: dict[str, list[int]] = {}
    for side in ("chosen", "rejected"):
        t = tokenize_preference(tok, prompt, feature[side], max_length)
        ids = t["prompt"] + t["answer"]
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = [1] * len(ids)
        batch[f"{side}_labels"] = [-100] * len(t["prompt"]) + t["answer"]
        if not t["answer"]:
            log.warning("an ORPO prompt fills max_length=%d: its %s answer is empty", max_length, side)
    batch["prompt_input_ids"] = t["prompt"]
    batch["prompt_attention_mask"] = [1] * len(t["prompt"])
    return batch


PROBE_ROWS = 3


def _probe_indices(n: int) -> list[int]:
    """A few rows (first, middle, last) re-tokenized by TRL's own pipeline as a check."""
    return sorted({0, n // 2, n - 1})[:PROBE_ROWS] if n else []


def build_orpo_trainer(cfg, common: dict[str, Any], model, tok, train_ds, peft_cfg, callbacks):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    orpo = require("trl.experimental.orpo", "train", package="trl")
    datasets = require("datasets", "train")
    from trl.trainer.utils import global_then_local_main_first

    from atm.finetune.tokenized import ORPO_COLUMNS, prepare_orpo
    from atm.finetune.data import check_lengths, split_file

    class AtmORPOTrainer(orpo.ORPOTrainer):
        """TRL's ORPO trainer, its rows tokenized as the chat template renders them.

        Given ``prepared`` (atm.finetune.tokenized: every row tokenized in batches, from the cache
        when it has them), TRL's per-example preparation in ``__init__`` runs on a few probe rows
        only, its result must equal the prepared rows, and the prepared rows are what it trains on.
        """

        def __init__(self, *args, train_dataset=None, prepared=None, **kw):
            if prepared is None:
                super().__init__(*args, train_dataset=train_dataset, **kw)
                return
            probe = _probe_indices(len(prepared.raw))
            rows = datasets.Dataset.from_list(prepared.raw.select(probe).to_list())  # in memory
            super().__init__(*args, train_dataset=rows, **kw)
            for i, idx in enumerate(probe):
                theirs, ours = self.train_dataset[i], prepared.dataset[idx]
                diff = [c for c in ORPO_COLUMNS if list(theirs[c]) != list(ours[c])]
                if diff:
                    raise AtmError(f"internal error: the batched ORPO tokenization of row {idx} differs "
                                   f"from TRL's per-example path in {diff}; set tokenized_cache=false "
                                   "and report this with the model name")
            self.train_dataset = prepared.dataset
            self.atm_prepared = prepared

        def tokenize_row(self, feature, model=None) -> dict:
            return tokenize_row(self.processing_class, feature, self.max_length)

    args = orpo.ORPOConfig(**common, max_length=cfg.max_length, beta=cfg.orpo.beta,
                           dataset_num_proc=cfg.dataset_num_proc)
    _ = args.device  # sets up the process group now, so the ranks below wait for rank 0 in it
    with global_then_local_main_first():  # rank 0 builds the cache, the other ranks read it
        prepared = prepare_orpo(
            train_ds, tok, split_file(cfg.data, "preference"), cfg.max_length,
            cache_dir=cfg.tokenized_cache_dir, use_cache=cfg.tokenized_cache,
            num_proc=cfg.dataset_num_proc,
            selection={"max_train_samples": cfg.max_train_samples, "balance_labels": cfg.balance_labels},
            # a run that will be refused is refused before it tokenizes everything
            before_build=lambda: check_lengths("orpo", cfg, model, tok, train_ds))
    # every row is measured now (not a sample): refuse any that would be cut
    prepared.info["token_lengths"] = check_lengths("orpo", cfg, model, tok, train_ds,
                                                   measured=prepared.lengths)
    return AtmORPOTrainer(model=model, args=args, train_dataset=train_ds, prepared=prepared,
                          processing_class=tok, peft_config=peft_cfg, callbacks=callbacks)
