"""Schema-constrained decoding for transformers `generate` (no llama.cpp needed).

The advice schema (`prompts/advice.schema.json`) is a flat object of string properties, each an
`enum` or a `pattern`. That makes the whole answer a regular language: we compile it to one regex
(properties in schema order, the exact spacing the template's answers use) and, at each step, allow
only the tokens whose text keeps the output a prefix of some match (partial matching from the
`regex` package), and eos only once it is a full match. Good enough to check that a merged model
yields schema-valid advice; llama.cpp's grammar does the same job when serving.
"""

from __future__ import annotations

import json
import re as _re
from typing import Any, Callable

from atm.errors import AtmError, require


def schema_regex(schema: dict[str, Any]) -> str:
    """A regex whose matches are exactly the answers `{"k": "v", ...}` valid under ``schema``."""
    props = schema.get("properties") or {}
    if schema.get("type") != "object" or not props:
        raise AtmError("constrained decoding supports a flat object schema with properties")
    parts = []
    for name, spec in props.items():
        if spec.get("type") != "string":
            raise AtmError(f"schema property {name!r}: only string properties are supported")
        if "enum" in spec:
            value = "(?:" + "|".join(_re.escape(v) for v in spec["enum"]) + ")"
        elif "pattern" in spec:
            value = "(?:" + spec["pattern"].lstrip("^").rstrip("$") + ")"
        else:
            raise AtmError(f"schema property {name!r}: needs an enum or a pattern")
        parts.append(_re.escape(json.dumps(name)) + ": " + '"' + value + '"')
    return r"\s?\{" + ", ".join(parts) + r"\}"


def token_texts(tokenizer) -> list[str]:
    """The text each token id contributes (Llama-style "▁" spaces and <0xNN> byte tokens)."""
    out = []
    special = set(tokenizer.all_special_ids)
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or piece is None:
            out.append("")
            continue
        m = _re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if m:
            b = int(m.group(1), 16)
            out.append(chr(b) if b < 128 else "\ufffd")
        else:
            out.append(piece.replace("▁", " "))
    return out


def prefix_allowed_tokens_fn(tokenizer, schema: dict[str, Any], prompt_len: int) -> Callable:
    """A `prefix_allowed_tokens_fn` for `model.generate` restricting output to ``schema``."""
    regex = require("regex", "train")
    pattern = regex.compile(schema_regex(schema))
    texts = token_texts(tokenizer)
    eos = tokenizer.eos_token_id
    cache: dict[tuple[int, ...], list[int]] = {}

    def allowed(batch_id: int, input_ids) -> list[int]:
        gen = tuple(input_ids[prompt_len:].tolist())
        if gen in cache:
            return cache[gen]
        so_far = "".join(texts[t] for t in gen)
        ok = [t for t, s in enumerate(texts)
              if s and pattern.fullmatch(so_far + s, partial=True) is not None]
        if pattern.fullmatch(so_far) is not None:
            ok.append(eos)
        cache[gen] = ok or [eos]
        return cache[gen]

    return allowed


def generate_constrained(model, tokenizer, messages: list[dict], schema: dict[str, Any],
                         max_new_tokens: int = 64, do_sample: bool = False) -> str:
    """Generate one schema-constrained answer to chat ``messages``; returns the decoded text."""
    torch = require("torch", "train")
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             prefix_allowed_tokens_fn=prefix_allowed_tokens_fn(tokenizer, schema, n),
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, n:], skip_special_tokens=True)
