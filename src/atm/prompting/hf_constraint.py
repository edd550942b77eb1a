"""JSON-schema constrained decoding for transformers ``generate`` (the ``hf:`` eval provider and the
``transformers`` serving engine), through lm-format-enforcer: a schema whose grammar is regular (ATM's
answer schema) is enforced as the regex of the very GBNF llama.cpp, llama-server and vLLM get
(``grammar_regex``), so the answer set is the same on every engine; any other schema through its
character-level JSON-schema parser.

llama.cpp and vLLM enforce a schema natively; transformers has nothing of the kind, and a small model
decoding freely breaks the format (the original experiment's failure), so an engine that took a
schema and ignored it would lie to its client. lm-format-enforcer's own transformers integration does
not import under transformers 5, so the adapter is here: a vocabulary table built once per tokenizer
and a ``LogitsProcessor`` that masks, for every row of a batch, the tokens the schema does not allow.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from atm.errors import require

_LOCK = threading.Lock()
_ATTR = "_atm_lmfe_table"  # the table lives on its tokenizer: built once (a vocab pass), freed with it


def enforceable_schema(schema: dict[str, Any] | None) -> dict[str, Any]:
    """The schema as lm-format-enforcer takes it: ``None`` (json_object) is any JSON object, and a
    string with a ``pattern`` drops ``minLength``/``maxLength`` (the parser refuses both at once; the
    pattern bounds the length in ATM's schema, and answers are validated strictly afterwards)."""
    if schema is None:
        return {"type": "object"}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            if isinstance(out.get("pattern"), str):  # a string's pattern (not a property named so)
                out.pop("minLength", None)
                out.pop("maxLength", None)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(copy.deepcopy(schema))


def token_table(tokenizer: Any) -> Any:
    """(token id, text, starts a word) for every regular token: how the parser sees the vocabulary."""
    with _LOCK:
        table = getattr(tokenizer, _ATTR, None)
        if table is not None:
            return table
    te = require("lmformatenforcer.tokenenforcer", "serve", "lm-format-enforcer")
    special = set(tokenizer.all_special_ids)
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    regular = []
    for idx in range(len(tokenizer)):
        if idx in special:
            continue
        # decoding after a '0' keeps the leading space of word-start pieces (sentencepiece style)
        after = tokenizer.decode([zero, idx])[1:]
        regular.append((idx, after, len(after) > len(tokenizer.decode([idx]))))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids).rstrip("\ufffd")  # a half UTF-8 sequence is not text yet

    table = te.TokenEnforcerTokenizerData(regular, decode, tokenizer.eos_token_id, False, len(tokenizer))
    with _LOCK:
        setattr(tokenizer, _ATTR, table)
    return table


def _whitespace_sets(table: Any) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    """Token ids banned always (whitespace only, longer than one character); banned after a token
    that ends in whitespace (those plus every whitespace-led one); that end in whitespace.
    Computed once per vocabulary and cached on the table."""
    sets = getattr(table, "_atm_ws", None)
    if sets is None:
        multi, starts, ends = set(), set(), set()
        for idx, text, _ in table.regular_tokens:
            if not text:
                continue
            if text.isspace() and len(text) > 1:
                multi.add(idx)
            if text[0].isspace():
                starts.add(idx)
            if text[-1].isspace():
                ends.add(idx)
        sets = table._atm_ws = (frozenset(multi), frozenset(multi | starts), frozenset(ends))
    return sets


def grammar_regex(schema: dict[str, Any] | None) -> str | None:
    """The language of ``atm.prompting.llama_schema.answer_gbnf(schema)`` (the grammar llama.cpp,
    llama-server and vLLM enforce) as a regex, for lm-format-enforcer's ``RegexParser``: so the
    answers transformers may write are exactly those. None where the grammar is recursive (any
    JSON object) or llama.cpp's converter is not installed: then the schema parser decides."""
    if schema is None:
        return None
    try:
        from atm.prompting.llama_schema import answer_gbnf, gbnf_regex

        return gbnf_regex(answer_gbnf(schema))
    except (ImportError, ValueError):
        return None


def schema_processor(tokenizer: Any, schema: dict[str, Any] | None) -> Any:
    """A transformers ``LogitsProcessor`` that allows only continuations valid under ``schema``
    (``None``: any JSON object). Use a fresh one per ``generate`` call."""
    torch = require("torch", "train")
    lp = require("transformers.generation.logits_process", "train", "transformers")
    lmfe = require("lmformatenforcer", "serve", "lm-format-enforcer")
    te = require("lmformatenforcer.tokenenforcer", "serve", "lm-format-enforcer")
    table = token_table(tokenizer)
    # The parser's own max_consecutive_whitespaces is lost in TokenEnforcer's state cache (its key
    # ignores the count), and a small model then pads an answer with tabs until max_tokens cuts it.
    # So whitespace is limited here: never a token of only whitespace longer than one character,
    # and no whitespace-led token right after one that ended in whitespace.
    always, after_ws, ends_ws = _whitespace_sets(table)
    regex = grammar_regex(schema)
    if regex is not None:  # the grammar every engine enforces: its whitespace is bounded already
        parser = lmfe.RegexParser(regex)
        always, after_ws = frozenset(), frozenset()
    else:
        parser = lmfe.JsonSchemaParser(enforceable_schema(schema))
    enforcer = te.TokenEnforcer(table, parser)
    eos = tokenizer.eos_token_id

    class SchemaLogitsProcessor(lp.LogitsProcessor):
        def __call__(self, input_ids, scores):
            mask = torch.full_like(scores, float("-inf"))
            for r, row in enumerate(input_ids.tolist()):
                try:
                    allowed = list(enforcer.get_allowed_tokens(row).allowed_tokens)
                except Exception:  # noqa: BLE001 - a finished row (after eos) has no parser state
                    allowed = []
                banned = after_ws if row and row[-1] in ends_ws else always
                kept = [t for t in allowed if t not in banned]
                mask[r, kept or allowed or [eos]] = 0.0
            return scores + mask

    return SchemaLogitsProcessor()


def generate_constrained(model: Any, tokenizer: Any, messages: list[dict], schema: dict[str, Any] | None,
                         max_new_tokens: int = 64) -> str:
    """One greedy answer to chat ``messages`` under ``schema`` (the decoded text): a quick check
    that a model yields schema-valid advice, with the same decoder the ``hf:`` provider and the
    transformers engine use."""
    torch = require("torch", "train")
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    n = enc["input_ids"].shape[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             logits_processor=[schema_processor(tokenizer, schema)])
    return tokenizer.decode(out[0, n:], skip_special_tokens=True)
