"""The answer, shared by every side that reads one: its format, where its values are, and class
probabilities with one rule.

- ``ANSWER_FORMATS`` (change-first, advice-first), ``DEFAULT_ANSWER``, ``answer_order(fmt)`` and
  ``answer_pieces(fmt)``: a template's ``answer`` format (str.format with ``{change}`` and
  ``{advice}``), which value it writes first, and the text around its two values (loglik scoring
  decodes or scores exactly these slots).
- ``change_pattern(schema)``: the predicted change's pattern in the answer schema; ``CHANGE_RE``
  the shipped schema's, which the strict parser checks; ``ADVICE_KEY`` where an answer's advice
  value starts (class probabilities are read there).
- Class probabilities, the same for ``atm serve`` (``/v1/advice``) and ``atm-eval``:
  ``class_of(text)`` is the ONE rule that maps a token's text to the class it starts (a text that
  could start several classes, or none, counts for none); ``probs_from_top_logprobs`` reads
  P(class) at the token where the advice value starts in an OpenAI ``logprobs.content`` list;
  ``probs_from_token_probs`` renormalizes token probabilities over the classes (llama-server's
  grammar-restricted probe); ``probs_from_logliks`` is the softmax over each class's complete
  answer log-likelihood (in-process loglik); ``most_likely`` breaks ties by class order.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

from atm.constants import ADVICES

# the two answer orders a template may use (``TemplateSpec.answer_format``); the parser takes both
ANSWER_FORMATS: dict[str, str] = {
    "change-first": '{{"predicted_open_change": "{change}", "advice": "{advice}"}}',
    "advice-first": '{{"advice": "{advice}", "predicted_open_change": "{change}"}}',
}
DEFAULT_ANSWER = ANSWER_FORMATS["change-first"]  # the original experiment's
ADVICE_KEY = re.compile(r'"advice"\s*:\s*"')  # where the advice value starts in an answer
_C, _A = "\x00C\x00", "\x00A\x00"


# ---------------------------------------------------------------------------------------------
# the format


def answer_order(fmt: str) -> str:
    """``"advice-first"`` or ``"change-first"``: which value an answer format text writes first."""
    s = fmt.format(change=_C, advice=_A)
    if _A not in s or _C not in s:
        raise ValueError(f"an answer format needs both {{change}} and {{advice}}: {fmt!r}")
    return "advice-first" if s.index(_A) < s.index(_C) else "change-first"


def answer_pieces(fmt: str = DEFAULT_ANSWER) -> dict[str, Any]:
    """The text before/between/after the change and advice values of an answer format."""
    s = fmt.format(change=_C, advice=_A)
    ic, ia = s.index(_C), s.index(_A)
    if ia < ic:
        return {"advice_first": True, "before_advice": s[:ia], "after_advice": s[ia + 3:ic].split("\x00")[0]}
    return {"advice_first": False, "before_change": s[:ic], "between": s[ic + 3:ia], "after_advice": s[ia + 3:]}


def change_pattern(schema: Mapping[str, Any]) -> str:
    """The predicted change's regex in the answer schema, without anchors."""
    return schema["properties"]["predicted_open_change"]["pattern"].strip("^$")


CHANGE_RE = r"-?(0|[1-9][0-9]{0,9})[.][0-9]{8}"  # prompts/advice.schema.json's pattern


# ---------------------------------------------------------------------------------------------
# class probabilities


def class_of(text: str, classes: Sequence[str] = ADVICES) -> str | None:
    """The class a value starting with ``text`` belongs to: ``text`` is a prefix of exactly one
    class (or starts with exactly one, e.g. ``NOOP"``). Empty or ambiguous text: None."""
    if not text:
        return None
    hits = [c for c in classes if c.startswith(text) or text.startswith(c)]
    return hits[0] if len(hits) == 1 else None


def _normalized(mass: dict[str, float]) -> dict[str, float] | None:
    total = sum(mass.values())
    return {c: v / total for c, v in mass.items()} if total > 0 else None


def probs_from_token_probs(alternatives: Iterable[tuple[str, float]],
                           classes: Sequence[str] = ADVICES) -> dict[str, float] | None:
    """P(class) from (token text, probability) alternatives at the value's first token."""
    mass = {c: 0.0 for c in classes}
    for text, p in alternatives:
        c = class_of(text, classes)
        if c is not None:
            mass[c] += float(p)
    return _normalized(mass)


def probs_from_top_logprobs(content: Sequence[Mapping[str, Any]],
                            classes: Sequence[str] = ADVICES) -> dict[str, float] | None:
    """P(class) from an OpenAI ``logprobs.content`` list (``{"token", "logprob", "top_logprobs"}``
    per generated token): the alternatives at the token where the advice value starts, matched to
    the classes by ``class_of`` after the part of that token before the value, renormalized.
    Offsets are taken in the tokens' own texts (the message content may be trimmed of the leading
    whitespace the tokens carry). None without log-probs or without an advice value."""
    if not content:
        return None
    joined = "".join(tok.get("token", "") for tok in content)
    key = ADVICE_KEY.search(joined)
    if not key:
        return None
    start, pos = key.end(), 0
    for tok in content:
        piece = tok.get("token", "")
        end = pos + len(piece)
        if pos <= start < end or (pos == start and piece):
            head = piece[: start - pos]
            alts = tok.get("top_logprobs") or [{"token": piece, "logprob": tok.get("logprob", 0.0)}]
            return probs_from_token_probs(
                ((a.get("token", "")[len(head):], math.exp(float(a.get("logprob", -1e9))))
                 for a in alts if a.get("token", "").startswith(head)), classes)
        pos = end
    return None


def probs_from_logliks(logliks: Mapping[str, float]) -> dict[str, float]:
    """The softmax over each class's answer log-likelihood."""
    m = max(logliks.values())
    ex = {k: math.exp(v - m) for k, v in logliks.items()}
    z = sum(ex.values())
    return {k: v / z for k, v in ex.items()}


def most_likely(probs: Mapping[str, float], classes: Sequence[str] = ADVICES) -> str:
    """The most probable class; a tie goes to the first in ``classes`` order."""
    return max(classes, key=lambda c: probs.get(c, 0.0))
