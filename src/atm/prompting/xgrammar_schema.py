"""JSON Schemas rewritten into what vLLM's xgrammar backend accepts, without changing what they admit.

vLLM refuses (400, "features not supported by xgrammar") a string schema that has both a
``pattern`` and ``minLength``/``maxLength`` (xgrammar issue 966). ATM's answer schema has both:
its pattern already bounds the length (10-20 characters), and the length bounds are there for
decoders that ignore patterns. ``xgrammar_safe_schema`` drops a length bound that the pattern
itself already implies (the regex's own minimum / maximum width), so the schema admits exactly
the same strings; a bound the pattern does not imply is kept (and vLLM's 400 says why).
"""

from __future__ import annotations

import re
from typing import Any

try:  # Python >= 3.11
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

_UNBOUNDED = 1 << 30


def regex_width(pattern: str) -> tuple[int, int | None]:
    """(fewest, most) characters a full match of ``pattern`` has; most is None when unbounded."""
    lo, hi = _sre_parse.parse(pattern).getwidth()
    return int(lo), (None if hi >= _UNBOUNDED or hi >= _sre_parse.MAXREPEAT else int(hi))


def _redundant_lengths(node: dict[str, Any]) -> set[str]:
    try:
        lo, hi = regex_width(node["pattern"])
    except (re.error, TypeError, ValueError, OverflowError):
        return set()
    out = set()
    if isinstance(node.get("minLength"), int) and node["minLength"] <= lo:
        out.add("minLength")
    if isinstance(node.get("maxLength"), int) and hi is not None and node["maxLength"] >= hi:
        out.add("maxLength")
    return out


def xgrammar_safe_schema(schema: Any) -> Any:
    """A copy of ``schema`` without the string length bounds its patterns already imply."""
    if isinstance(schema, dict):
        drop: set[str] = set()
        if isinstance(schema.get("pattern"), str):
            drop = _redundant_lengths(schema)
        return {k: xgrammar_safe_schema(v) for k, v in schema.items() if k not in drop}
    if isinstance(schema, list):
        return [xgrammar_safe_schema(x) for x in schema]
    return schema
