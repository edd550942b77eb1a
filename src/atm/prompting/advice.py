"""The answer contract: the advice JSON schema, a strict parser, and THE scorer.

``score_advice`` is the single function that turns a model's raw text into a number. The DAPO
trainer uses it as its reward and the eval harness uses it as its score (in the style of
nanochat's one-scorer rule): if training and evaluation each had their own parser or their own
idea of "a good answer", a model could learn to please the trainer in ways the evaluation does
not count (or the reverse), which is how the original experiment ended up scoring 9% with a
regex parser at eval time. Keep every consumer on this module.

Parsing is deliberately strict: the text must be exactly one JSON object (whitespace around it is
allowed), valid under ``prompts/advice.schema.json``. Anything else is invalid with a short,
stable ``reason`` (``REASONS``) so failure modes can be counted.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from atm.constants import ADVICES
from atm.prompting.answer import ANSWER_FORMATS, CHANGE_RE, answer_order  # noqa: F401 - part of this API
from atm.errors import AtmError

SCHEMA_FILE = "advice.schema.json"

# Longest valid answer is ~70 characters; leave room for whitespace, reject anything longer
# without parsing it (a model rambling on is an invalid answer, not a parse we try to rescue).
MAX_ANSWER_CHARS = 256

# Scoring constants (basis points of the traded notional over the label's horizon, net of fees).
# A valid answer scores the realized net return of acting on its advice, clipped to +-CLIP_BPS so
# one extreme minute cannot dominate a mean or an RL batch. An invalid answer cannot be acted on;
# it scores as badly as the worst trade we count (-CLIP_BPS), so producing valid JSON is always
# at least as good as not, and NOOP (0) beats an unparseable answer.
CLIP_BPS = 100.0
INVALID_PENALTY = -CLIP_BPS

#: Every ``reason`` ``parse_advice`` can give (stable strings; eval reports count them).
REASONS: tuple[str, ...] = (
    "empty", "too long", "control characters", "truncated", "not JSON", "not an object",
    "duplicate key", "extra key", "missing key", "bad enum", "bad number", "schema",
)

_CHANGE_RE = re.compile(CHANGE_RE)
# Control characters that JSON never allows anywhere (tab, LF, CR are whitespace between tokens).
_CTRL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class ParsedAdvice:
    """The outcome of parsing one answer. ``reason`` is one of ``REASONS`` when invalid."""

    valid: bool
    reason: str | None = None
    advice: str | None = None
    predicted_change: float | None = None
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "reason": self.reason, "advice": self.advice,
                "predicted_change": self.predicted_change, "detail": self.detail}


def schema_path() -> Path:
    """``prompts/advice.schema.json`` of the checkout (or ``$ATM_ROOT``)."""
    from atm.utils import repo_root

    root = repo_root()
    if root is not None and (root / "prompts" / SCHEMA_FILE).exists():
        return root / "prompts" / SCHEMA_FILE
    raise AtmError(f"prompts/{SCHEMA_FILE} not found: run from an ATM checkout or set ATM_ROOT")


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return schema_path().read_text()


#: The answer formats a template can pick (``answer_format`` in ``prompts/*.yaml``): the assistant's
#: text (str.format with {change} and {advice}). ``advice-first`` lets loglik scoring rank the three
#: advice options right after the prompt, without decoding the change first.
_KEY_ORDER = {"change-first": ("predicted_open_change", "advice"),
              "advice-first": ("advice", "predicted_open_change")}


def load_schema(answer_format: str | None = None) -> dict[str, Any]:
    """The advice JSON Schema (a fresh dict each call, safe to modify).

    With ``answer_format`` (``"change-first"`` / ``"advice-first"``) its ``properties`` and
    ``required`` list the two keys in that order. Constrained decoders write an object's properties
    in schema order (llama.cpp's grammar converter, so llama-server, llama-cpp-python and Ollama;
    vLLM's xgrammar), so a model trained on one order is constrained to that order. The parser
    accepts both orders either way.
    """
    schema = json.loads(_schema_text())
    if answer_format is None:
        return schema
    if answer_format not in _KEY_ORDER:
        raise ValueError(f"answer_format must be one of {list(_KEY_ORDER)}, got {answer_format!r}")
    order = _KEY_ORDER[answer_format]
    props = schema.get("properties", {})
    schema["properties"] = {**{k: props[k] for k in order if k in props},
                            **{k: v for k, v in props.items() if k not in order}}
    req = schema.get("required", [])
    schema["required"] = [k for k in order if k in req] + [k for k in req if k not in order]
    return schema


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = load_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _invalid(reason: str, detail: str) -> ParsedAdvice:
    return ParsedAdvice(valid=False, reason=reason, detail=detail)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    pass


def parse_advice(text: str | None) -> ParsedAdvice:
    """Parse one raw model answer strictly.

    Valid only if ``text`` (stripped of surrounding whitespace) is one JSON object with exactly
    the keys ``predicted_open_change`` (a decimal string with 8 decimals) and ``advice``
    (``BUY``/``NOOP``/``SELL``, case-sensitive), in either order (``ANSWER_FORMATS``). Never
    raises on any string input.
    """
    if text is None or not isinstance(text, str) or not text.strip():
        return _invalid("empty", "no text")
    if len(text) > MAX_ANSWER_CHARS:
        return _invalid("too long", f"{len(text)} characters > {MAX_ANSWER_CHARS}")
    s = text.strip()
    m = _CTRL_RE.search(s)
    if m:
        return _invalid("control characters", f"U+{ord(m.group()):04X} at offset {m.start()}")
    try:
        obj = json.loads(s, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        return _invalid("duplicate key", f"key {exc.args[0]!r} appears twice")
    except json.JSONDecodeError as exc:
        try:  # raw newline / tab inside a string: JSON forbids it, a lax parser would accept it
            json.loads(s, strict=False)
            return _invalid("control characters", "raw control character inside a string")
        except (json.JSONDecodeError, _DuplicateKey):
            pass
        if exc.pos >= len(s) or exc.msg.startswith("Unterminated string"):
            return _invalid("truncated", f"{exc.msg} (text ends at {len(s)})")
        return _invalid("not JSON", f"{exc.msg} at offset {exc.pos}")
    except RecursionError:
        return _invalid("not JSON", "nested too deeply")
    if not isinstance(obj, dict):
        return _invalid("not an object", f"got a JSON {type(obj).__name__}")
    extra = sorted(set(obj) - {"predicted_open_change", "advice"})
    if extra:
        return _invalid("extra key", f"unexpected key(s) {extra}")
    missing = [k for k in ("predicted_open_change", "advice") if k not in obj]
    if missing:
        return _invalid("missing key", f"missing {missing}")
    advice = obj["advice"]
    if not isinstance(advice, str) or advice not in ADVICES:
        return _invalid("bad enum", f"advice {advice!r} is not one of {list(ADVICES)}")
    change = obj["predicted_open_change"]
    if not isinstance(change, str) or not _CHANGE_RE.fullmatch(change):
        return _invalid("bad number",
                        f"predicted_open_change {change!r} is not a decimal string with 8 decimals")
    # The checks above implement the schema; the schema itself stays the authority.
    errors = list(_validator().iter_errors(obj))
    if errors:  # pragma: no cover - only if the schema file is edited without this parser
        return _invalid("schema", errors[0].message)
    return ParsedAdvice(valid=True, advice=advice, predicted_change=float(change))


def _realized_for(realized: Mapping[str, float], advice: str) -> float:
    for key in (advice, f"ret_{advice}"):
        if key in realized:
            value = float(realized[key])
            if math.isnan(value):
                raise ValueError(f"realized return for {advice} is NaN (horizon past the data?)")
            return value
    raise KeyError(f"realized returns need key {advice!r} or 'ret_{advice}', got {sorted(realized)}")


def score_parsed(parsed: ParsedAdvice, realized: Mapping[str, float], *,
                 invalid_penalty: float = INVALID_PENALTY, clip_bps: float = CLIP_BPS) -> float:
    """``score_advice`` for an answer already parsed (same rule, no second parser)."""
    if not parsed.valid or parsed.advice is None:
        return float(invalid_penalty)
    bps = _realized_for(realized, parsed.advice) * 1e4
    return float(min(clip_bps, max(-clip_bps, bps)))


def score_advice(text: str | None, realized: Mapping[str, float], *,
                 invalid_penalty: float = INVALID_PENALTY, clip_bps: float = CLIP_BPS) -> float:
    """THE score of one answer: the DAPO reward and the eval harness's per-item score.

    ``realized`` maps each advice (``BUY``/``NOOP``/``SELL``, or the dataset's ``ret_BUY`` ...
    column names) to the net return of acting on it (``atm.market.labels.realized_returns``:
    enter at open(t), exit at open(t+horizon), fees on both sides; NOOP is 0).

    Returns basis points: the realized net return of the answer's advice x 1e4, clipped to
    ``[-clip_bps, clip_bps]``; an invalid answer (see ``parse_advice``) gets ``invalid_penalty``.
    One function for both uses, so training and evaluation cannot disagree about what a good
    answer is.
    """
    return score_parsed(parse_advice(text), realized, invalid_penalty=invalid_penalty,
                        clip_bps=clip_bps)


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or conversational ``[{"role", "content"}, ...]``."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        return "".join(str(m.get("content") or "") for m in completion
                       if isinstance(m, Mapping) and m.get("role", "assistant") == "assistant")
    return ""


def advice_reward(prompts=None, completions=None, ret_BUY=None, ret_NOOP=None, ret_SELL=None,
                  **_: Any) -> list[float]:
    """A TRL (GRPO/DAPO) reward function over the ``rl`` view: ``score_advice`` per completion.

    TRL passes the dataset's extra columns (``ret_BUY``, ``ret_NOOP``, ``ret_SELL``) as lists
    aligned with ``completions``.
    """
    if completions is None or ret_BUY is None or ret_NOOP is None or ret_SELL is None:
        raise ValueError("advice_reward needs completions and the ret_BUY/ret_NOOP/ret_SELL columns")
    return [score_advice(completion_text(c), {"BUY": b, "NOOP": n, "SELL": s})
            for c, b, n, s in zip(completions, ret_BUY, ret_NOOP, ret_SELL, strict=True)]
