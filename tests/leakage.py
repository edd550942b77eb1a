"""Helpers for no-leakage tests: change the future, check the past did not move.

Used by ``tests/market/test_no_leakage.py`` for features and labels; the prompting tests reuse them for
prompt contexts::

    from leakage import perturb_from
    changed = perturb_from(df, t, seed=1)          # every bar at positions >= t changed
    assert encoder.encode(df, rows, None) == encoder.encode(changed, rows, None)  # rows <= t

"Known at the open of t" means bars ``< t``, so the strict check perturbs bar ``t`` itself too
(``perturb_from(df, t)``); ``perturb_after(df, t)`` leaves bar ``t`` alone (positions > t).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

PRICE_COLUMNS = ("open", "high", "low", "close")
AMOUNT_COLUMNS = ("volume", "quote_volume", "taker_buy_volume", "taker_buy_quote_volume")
RAW_COLUMNS = ("open_time", "open", "high", "low", "close", "volume", "close_time",
               "quote_volume", "count", "taker_buy_volume", "taker_buy_quote_volume", "ignore")


def perturb_from(df: pd.DataFrame, t: int, seed: int = 0) -> pd.DataFrame:
    """A copy of ``df`` where every bar at position ``>= t`` is randomly different.

    Prices move by a random factor (a different one per bar and column, kept a valid bar:
    high >= max(open, close), low <= min(open, close)); volumes, trade counts and taker volumes
    are redrawn. Timestamps are kept (the future's prices change, not its calendar).
    """
    if not 0 <= t < len(df):
        raise ValueError(f"perturb_from: t={t} outside 0..{len(df) - 1}")
    rng = np.random.default_rng(seed)
    out = df.copy()
    m = len(df) - t
    sl = slice(t, None)
    base = {c: df[c].to_numpy(np.float64)[sl] for c in PRICE_COLUMNS if c in df.columns}
    if base:
        o = base["open"] * np.exp(rng.normal(0, 0.01, m))
        c = base["close"] * np.exp(rng.normal(0, 0.01, m))
        h = np.maximum(o, c) * (1 + rng.uniform(0.0001, 0.01, m))
        lo = np.minimum(o, c) * (1 - rng.uniform(0.0001, 0.01, m))
        for name, vals in (("open", o), ("high", h), ("low", lo), ("close", c)):
            if name in out.columns:
                out.iloc[t:, out.columns.get_loc(name)] = vals
    for name in AMOUNT_COLUMNS:
        if name in out.columns:
            out.iloc[t:, out.columns.get_loc(name)] = (
                df[name].to_numpy(np.float64)[sl] * rng.uniform(0.1, 10.0, m))
    if "volume" in out.columns and "taker_buy_volume" in out.columns:
        vol = out["volume"].to_numpy(np.float64).copy()
        tb = vol[t:] * rng.uniform(0, 1, m)
        out.iloc[t:, out.columns.get_loc("taker_buy_volume")] = tb
    if "count" in out.columns:
        out.iloc[t:, out.columns.get_loc("count")] = rng.integers(1, 10_000, m).astype(
            df["count"].dtype)
    return out


def perturb_after(df: pd.DataFrame, t: int, seed: int = 0) -> pd.DataFrame:
    """Like :func:`perturb_from` but bar ``t`` itself is kept (positions ``> t`` change)."""
    if t + 1 >= len(df):
        return df.copy()
    return perturb_from(df, t + 1, seed)


def assert_frames_equal_upto(a: pd.DataFrame | pd.Series, b: pd.DataFrame | pd.Series,
                             t: int) -> None:
    """Rows at positions ``<= t`` are identical (NaN == NaN), bit for bit."""
    pd.testing.assert_frame_equal(pd.DataFrame(a).iloc[: t + 1], pd.DataFrame(b).iloc[: t + 1],
                                  check_exact=True)


def raw_sample_rows(zip_path: str | Path) -> list[list[str]]:
    """The CSV rows of one Binance daily zip, as strings, read with nothing but ``zipfile``.

    Used to hand-check labels against the real sample independently of ``atm.market.klines``.
    """
    with zipfile.ZipFile(zip_path) as zf:
        (name,) = zf.namelist()
        text = zf.read(name).decode()
    return [line.split(",") for line in text.splitlines() if line.strip()]


def raw_sample_frame(zip_paths: list[Path]) -> pd.DataFrame:
    """A kline frame from Binance spot zips (µs timestamps, no header), via pandas only."""
    frames = [pd.read_csv(p, header=None, names=list(RAW_COLUMNS)) for p in zip_paths]
    df = pd.concat(frames, ignore_index=True).drop(columns="ignore")
    for c in ("open_time", "close_time"):
        df[c] = pd.to_datetime(df[c], unit="us", utc=True).astype("datetime64[ns, UTC]")
    return df
