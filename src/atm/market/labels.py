"""Labels for each minute of a kline frame, and the realized return of acting on each advice.

Every label is aligned with the kline frame (same RangeIndex). A row whose label cannot be
computed, because its lookback starts before the data, its horizon runs past the data, or a gap
in the minutes falls inside the window, is ``None`` (``NaN`` for the float ``return`` rule).
Such rows are never labelled silently: :func:`class_balance` counts them as ``missing``.

Horizons and lookbacks count bars (minutes for 1m klines). When the frame has ``open_time``,
a window that spans a gap (a missing minute) is not labelled, so ``H`` bars always mean ``H``
consecutive intervals of real time.

Rules (``LabelConfig.rule``):

``seed``
    The original experiment's rule, exactly (with the defaults ``horizon=10, threshold=0.002``):
    BUY if ``high(t) > 1.002 * high(t-10)``, else SELL if ``low(t) < 0.998 * low(t-10)``, else
    NOOP; BUY wins when both hold. It reads bar ``t`` itself (the prompt context ends at ``t-1``).
    Rows ``t < 10`` are ``None``.
``entry``
    BUY if the max high over the next ``H`` minutes (bars ``t..t+H-1``) reaches
    ``open(t) * (1 + x)`` (``open(t) + x`` with ``absolute=True``), else NOOP.
``return``
    The forward return over ``H`` minutes, ``open(t+H) / open(t) - 1`` (float).
``fee-aware``
    BUY if the forward return exceeds the round-trip fee ``2 * fee``, SELL if it is below
    ``-2 * fee``, else NOOP. This is exactly "the advice whose :func:`realized_returns` is
    largest" (NOOP on ties), so this label and the reward scorer agree by construction.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from atm.config import AtmConfig
from atm.constants import ADVICES
from atm.errors import ConfigError, DataError

CLASSES = ADVICES
RULES = ("seed", "entry", "return", "fee-aware")


class LabelConfig(AtmConfig):
    """How each minute is labelled (see the module docstring for the rules)."""

    rule: Literal["seed", "entry", "return", "fee-aware"] = Field(
        "seed", description="labelling rule: seed (the original experiment's), entry, return or "
                            "fee-aware")
    horizon: int = Field(
        10, ge=1, description="bars (minutes for 1m klines): the forward horizon H for entry, "
                              "return and fee-aware; for seed, the lookback (10 = the original)")
    threshold: float = Field(
        0.002, ge=0, description="move x that counts: for entry, the rise over open(t) the max high "
                                 "must reach; for seed, the band around high/low(t-H) (0.002 = the "
                                 "original); unused by return and fee-aware")
    absolute: bool = Field(
        False, description="threshold is an absolute price move (open(t) + x) instead of a "
                           "relative one (open(t) * (1 + x)); entry and seed")
    fee: float = Field(
        0.001, ge=0, description="fee per side as a fraction (0.001 = 0.1%); fee-aware labels a "
                                 "move only beyond the round-trip fee 2 * fee")

    @model_validator(mode="after")
    def _check(self) -> "LabelConfig":
        if self.rule == "entry" and self.threshold == 0 and not self.absolute:
            # x = 0 makes every minute BUY (high >= open always): almost surely a mistake.
            raise ConfigError("LabelConfig: rule=entry with threshold=0 labels every minute BUY; "
                              "set threshold > 0")
        return self


def label_horizon(cfg: LabelConfig) -> int:
    """Bars after the open of ``t`` until the label of ``t`` is known.

    ``seed`` reads bar ``t`` (known at its close: 1); ``entry`` reads bars ``t..t+H-1`` (H);
    ``return`` and ``fee-aware`` read ``open(t+H)`` (H). An embargo between chronological splits
    should be at least this plus the feature/context lookback.
    """
    return 1 if cfg.rule == "seed" else int(cfg.horizon)


def label_lookback(cfg: LabelConfig) -> int:
    """Bars before ``t`` the label reads (``seed`` compares with ``t-H``; the others: 0)."""
    return int(cfg.horizon) if cfg.rule == "seed" else 0


def compute_labels(df: pd.DataFrame, cfg: LabelConfig | None = None) -> pd.Series:
    """The label of every row of ``df`` (a kline frame), aligned with ``df``.

    Classes are the strings ``"BUY" | "NOOP" | "SELL"`` in an object Series with ``None`` where
    no label can be computed; rule ``return`` gives a float64 Series with ``NaN`` there.
    """
    cfg = cfg or LabelConfig()
    _require_columns(df, ("open", "high", "low") if cfg.rule == "seed" else ("open", "high"))
    n = len(df)
    H = int(cfg.horizon)
    x = float(cfg.threshold)

    if cfg.rule == "seed":
        high = df["high"].to_numpy(np.float64)
        low = df["low"].to_numpy(np.float64)
        prev_high = _shift(high, H)
        prev_low = _shift(low, H)
        if cfg.absolute:
            buy = high > prev_high + x
            sell = low < prev_low - x
        else:
            # Written as in the original script: 1.002 * high(t-10), not high(t-10) * (1 + x)
            # computed another way, so boundary cases round the same.
            buy = high > (1.0 + x) * prev_high
            sell = low < (1.0 - x) * prev_low
        valid = _window_ok(df, -H, 0)
        return _classes(n, buy, sell, valid, df.index)

    open_ = df["open"].to_numpy(np.float64)
    if cfg.rule == "entry":
        high = df["high"].to_numpy(np.float64)
        # max over t..t+H-1: a trailing rolling max ending at t+H-1, moved back to t.
        fwd_max = _shift(pd.Series(high).rolling(H, min_periods=H).max().to_numpy(), -(H - 1))
        target = open_ + x if cfg.absolute else open_ * (1.0 + x)
        buy = fwd_max >= target
        valid = _window_ok(df, 0, H - 1)
        return _classes(n, buy, np.zeros(n, dtype=bool), valid, df.index)

    ret = _forward_return(df, H)
    if cfg.rule == "return":
        return pd.Series(ret, index=df.index, name="label", dtype=np.float64)

    # fee-aware
    band = 2.0 * float(cfg.fee)
    valid = ~np.isnan(ret)
    with np.errstate(invalid="ignore"):
        buy = ret > band
        sell = ret < -band
    return _classes(n, buy, sell, valid, df.index)


def realized_returns(df: pd.DataFrame, horizon: int, fee: float = 0.001,
                     slippage_bps: float = 0.0) -> pd.DataFrame:
    """Net return of acting on each advice at minute ``t``: columns ``BUY, NOOP, SELL``.

    Enter at ``open(t)``, exit at ``open(t+horizon)``; BUY earns ``r``, SELL (a short) earns
    ``-r``, where ``r = open(t+horizon) / open(t) - 1``; both pay ``fee + slippage`` on entry and
    on exit (costs are subtracted, not compounded, so the fee-aware label is exactly the argmax).
    NOOP is 0. Rows whose horizon runs past the data (or spans a gap) are NaN in all columns.
    This is what the shared reward scorer (``atm.prompting.advice.score_advice``), the
    preference pairs and the backtest use.
    """
    if horizon < 1:
        raise ValueError(f"realized_returns: horizon must be >= 1, got {horizon}")
    _require_columns(df, ("open",))
    r = _forward_return(df, int(horizon))
    cost = 2.0 * (float(fee) + float(slippage_bps) / 1e4)
    noop = np.where(np.isnan(r), np.nan, 0.0)
    return pd.DataFrame({"BUY": r - cost, "NOOP": noop, "SELL": -r - cost}, index=df.index)


def class_balance(labels: pd.Series) -> dict[str, Any]:
    """Counts and fractions of each class, with unlabelled rows counted as ``missing``.

    Fractions are of the labelled rows. For a float series (rule ``return``) it gives summary
    statistics instead: mean, std, min, max and the fractions above / at / below zero.
    """
    s = pd.Series(labels)
    total = int(len(s))
    missing_mask = s.isna()
    missing = int(missing_mask.sum())
    present = s[~missing_mask]
    labelled = total - missing
    out: dict[str, Any] = {"total": total, "labelled": labelled, "missing": missing}
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        v = present.to_numpy(np.float64)
        out.update({
            "mean": float(v.mean()) if labelled else None,
            "std": float(v.std(ddof=1)) if labelled > 1 else None,
            "min": float(v.min()) if labelled else None,
            "max": float(v.max()) if labelled else None,
            "fractions": {k: (float(f(v).mean()) if labelled else None) for k, f in
                          (("up", lambda a: a > 0), ("flat", lambda a: a == 0),
                           ("down", lambda a: a < 0))},
        })
        return out
    counts = present.astype(str).value_counts()
    unknown = sorted(set(counts.index) - set(CLASSES))
    if unknown:
        raise ValueError(f"class_balance: unexpected labels {unknown}; expected {list(CLASSES)}")
    out["counts"] = {c: int(counts.get(c, 0)) for c in CLASSES}
    out["fractions"] = {c: (out["counts"][c] / labelled if labelled else None) for c in CLASSES}
    return out


# --------------------------------------------------------------------------------- helpers

def _require_columns(df: pd.DataFrame, cols: tuple[str, ...]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"kline frame lacks column(s) {missing}; has {list(df.columns)}")


def _shift(a: np.ndarray, k: int) -> np.ndarray:
    """``out[t] = a[t - k]`` (k > 0: the past; k < 0: the future), NaN outside the data."""
    out = np.full(len(a), np.nan, dtype=np.float64)
    if k == 0:
        out[:] = a
    elif k > 0:
        if k < len(a):
            out[k:] = a[:-k]
    else:
        k = -k
        if k < len(a):
            out[:-k] = a[k:]
    return out


def _forward_return(df: pd.DataFrame, H: int) -> np.ndarray:
    open_ = df["open"].to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = _shift(open_, -H) / open_ - 1.0
    r[~_window_ok(df, 0, H)] = np.nan
    return r


def _window_ok(df: pd.DataFrame, lo: int, hi: int) -> np.ndarray:
    """Rows ``t`` where bars ``t+lo .. t+hi`` all exist and are consecutive intervals (no gap)."""
    n = len(df)
    ok = np.zeros(n, dtype=bool)
    start, stop = max(0, -lo), n - max(0, hi)
    if stop <= start:
        return ok
    ok[start:stop] = True
    if "open_time" not in df.columns or hi == lo or n < 2:
        return ok
    t = _as_int_ns(df["open_time"])
    step = _bar_step(t)
    idx = np.arange(start, stop)
    span = t[idx + hi] - t[idx + lo]
    ok[start:stop] = span == (hi - lo) * step
    return ok


def _as_int_ns(s: pd.Series) -> np.ndarray:
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        return s.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    return pd.to_datetime(s, utc=True).to_numpy(dtype="datetime64[ns]").astype(np.int64)


def _bar_step(t: np.ndarray) -> int:
    """The bar interval: the most common spacing of consecutive open times."""
    d = np.diff(t)
    if len(d) == 0:
        return 0
    if (d <= 0).any():
        raise DataError("kline frame: open_time is not strictly increasing (sorted, unique "
                        "minutes expected; build it with `atm data build`)")
    vals, counts = np.unique(d, return_counts=True)
    return int(vals[np.argmax(counts)])


def _classes(n: int, buy: np.ndarray, sell: np.ndarray, valid: np.ndarray,
             index: pd.Index) -> pd.Series:
    out = np.full(n, "NOOP", dtype=object)
    out[sell] = "SELL"
    out[buy] = "BUY"  # BUY wins when both hold (the original rule's if/elif order)
    out[~valid] = None
    return pd.Series(out, index=index, name="label", dtype=object)


def label_config_of(recorded: dict[str, Any]) -> dict[str, Any]:
    """A label config as recorded in an artifact (``dataset.json``'s ``label``), reduced to the
    fields of ``LabelConfig`` (a recorded ``label_horizon`` and the like are results, not settings)."""
    return {k: v for k, v in (recorded or {}).items() if k in LabelConfig.model_fields}
