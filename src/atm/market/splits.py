"""Chronological splits with an embargo gap, and expanding-window walk-forward folds.

Minute bars overlap in what they see: a training row's label reads up to ``label_horizon`` bars
ahead and a verify row's features / prompt read ``warmup`` bars back. Putting the parts next to
each other would let the end of train "see" the start of verify. So consecutive parts are
separated by an embargo: the last ``embargo`` minutes before the next part are dropped from the
earlier part. The dropped rows come from the earlier part so the verify set stays exactly what
its fraction or dates say, whatever the embargo.

Gap definition, tested: for consecutive parts A then B, the minutes strictly between the last
row of A and the first row of B number at least ``embargo``
(``open_time[first B] - open_time[last A] >= (embargo + 1) minutes``).

The default embargo (180 minutes) covers the default label horizon (10) plus the default
feature warm-up (``FeatureConfig().warmup()`` = 121 bars) with room to spare.
"""

from __future__ import annotations

from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from atm.config import AtmConfig
from atm.constants import MINUTE_NS
from atm.errors import ConfigError, DataError

DEFAULT_EMBARGO = 180


class SplitConfig(AtmConfig):
    """How rows are split chronologically into train / optional val / verify."""

    method: Literal["fraction", "dates"] = Field(
        "fraction", description="fraction: parts by share of rows; dates: parts by date ranges")
    train: float = Field(
        0.8, gt=0, lt=1, description="fraction: share of rows in the training period (the "
                                     "first rows; val, if any, is carved from its tail)")
    val: float = Field(
        0.0, ge=0, lt=1, description="fraction: share of all rows taken from the tail of the "
                                     "training period as a validation part (0 = none)")
    verify: float = Field(
        0.2, gt=0, le=1, description="fraction: share of rows in the verify part (the last rows)")
    train_dates: list[str] | None = Field(
        None, description="dates: [start, end) of the training period, ISO dates/times in UTC, "
                          "e.g. ['2025-08-01', '2025-08-09']")
    val_dates: list[str] | None = Field(
        None, description="dates: [start, end) of the optional validation part (after train)")
    verify_dates: list[str] | None = Field(
        None, description="dates: [start, end) of the verify part (after train and val)")
    embargo: int = Field(
        DEFAULT_EMBARGO, ge=0, description="minutes dropped from the end of each part before the "
                                           "next one; keep it >= label horizon + feature/context "
                                           "lookback")

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if self.method == "fraction":
            if self.train + self.verify > 1.0 + 1e-9:
                raise ConfigError(f"SplitConfig: train ({self.train}) + verify ({self.verify}) "
                                  f"exceeds 1: the parts would overlap")
            if self.val >= self.train:
                raise ConfigError(f"SplitConfig: val ({self.val}) is carved from the training "
                                  f"period and must be smaller than train ({self.train})")
        else:
            for name in ("train_dates", "verify_dates"):
                if getattr(self, name) is None:
                    raise ConfigError(f"SplitConfig: method=dates needs {name}: [start, end)")
            for name in ("train_dates", "val_dates", "verify_dates"):
                v = getattr(self, name)
                if v is not None and len(v) != 2:
                    raise ConfigError(f"SplitConfig: {name} must be [start, end), got {v!r}")
        return self


def chronological_split(open_time: Any, cfg: SplitConfig | None = None) -> dict[str, np.ndarray]:
    """Row positions (int64, ascending) of ``train``, ``val`` (only if configured), ``verify``.

    ``open_time`` is the kline frame's ``open_time`` column (or anything ``pd.to_datetime``
    reads), sorted ascending. Raises ``AtmError`` when a part would be empty or parts overlap.
    """
    cfg = cfg or SplitConfig()
    t = _times(open_time)
    n = len(t)
    if n == 0:
        raise DataError("chronological_split: no rows to split")
    if cfg.method == "fraction":
        a = int(round(cfg.train * n))
        v = int(round(cfg.val * n))
        c = n - int(round(cfg.verify * n))
        if c < a:
            c = a  # rounding: train + verify == 1 exactly
        bounds = {"train": (0, a - v)}
        if cfg.val > 0:
            bounds["val"] = (a - v, a)
        bounds["verify"] = (c, n)
    else:
        bounds = {}
        for name in ("train", "val", "verify"):
            rng = getattr(cfg, f"{name}_dates")
            if rng is None:
                continue
            start, end = (_ts(x, f"{name}_dates") for x in rng)
            if end <= start:
                raise ConfigError(f"SplitConfig: {name}_dates end {rng[1]!r} is not after start "
                                  f"{rng[0]!r}")
            bounds[name] = (int(np.searchsorted(t, start, "left")),
                            int(np.searchsorted(t, end, "left")))
        names = list(bounds)
        for prev, nxt in zip(names, names[1:]):
            p_rng, n_rng = getattr(cfg, f"{prev}_dates"), getattr(cfg, f"{nxt}_dates")
            if _ts(n_rng[0], "") < _ts(p_rng[1], ""):
                raise ConfigError(f"SplitConfig: {prev}_dates {p_rng} and {nxt}_dates {n_rng} "
                                  f"overlap (parts must be in order train < val < verify)")

    parts = _apply_embargo(t, bounds, cfg.embargo)
    for name, rows in parts.items():
        if len(rows) == 0:
            lo, hi = bounds[name]
            raise DataError(
                f"chronological_split: part {name!r} is empty ({hi - lo} rows in its range"
                f"{', all inside the embargo of %d minutes' % cfg.embargo if hi > lo else ''}); "
                f"data covers {_iso(t[0])} .. {_iso(t[-1])} ({n} rows)")
    return parts


def walk_forward(open_time: Any, k: int, embargo: int = DEFAULT_EMBARGO,
                 min_train_fraction: float | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``k`` expanding-window folds ``(train_rows, test_rows)`` in time order.

    The rows are cut into a first training block and ``k`` equal test blocks after it (the
    first block is ``min_train_fraction`` of the rows, default ``1 / (k + 1)``). Fold ``i`` tests
    on block ``i`` and trains on everything before it, minus the ``embargo`` minutes before the
    test block. Test blocks are disjoint and cover the rows after the first block.
    """
    if k < 1:
        raise ConfigError(f"walk_forward: k must be >= 1, got {k}")
    if embargo < 0:
        raise ConfigError(f"walk_forward: embargo must be >= 0, got {embargo}")
    t = _times(open_time)
    n = len(t)
    frac = 1.0 / (k + 1) if min_train_fraction is None else float(min_train_fraction)
    if not 0 < frac < 1:
        raise ConfigError(f"walk_forward: min_train_fraction must be in (0, 1), got {frac}")
    first = int(round(frac * n))
    edges = np.linspace(first, n, k + 1).round().astype(np.int64)
    for i in range(k):
        lo, hi = int(edges[i]), int(edges[i + 1])
        parts = _apply_embargo(t, {"train": (0, lo), "test": (lo, hi)}, embargo)
        if len(parts["train"]) == 0 or len(parts["test"]) == 0:
            raise DataError(f"walk_forward: fold {i + 1}/{k} has an empty "
                            f"{'train' if len(parts['train']) == 0 else 'test'} part ({n} rows, "
                            f"embargo {embargo} minutes): use fewer folds or a smaller embargo")
        yield parts["train"], parts["test"]


# ------------------------------------------------------------------------------ helpers

def _apply_embargo(t: np.ndarray, bounds: dict[str, tuple[int, int]], embargo: int
                   ) -> dict[str, np.ndarray]:
    """Positions of each part, the end of each trimmed so the gap to the next is >= embargo."""
    names = list(bounds)
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        lo, hi = bounds[name]
        if i + 1 < len(names):
            nlo, nhi = bounds[names[i + 1]]
            if nlo < nhi:
                # keep rows with t <= t[first of next] - (embargo + 1) minutes
                limit = t[nlo] - (embargo + 1) * MINUTE_NS
                hi = min(hi, int(np.searchsorted(t, limit, "right")))
            hi = min(hi, nlo)
        out[name] = np.arange(lo, max(lo, hi), dtype=np.int64)
    return out


def _times(open_time: Any) -> np.ndarray:
    if isinstance(open_time, pd.DataFrame):
        open_time = open_time["open_time"]
    s = pd.Series(open_time) if not isinstance(open_time, pd.Series) else open_time
    if pd.api.types.is_integer_dtype(s.dtype) or pd.api.types.is_float_dtype(s.dtype):
        raise DataError("chronological_split: open_time must be datetimes, got numbers "
                        "(convert with pd.to_datetime(..., unit='ms'|'us', utc=True))")
    t = pd.to_datetime(s, utc=True).to_numpy(dtype="datetime64[ns]").astype(np.int64)
    if len(t) > 1 and (np.diff(t) <= 0).any():
        bad = int(np.argmax(np.diff(t) <= 0)) + 1
        raise DataError(f"chronological_split: open_time must be strictly increasing; row {bad} "
                        f"({_iso(t[bad])}) is not after row {bad - 1} ({_iso(t[bad - 1])})")
    return t


def _ts(x: str, field: str) -> int:
    try:
        ts = pd.Timestamp(x)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"SplitConfig: {field}: {x!r} is not a date/time ({exc})") from None
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return int(ts.as_unit("ns").value)


def _iso(ns: int) -> str:
    return pd.Timestamp(int(ns), tz="UTC").isoformat()
