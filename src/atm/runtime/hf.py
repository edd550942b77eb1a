"""The one loader of a transformers causal LM for inference (the ``hf:`` eval provider and the
``transformers`` serving engine): on the GPU in bf16 when there is one, else fp32 on the CPU;
the tokenizer left-padded (batched decoding) with eos as the pad token when it has none."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atm.errors import require


@dataclass
class CausalLM:
    model: Any  # transformers PreTrainedModel, in eval mode on ``device``
    tokenizer: Any
    device: str


def load_causal_lm(path: str | Path, device: str | None = None) -> CausalLM:
    """``path``: an HF model dir (or hub id, where the hub is reachable)."""
    torch = require("torch", "train")
    transformers = require("transformers", "train")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    from atm.utils import progress_off

    if progress_off():  # transformers' "Loading weights" bar: only on a terminal, as ATM's own
        transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return CausalLM(model=model, tokenizer=tok, device=device)
