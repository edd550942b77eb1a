"""JSON Schemas rewritten into what llama.cpp's grammar converter enforces.

Beside ``advice.py`` (the answer schema) and ``hf_constraint.py`` (schemas for transformers): the
llama-server engine sends every request schema through ``llama_safe_schema`` first.
"""

from __future__ import annotations

from typing import Any


def llama_safe_schema(schema: Any) -> Any:
    """A copy of ``schema`` whose regexes (``pattern``, ``patternProperties``) llama.cpp enforces.

    llama.cpp's schema-to-grammar converter knows few regex escapes: on ``\\d``, ``\\w``, ``\\s``
    it logs a warning and **accepts any string**, so a pattern like ``^\\d+\\.\\d{8}$`` would
    silently not constrain anything; its Python twin emits ``\\.`` in a form its grammar parser
    rejects (the stock server segfaults, FIELD-NOTES). Rewritten here into forms it handles:
    ``\\.`` -> ``[.]``, ``\\d`` -> ``[0-9]``, ``\\w`` -> ``[0-9A-Za-z_]``, ``\\s`` -> ``[ \\t\\n\\r]``
    (and their negations), escaped punctuation to the literal. A regex feature it cannot enforce
    (``\\b``, back-references, ``\\p{..}`` ...) raises ``ValueError`` rather than being ignored.
    """
    if isinstance(schema, dict):
        out = {}
        for k, v in schema.items():
            if k == "pattern" and isinstance(v, str):
                out[k] = llama_regex(v)
            elif k == "patternProperties" and isinstance(v, dict):
                out[k] = {llama_regex(pk): llama_safe_schema(pv) for pk, pv in v.items()}
            else:
                out[k] = llama_safe_schema(v)
        return out
    if isinstance(schema, list):
        return [llama_safe_schema(x) for x in schema]
    return schema


_CLASS_OUT = {"d": "[0-9]", "D": "[^0-9]", "w": "[0-9A-Za-z_]", "W": "[^0-9A-Za-z_]",
              "s": "[ \\t\\n\\r]", "S": "[^ \\t\\n\\r]"}
_CLASS_IN = {"d": "0-9", "w": "0-9A-Za-z_", "s": " \\t\\n\\r"}
_GBNF_ESCAPES = set("trn\\\"[]-xuU")  # escapes llama.cpp's grammar parser reads itself
_REGEX_SPECIAL = set("^$.[]()|{}*+?")  # escaped outside a class, kept escaped


def llama_regex(rx: str) -> str:
    out: list[str] = []
    i, in_class = 0, False
    while i < len(rx):
        c = rx[i]
        if c == "\\" and i + 1 < len(rx):
            nxt = rx[i + 1]
            i += 2
            if in_class:
                if nxt == ".":
                    out.append(".")
                elif nxt in _CLASS_IN:
                    out.append(_CLASS_IN[nxt])
                elif nxt in _GBNF_ESCAPES:
                    out.append("\\" + nxt)
                elif not nxt.isalnum():
                    out.append(nxt)  # \/ \: \. ... are the plain character in a class
                else:
                    raise ValueError(f"pattern {rx!r}: \\{nxt} inside [...] cannot be enforced by llama.cpp")
            else:
                if nxt == ".":
                    out.append("[.]")
                elif nxt in _CLASS_OUT:
                    out.append(_CLASS_OUT[nxt])
                elif nxt in _REGEX_SPECIAL or nxt in _GBNF_ESCAPES:
                    out.append("\\" + nxt)
                elif not nxt.isalnum():
                    out.append(nxt)
                else:
                    raise ValueError(f"pattern {rx!r}: \\{nxt} cannot be enforced by llama.cpp's grammar")
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# grammars (GBNF text; llama-cpp-python's converter, imported when used)


def answer_gbnf(schema: dict[str, Any]) -> str:
    """The answer schema as a llama.cpp grammar that admits one leading space.

    Sentencepiece-style vocabularies (the tiny model's) start the trained answer with the
    word-start token ' {"', which the stock schema grammar (it must begin with '{') forbids,
    pushing the model off its own distribution at the first token. The strict parser strips
    surrounding whitespace, so the answer is unchanged.
    """
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    g = json_schema_to_gbnf(json.dumps(schema))
    lines = [("root0 ::=" + ln[len("root ::="):]) if ln.startswith("root ::=") else ln for ln in g.splitlines()]
    return "\n".join([*lines, 'root ::= " "? root0'])


def change_gbnf(schema: dict[str, Any]) -> str:
    """The digits of ``predicted_open_change`` and its closing quote (the opening quote is already
    in the prompt): what loglik decodes before scoring the advice options."""
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from atm.prompting.answer import change_pattern

    cg = json_schema_to_gbnf(json.dumps({"type": "string", "pattern": "^" + change_pattern(schema) + "$"}))
    out = []
    for ln in cg.splitlines():
        if ln.startswith("root ::="):
            body = ln[len("root ::="):].strip()
            assert body.startswith('"\\""'), body
            body = body[len('"\\""'):]
            body = body.rsplit('"\\""', 1)[0] + '"\\""'  # digits, then the closing quote (a stop string)
            ln = "root ::= " + body
        out.append(ln)
    return "\n".join(out)
