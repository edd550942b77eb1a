"""Numeric features of each minute for the classic models and the text encoders.

The row of minute ``t`` uses only bars strictly before ``t`` (``t-1`` and earlier): what is known
at the open of ``t``. Every indicator is computed on completed bars ("as of the close of bar s")
with causal pandas operations (trailing ``rolling``, ``ewm``, ``diff``), then the whole table is
shifted down one row. ``tests/market/test_no_leakage.py`` checks this by perturbing every bar from ``t``
on and asserting that rows ``<= t`` do not change.

Rows at the start whose lookback is not yet filled are NaN (``FeatureConfig.warmup()`` bars);
divisions by zero (a flat price window, a zero-volume minute) give NaN, never ``inf``.
Windows count bars (minutes for 1m klines). Everything is vectorized: ~350k rows take well under
a second.

Indicators follow their textbook definitions:

- RSI: Wilder (1978): average gain / loss seeded with the simple mean of the first ``n``
  changes, then Wilder's smoothing ``avg = (avg * (n - 1) + x) / n``; RSI = 100 - 100/(1 + RS).
- MACD: EMA(12) - EMA(26) of the close (``alpha = 2/(span+1)``, seeded with the first close),
  signal = EMA(9) of MACD, histogram = MACD - signal; all three divided by the close so they are
  comparable across price levels.
- Bollinger %B: ``(close - lower) / (upper - lower)`` with SMA(20) +- 2 population std.
- CCI (Lambert 1980): ``(TP - SMA(TP, 20)) / (0.015 * mean |TP - SMA(TP, 20)|)``, TP = (h+l+c)/3.
- Rate of change: ``close / close[n bars ago] - 1``.

Why not an indicator library: ``pandas-ta`` (the usual choice) requires Python >= 3.12 on PyPI
and ATM runs on 3.11; ``ta`` 0.11.0 installs with pandas 3.1 / numpy 2.4 and agrees with these
formulas, but its last release is from 2023, it ships only an sdist, and its CCI uses a
Python-level ``rolling().apply`` (about 4 s on 350k rows, against ~20 ms here). The formulas
above are a few lines of pandas each and are tested against hand-computed references.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from atm.config import AtmConfig
from atm.errors import DataError


class FeatureConfig(AtmConfig):
    """Windows of the market features (bars; minutes for 1m klines)."""

    return_lags: list[int] = Field(
        [1, 5, 15, 60], description="log-return lags: ret_K = log(close[t-1] / close[t-1-K])")
    vol_window: int = Field(30, ge=2, description="window of the rolling std of 1-bar log returns "
                                                  "(vol)")
    vol_long_window: int = Field(120, ge=2, description="long window for the volatility regime: "
                                                        "vol_regime = log(vol / vol_long)")
    zscore_window: int = Field(60, ge=2, description="window of the volume and trade-count "
                                                     "z-scores (on log1p values)")
    rsi_period: int = Field(14, ge=2, description="RSI period (Wilder's smoothing)")
    macd_fast: int = Field(12, ge=1, description="MACD fast EMA span")
    macd_slow: int = Field(26, ge=2, description="MACD slow EMA span")
    macd_signal: int = Field(9, ge=1, description="MACD signal EMA span")
    bb_window: int = Field(20, ge=2, description="Bollinger band SMA window")
    bb_std: float = Field(2.0, gt=0, description="Bollinger band width in population std devs")
    cci_window: int = Field(20, ge=2, description="CCI window")
    roc_period: int = Field(10, ge=1, description="rate-of-change period")
    range_window: int = Field(60, ge=2, description="window of the range position "
                                                    "(close within the window's low..high)")
    ema_span: int = Field(30, ge=2, description="EMA span of the trend features")
    slope_lag: int = Field(5, ge=1, description="bars over which the EMA slope is measured")

    @field_validator("return_lags")
    @classmethod
    def _lags(cls, v: list[int]) -> list[int]:
        if not v or any(int(k) < 1 for k in v):
            raise ValueError("return_lags must be a non-empty list of integers >= 1")
        return sorted(set(int(k) for k in v))

    def warmup(self) -> int:
        """Bars before ``t`` the longest finite window needs (rows before it hold NaN)."""
        return 1 + max(*self.return_lags, self.vol_long_window, self.zscore_window,
                       self.rsi_period, self.bb_window, self.cci_window, self.roc_period,
                       self.range_window, self.macd_slow + self.macd_signal,
                       self.ema_span + self.slope_lag)

    def names(self) -> list[str]:
        """The feature column names, in order."""
        return ([f"ret_{k}" for k in self.return_lags]
                + ["vol", "vol_regime", "volume_z", "count_z", "taker_buy_ratio", "rsi",
                   "macd", "macd_signal", "macd_hist", "bb_pos", "cci", "roc", "range_pos",
                   "ema_gap", "ema_slope"])


FEATURE_COLUMNS_REQUIRED = ("open", "high", "low", "close", "volume", "count", "taker_buy_volume")


def compute_features(df: pd.DataFrame, cfg: FeatureConfig | None = None) -> pd.DataFrame:
    """Feature table aligned with ``df`` (same index); row ``t`` uses bars ``< t`` only."""
    cfg = cfg or FeatureConfig()
    missing = [c for c in FEATURE_COLUMNS_REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"kline frame lacks column(s) {missing} needed for features; "
                        f"has {list(df.columns)}")
    close = pd.Series(df["close"].to_numpy(np.float64))
    high = pd.Series(df["high"].to_numpy(np.float64))
    low = pd.Series(df["low"].to_numpy(np.float64))
    volume = pd.Series(df["volume"].to_numpy(np.float64))
    count = pd.Series(df["count"].to_numpy(np.float64))
    taker = pd.Series(df["taker_buy_volume"].to_numpy(np.float64))

    with np.errstate(divide="ignore", invalid="ignore"):
        logc = np.log(close)
        out: dict[str, pd.Series] = {}
        for k in cfg.return_lags:
            out[f"ret_{k}"] = logc.diff(k)
        r1 = logc.diff(1)
        vol = r1.rolling(cfg.vol_window, min_periods=cfg.vol_window).std()
        vol_long = r1.rolling(cfg.vol_long_window, min_periods=cfg.vol_long_window).std()
        out["vol"] = vol
        out["vol_regime"] = np.log(vol / vol_long)
        out["volume_z"] = _zscore(np.log1p(volume), cfg.zscore_window)
        out["count_z"] = _zscore(np.log1p(count), cfg.zscore_window)
        out["taker_buy_ratio"] = taker / volume
        out["rsi"] = rsi(close, cfg.rsi_period)
        m, s, h = macd(close, cfg.macd_fast, cfg.macd_slow, cfg.macd_signal)
        out["macd"], out["macd_signal"], out["macd_hist"] = m / close, s / close, h / close
        out["bb_pos"] = bollinger_pos(close, cfg.bb_window, cfg.bb_std)
        out["cci"] = cci(high, low, close, cfg.cci_window)
        out["roc"] = close / close.shift(cfg.roc_period) - 1.0
        lo = low.rolling(cfg.range_window, min_periods=cfg.range_window).min()
        hi = high.rolling(cfg.range_window, min_periods=cfg.range_window).max()
        out["range_pos"] = (close - lo) / (hi - lo)
        ema = close.ewm(span=cfg.ema_span, adjust=False).mean()
        ema.iloc[: cfg.ema_span - 1] = np.nan  # not warmed up yet
        out["ema_gap"] = close / ema - 1.0
        out["ema_slope"] = ema / ema.shift(cfg.slope_lag) - 1.0

    feats = pd.DataFrame(out)
    feats = feats.replace([np.inf, -np.inf], np.nan)
    # Everything above is "as of the close of bar s"; row t may only see bars < t.
    feats = feats.shift(1)
    feats.index = df.index
    return feats[cfg.names()].astype(np.float64)


# ------------------------------------------------------------------------ indicators
# Each takes completed bars and returns the value as of each bar's close (no shift).

def rsi(close: pd.Series, n: int = 14) -> pd.Series:
    """Wilder's RSI: averages seeded with the SMA of the first ``n`` changes, then smoothed."""
    close = pd.Series(close, dtype=np.float64).reset_index(drop=True)
    delta = close.diff()
    gain = delta.clip(lower=0.0)
    loss = (-delta).clip(lower=0.0)
    avg_gain = _wilder(gain, n)
    avg_loss = _wilder(loss, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        rs = avg_gain / avg_loss
        out = 100.0 - 100.0 / (1.0 + rs)
    # avg_loss == 0: all gains -> 100 (0/0 in a flat window stays NaN: no information).
    out[(avg_loss == 0) & (avg_gain > 0)] = 100.0
    return out


def _wilder(x: pd.Series, n: int) -> pd.Series:
    """Wilder's smoothing of ``x[1:]`` (x[0] is the NaN of a diff): SMA seed at index n."""
    out = pd.Series(np.nan, index=x.index, dtype=np.float64)
    if len(x) <= n:
        return out
    seeded = x.copy()
    seeded.iloc[n] = x.iloc[1:n + 1].mean()
    # ewm with adjust=False and alpha=1/n is exactly avg_t = avg_{t-1} * (n-1)/n + x_t / n.
    out.iloc[n:] = seeded.iloc[n:].ewm(alpha=1.0 / n, adjust=False).mean().to_numpy()
    return out


def ema(x: pd.Series, span: int) -> pd.Series:
    """EMA with ``alpha = 2 / (span + 1)``, seeded with the first value (``adjust=False``)."""
    return pd.Series(x, dtype=np.float64).ewm(span=span, adjust=False).mean()


def macd(close: pd.Series, fast: int = 12, slow: int = 26, signal: int = 9
         ) -> tuple[pd.Series, pd.Series, pd.Series]:
    """MACD line, signal line and histogram (NaN until the slow EMA and signal have warmed up)."""
    close = pd.Series(close, dtype=np.float64).reset_index(drop=True)
    line = ema(close, fast) - ema(close, slow)
    line.iloc[: slow - 1] = np.nan
    sig = line.ewm(span=signal, adjust=False).mean()  # ewm skips the leading NaNs
    sig.iloc[: slow + signal - 2] = np.nan
    return line, sig, line - sig


def bollinger_pos(close: pd.Series, window: int = 20, k: float = 2.0) -> pd.Series:
    """Bollinger %B: 0 at the lower band, 1 at the upper band (population std)."""
    close = pd.Series(close, dtype=np.float64).reset_index(drop=True)
    mid = close.rolling(window, min_periods=window).mean()
    sd = close.rolling(window, min_periods=window).std(ddof=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (close - (mid - k * sd)) / (2.0 * k * sd)


def cci(high: pd.Series, low: pd.Series, close: pd.Series, window: int = 20) -> pd.Series:
    """Commodity Channel Index with Lambert's 0.015 constant and the mean absolute deviation."""
    tp = ((pd.Series(high, dtype=np.float64) + pd.Series(low, dtype=np.float64)
           + pd.Series(close, dtype=np.float64)) / 3.0).reset_index(drop=True)
    sma = tp.rolling(window, min_periods=window).mean()
    vals = tp.to_numpy()
    out = np.full(len(vals), np.nan)
    if len(vals) >= window:
        win = np.lib.stride_tricks.sliding_window_view(vals, window)  # (n-w+1, w), a view
        m = sma.to_numpy()[window - 1:]
        mad = np.abs(win - m[:, None]).mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[window - 1:] = (vals[window - 1:] - m) / (0.015 * mad)
    return pd.Series(out, index=tp.index)


def _zscore(x: pd.Series, window: int) -> pd.Series:
    r = x.rolling(window, min_periods=window)
    return (x - r.mean()) / r.std()


# ------------------------------------------------------------------ window features
# The handful of numbers the ``features-text`` encoder states (atm.prompting.encoders), as one
# table so that a classic model can be given exactly the values the LLM reads.
WINDOW_FEATURES = ("win_high", "win_low", "win_close_high", "win_close_low", "last_ret", "vol_ratio")


def window_features(df: pd.DataFrame, lag: int = 10) -> pd.DataFrame:
    """Minute ``t`` against the bar ``lag`` minutes before it, from bars ``t-lag .. t-1`` only.

    - ``win_high``: high(t-1) / high(t-lag) - 1
    - ``win_low``: low(t-1) / low(t-lag) - 1
    - ``win_close_high``: close(t-1) / high(t-lag) - 1
    - ``win_close_low``: close(t-1) / low(t-lag) - 1
    - ``last_ret``: close(t-1) / close(t-2) - 1 (the last minute's change)
    - ``vol_ratio``: volume(t-1) over the mean volume of t-lag .. t-1

    The seed label compares minute t's high and low with those of t-lag (``atm.market.labels``):
    these are the same comparisons one minute earlier. Rows before ``lag`` are NaN; a zero price or
    a window without volume gives NaN, never ``inf``.
    """
    if lag < 2:
        raise DataError(f"window_features: lag must be >= 2, got {lag}")
    missing = [c for c in ("high", "low", "close", "volume") if c not in df.columns]
    if missing:
        raise DataError(f"kline frame lacks column(s) {missing} needed for window features")
    high = pd.Series(df["high"].to_numpy(np.float64))
    low = pd.Series(df["low"].to_numpy(np.float64))
    close = pd.Series(df["close"].to_numpy(np.float64))
    volume = pd.Series(df["volume"].to_numpy(np.float64))
    ref = lag - 1  # as of the close of bar s = t-1, the reference bar t-lag is s-(lag-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = pd.DataFrame({
            "win_high": high / high.shift(ref) - 1.0,
            "win_low": low / low.shift(ref) - 1.0,
            "win_close_high": close / high.shift(ref) - 1.0,
            "win_close_low": close / low.shift(ref) - 1.0,
            "last_ret": close / close.shift(1) - 1.0,
            "vol_ratio": volume / volume.rolling(lag, min_periods=lag).mean(),
        })
    out = out.replace([np.inf, -np.inf], np.nan).shift(1)  # row t sees bars < t only
    out.iloc[:lag] = np.nan  # every column from the same first minute (bar t-lag must exist)
    out.index = df.index
    return out[list(WINDOW_FEATURES)].astype(np.float64)
