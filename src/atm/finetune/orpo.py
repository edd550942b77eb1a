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

from atm.errors import DataError, require

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


def build_orpo_trainer(cfg, common: dict[str, Any], model, tok, train_ds, peft_cfg, callbacks):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    orpo = require("trl.experimental.orpo", "train", package="trl")

    class AtmORPOTrainer(orpo.ORPOTrainer):
        """TRL's ORPO trainer, its rows tokenized as the chat template renders them."""

        def tokenize_row(self, feature, model=None) -> dict:
            prompt = feature["prompt"]
            if not isinstance(prompt, str):
                raise DataError(f"ORPO prompt should be rendered text, got {type(prompt).__name__}")
            batch: dict[str, list[int]] = {}
            for side in ("chosen", "rejected"):
                t = tokenize_preference(self.processing_class, prompt, feature[side], self.max_length)
                ids = t["prompt"] + t["answer"]
                batch[f"{side}_input_ids"] = ids
                batch[f"{side}_attention_mask"] = [1] * len(ids)
                batch[f"{side}_labels"] = [-100] * len(t["prompt"]) + t["answer"]
                if not t["answer"]:
                    log.warning("an ORPO prompt fills max_length=%d: its %s answer is empty",
                                self.max_length, side)
            batch["prompt_input_ids"] = t["prompt"]
            batch["prompt_attention_mask"] = [1] * len(t["prompt"])
            return batch

    args = orpo.ORPOConfig(**common, max_length=cfg.max_length, beta=cfg.orpo.beta)
    return AtmORPOTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                          peft_config=peft_cfg, callbacks=callbacks)
