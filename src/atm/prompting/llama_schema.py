"""JSON Schemas rewritten into what llama.cpp's grammar converter enforces.

Beside ``advice.py`` (the answer schema) and ``hf_constraint.py`` (schemas for transformers): the
llama-server engine sends every request schema through ``llama_safe_schema`` first.
"""

from __future__ import annotations

import re
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
    """A JSON schema as THE llama.cpp grammar ATM enforces on every engine: compact JSON (at most
    one space between tokens), properties in schema order, one optional leading space.

    Sentencepiece-style vocabularies (the tiny model's) start the trained answer with the
    word-start token ' {"', which llama-server's own schema grammar (it must begin with '{')
    forbids, pushing the model off its own distribution at the first token. The strict parser
    strips surrounding whitespace, so the answer is unchanged. Regexes go through
    ``llama_safe_schema`` first (a ``ValueError`` names a pattern llama.cpp cannot enforce).
    """
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    g = json_schema_to_gbnf(json.dumps(llama_safe_schema(schema)))
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


# ---------------------------------------------------------------------------------------------
# a (non-recursive) grammar as a regular expression: transformers' constrained decoder


_GBNF_TOKEN = re.compile(r"""\s+|"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z0-9_-]+|\{\d*(?:,\d*)?\}|[()|?*+.]""")


def _gbnf_literal(lit: str) -> str:
    body = lit[1:-1]
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            n = body[i + 1]
            if n in "xuU":
                width = {"x": 2, "u": 4, "U": 8}[n]
                out.append(chr(int(body[i + 2:i + 2 + width], 16)))
                i += 2 + width
                continue
            out.append({"n": "\n", "t": "\t", "r": "\r"}.get(n, n))
            i += 2
            continue
        out.append(c)
        i += 1
    text = "".join("\\" + c if c in _REGEX_SPECIAL or c in "\\-" else c for c in out)
    return text if len(out) == 1 else "(?:" + text + ")"


def gbnf_regex(gbnf: str, root: str = "root") -> str:
    """The language of a non-recursive GBNF grammar (as ``answer_gbnf`` writes them) as a Python
    regular expression: rules inlined as groups, literals escaped, character classes kept. A
    recursive grammar (any JSON object) has no regex: ``ValueError``."""
    rules: dict[str, str] = {}
    name = None
    for line in gbnf.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "::=" in line and re.match(r"^\s*[A-Za-z0-9_-]+\s*::=", line):
            name, _, body = line.partition("::=")
            name = name.strip()
            rules[name] = body
        elif name is not None:
            rules[name] += " " + line

    def expand(rule: str, stack: tuple[str, ...]) -> str:
        if rule in stack:
            raise ValueError(f"grammar rule {rule!r} is recursive: no regular expression")
        if rule not in rules:
            raise ValueError(f"grammar rule {rule!r} is not defined")
        out = []
        for m in _GBNF_TOKEN.finditer(rules[rule]):
            tok = m.group(0)
            if tok.isspace():
                continue
            if tok.startswith('"'):
                out.append(_gbnf_literal(tok))
            elif tok.startswith("["):
                out.append(tok)
            elif tok in "()|?*+" or tok.startswith("{"):
                out.append("(?:" if tok == "(" else tok)
            elif tok == ".":
                out.append("[\\s\\S]")
            else:
                out.append("(?:" + expand(tok, (*stack, rule)) + ")")
        text = "".join(out)
        if len("".join(_GBNF_TOKEN.findall(rules[rule])).replace(" ", "")) != len(rules[rule].replace(" ", "")):
            raise ValueError(f"grammar rule {rule!r}: cannot read {rules[rule]!r}")
        return text

    return expand(root, ())
