"""What a classic model sees for minute t: the prompt's numeric window plus the indicator features.

Both parts use only bars before t (``t-window .. t-1``; ``atm.market.features`` is shifted one bar),
so a classic model knows exactly what the LLM's prompt shows, in numbers instead of text:

* The window: the dataset encoder's context columns (``dataset.json`` -> ``encoder.columns``, e.g.
  ``open_changes, prev_volumes, prev_trade_counts`` for ``seed-json``) over the encoder's
  ``window`` bars. Values are made scale-free the usual way: price changes as log returns
  ``log(x[i] / x[i-1])`` (in per mille), price levels as ``log(x[i] / x[t-1])``, volumes and counts
  as ``log1p(x)``. ``seed-json-compat`` shows open changes of t-9..t-1 and volumes/counts of
  t-10..t-2; it is mapped to the same three series over t-10..t-1 (a superset). ``natural`` shows
  indicators only; its models get the ``seed-json`` default window (10 bars) as well.
* The indicators: ``atm.market.features.compute_features`` (returns at several lags, volatility,
  volume/count z-scores, taker-buy ratio, RSI, MACD, Bollinger %B, CCI, ROC, range position, EMA
  gap and slope).

``Design`` holds both as arrays: ``window`` (n, W, C) for the sequence models (CNN, LSTM) and
``table`` (n, W*C + F) for logistic regression and LightGBM (the window flattened, then the
indicators). NaN marks values not available (the features' warm-up, a zero-volume division);
LightGBM takes NaN as is, the other models impute the training mean (0 after standardizing) and
the artifact records how many rows needed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from atm.errors import AtmError, DataError

DEFAULT_WINDOW = 10
DEFAULT_COLUMNS = ("open_changes", "prev_volumes", "prev_trade_counts")
PRICE_COLUMNS = ("open", "high", "low", "close")


@dataclass
class Design:
    window: np.ndarray  # (n, W, C) float32
    indicators: np.ndarray  # (n, F) float32
    window_names: list[str]  # C channel names
    indicator_names: list[str]

    @property
    def table(self) -> np.ndarray:
        n = self.window.shape[0]
        return np.concatenate([self.window.reshape(n, -1), self.indicators], axis=1)

    def table_names(self) -> list[str]:
        W = self.window.shape[1]
        return [f"{c}[t-{W - j}]" for j in range(W) for c in self.window_names] + list(self.indicator_names)


def window_spec_from_meta(meta: dict[str, Any], window: int | None = None,
                          columns: list[str] | None = None) -> dict[str, Any]:
    """The numeric window the dataset's prompt encodes (``dataset.json``'s encoder), overridable."""
    enc = dict(meta.get("encoder") or {})
    name = enc.get("name")
    source = f"dataset encoder {name!r}" if name else "default (no encoder recorded)"
    if name == "seed-json-compat":
        w, cols = 10, list(DEFAULT_COLUMNS)
        source += ": open changes t-9..t-1 and volumes/counts t-10..t-2, mapped to the three series over t-10..t-1"
    elif name == "natural":
        w, cols = DEFAULT_WINDOW, list(DEFAULT_COLUMNS)
        source += " shows indicators only; the seed-json default window is added"
    else:
        w = int(enc.get("window") or DEFAULT_WINDOW)
        cols = list(enc.get("columns") or DEFAULT_COLUMNS)
    if window is not None:
        w, source = int(window), source + f"; window overridden to {window}"
    if columns is not None:
        cols, source = list(columns), source + f"; columns overridden to {columns}"
    if w < 1:
        raise AtmError(f"classic window must be >= 1 bar, got {w}")
    return {"window": w, "columns": cols, "source": source}


def _series(df: pd.DataFrame, name: str) -> tuple[np.ndarray, str]:
    """One context column as a scale-free per-bar series, and how it was transformed."""
    from atm.prompting.encoders import SERIES

    if name not in SERIES:
        raise AtmError(f"unknown window column {name!r}; known: {', '.join(SERIES)}")
    col, transform = SERIES[name]
    if col not in df.columns:
        raise DataError(f"klines frame has no column {col!r} (needed for window column {name!r})")
    x = df[col].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if transform == "diff" and col in PRICE_COLUMNS:
            out = np.full_like(x, np.nan)
            out[1:] = np.log(x[1:] / x[:-1]) * 1e3
            return out, "log return (per mille)"
        if transform == "diff":
            out = np.full_like(x, np.nan)
            out[1:] = x[1:] - x[:-1]
            return out, "difference"
        if col in PRICE_COLUMNS:
            return np.log(x), "log level relative to bar t-1"
        return np.log1p(np.maximum(x, 0.0)), "log1p"


def build_design(df: pd.DataFrame, rows: np.ndarray, spec: dict[str, Any],
                 features: pd.DataFrame | None) -> Design:
    """Window and indicator arrays for the minutes ``rows`` of the kline frame ``df``."""
    rows = np.asarray(rows, dtype=np.int64)
    n_all = len(df)
    if rows.size and (rows.min() < 0 or rows.max() >= n_all):
        raise DataError(f"item rows outside the klines (0..{n_all - 1}): "
                        f"{int(rows.min())}..{int(rows.max())}")
    W = int(spec["window"])
    chans = []
    for name in spec["columns"]:
        x, how = _series(df, name)
        idx = rows[:, None] - W + np.arange(W)[None, :]  # bars t-W .. t-1
        ok = idx >= 0
        v = np.where(ok, x[np.clip(idx, 0, n_all - 1)], np.nan)
        if how.startswith("log level"):
            v = (v - v[:, -1:]) * 1e3  # relative to bar t-1, per mille
        chans.append(v)
    window = np.stack(chans, axis=2).astype(np.float32) if chans else np.zeros((len(rows), W, 0), np.float32)
    window[~np.isfinite(window)] = np.nan
    if features is not None:
        ind = features.to_numpy(dtype=np.float64)[rows].astype(np.float32)
        ind[~np.isfinite(ind)] = np.nan
        ind_names = list(features.columns)
    else:
        ind = np.zeros((len(rows), 0), np.float32)
        ind_names = []
    return Design(window=window, indicators=ind, window_names=list(spec["columns"]), indicator_names=ind_names)


def compute_indicators(df: pd.DataFrame, feature_config: dict[str, Any] | None) -> pd.DataFrame:
    """The indicator table; ``{"encoder": {...}}`` instead gives the numbers that encoder's prompt
    states (its ``compute_features``, ClassicConfig ``features: prompt``)."""
    from atm.market.features import FeatureConfig, compute_features

    fc = dict(feature_config or {})
    if "encoder" in fc:
        from atm.prompting.encoders import get_encoder

        enc = get_encoder(**fc["encoder"])
        feats = enc.compute_features(df)
        return feats[enc.columns(feats)]
    return compute_features(df, FeatureConfig(**fc))


class Standardizer:
    """Per-column mean/std from the training rows (NaN ignored); NaN -> 0 (the mean) after scaling."""

    def __init__(self, mean: np.ndarray | None = None, std: np.ndarray | None = None):
        self.mean = mean
        self.std = std

    def fit(self, x: np.ndarray, axes: tuple[int, ...] = (0,)) -> "Standardizer":
        with np.errstate(invalid="ignore"), _quiet():
            mean = np.nanmean(x, axis=axes)
            std = np.nanstd(x, axis=axes)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        return self

    def transform(self, x: np.ndarray, clip: float = 10.0) -> np.ndarray:
        z = (x - self.mean) / self.std
        z = np.nan_to_num(z, nan=0.0, posinf=clip, neginf=-clip)
        return np.clip(z, -clip, clip).astype(np.float32)


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
