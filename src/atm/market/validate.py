"""Kline checks, one set for files (``atm data build``) and for the API (``POST /v1/advice``).

A bar is refused (an error naming its row: ``file:line`` for a file, ``klines[i]`` for a request)
when a price is not positive, a volume or the trade count is negative, high < low, open or close
lies outside [low, high], or the taker-buy volume exceeds the volume. Rows out of time order are
sorted and exact duplicate minutes dropped: repairs, counted and named in the report (the build's
``<out>.meta.json``, the advice answer's ``repairs``). Two different rows for the same minute are
an error naming both.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

PRICE_COLUMNS = ("open", "high", "low", "close")
VOLUME_COLUMNS = ("volume", "quote_volume", "taker_buy_volume", "taker_buy_quote_volume")
VALUE_COLUMNS = PRICE_COLUMNS + VOLUME_COLUMNS + ("count",)  # what a duplicate minute is compared on
MAX_LISTED = 100  # how many places a repair names before just counting


def num(x: Any) -> str:
    """A numpy scalar as plain text for messages (12.5, not np.float64(12.5))."""
    return repr(int(x)) if isinstance(x, (int, np.integer)) else repr(float(x))


def first_bad_bar(c: Mapping[str, np.ndarray]) -> tuple[int, str] | None:
    """(row index, what is wrong) of the first bar that breaks a value rule, else None."""
    checks: list[tuple[np.ndarray, Callable[[int], str]]] = []
    for name in PRICE_COLUMNS:
        checks.append((c[name] <= 0, lambda k, n=name: f"column {n}: price {num(c[n][k])} is not positive"))
    for name in VOLUME_COLUMNS:
        if name in c:
            checks.append((c[name] < 0, lambda k, n=name: f"column {n}: negative volume {num(c[n][k])}"))
    if "count" in c:
        checks.append((c["count"] < 0, lambda k: f"column count: negative trade count {c['count'][k]}"))
    hi, lo = c["high"], c["low"]
    checks.append((hi < lo, lambda k: f"high {num(hi[k])} < low {num(lo[k])}"))
    for name in ("open", "close"):
        v = c[name]
        checks.append(((v > hi) | (v < lo),
                       lambda k, n=name, v=v: f"{n} {num(v[k])} outside [low {num(lo[k])}, high {num(hi[k])}]"))
    if "taker_buy_volume" in c:
        checks.append((c["taker_buy_volume"] > c["volume"] * (1 + 1e-9) + 1e-12,
                       lambda k: f"taker_buy_volume {num(c['taker_buy_volume'][k])} > volume {num(c['volume'][k])}"))
    for mask, message in checks:  # rule by rule, as documented: the first rule's first row is named
        if mask.any():
            k = int(np.argmax(mask))
            return k, message(k)
    return None


def out_of_order(open_ns: np.ndarray) -> np.ndarray:
    """Positions (in the given order) of rows that come before the row above them in time."""
    return np.flatnonzero(open_ns[1:] < open_ns[:-1]) + 1


def duplicates(open_ns: np.ndarray, cols: Mapping[str, np.ndarray], close_ms: np.ndarray | None = None
               ) -> tuple[np.ndarray, tuple[int, str] | None]:
    """For rows sorted by time: the positions of later copies of a minute, and the first copy that
    differs from the row it follows, as (position, the column that differs), or None."""
    dup = np.flatnonzero(open_ns[1:] == open_ns[:-1]) + 1
    if not dup.size:
        return dup, None
    same = np.ones(dup.size, dtype=bool)
    diff_col = np.full(dup.size, "", dtype=object)
    if close_ms is not None:
        same = close_ms[dup] == close_ms[dup - 1]
        diff_col[~same] = "close_time"
    for c in VALUE_COLUMNS:
        if c in cols:
            ne = cols[c][dup] != cols[c][dup - 1]
            diff_col[ne & (diff_col == "")] = c
            same &= ~ne
    if same.all():
        return dup, None
    k = int(np.flatnonzero(~same)[0])
    return dup, (int(dup[k]), str(diff_col[k]))


class Repairs:
    """Every repair, counted by kind, with the first MAX_LISTED places it happened."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}

    def add(self, kind: str, what: str, count: int = 1, where: list[str] | None = None) -> None:
        item = self.items.setdefault(kind, {"kind": kind, "what": what, "count": 0, "where": []})
        item["count"] += count
        room = MAX_LISTED - len(item["where"])
        if where and room > 0:
            item["where"].extend(where[:room])

    def counts(self) -> dict[str, int]:
        return {k: v["count"] for k, v in self.items.items()}

    def as_list(self) -> list[dict[str, Any]]:
        return list(self.items.values())
