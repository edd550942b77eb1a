"""Features: indicator values against textbook / hand-computed references, alignment, NaN rules."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest

from atm.errors import ConfigError, DataError
from atm.market.features import (FeatureConfig, bollinger_pos, cci, compute_features, macd, rsi)

# StockCharts ChartSchool's RSI worked example (Wilder, 14 periods): closes and published RSI.
# Their spreadsheet rounds the average gain/loss, so its values sit within ~0.07 of the exact
# ones; the first value is also checked exactly from the hand-summed gains and losses.
SC_CLOSES = [44.34, 44.09, 44.15, 43.61, 44.33, 44.83, 45.10, 45.42, 45.84, 46.08, 45.89, 46.03,
             45.61, 46.28, 46.28, 46.00, 46.03, 46.41, 46.22, 45.64, 46.21, 46.25, 45.71, 46.45,
             45.78, 45.35, 44.03, 44.18, 44.22, 44.57, 43.42, 42.66, 43.13]
SC_RSI = [70.53, 66.32, 66.55, 69.41, 66.36, 57.97, 62.93, 63.26, 56.06, 62.38, 54.71, 50.42,
          39.99, 41.46, 41.87, 45.46, 37.30, 33.08, 37.77]


@pytest.fixture(scope="module")
def btc(btc_parquet):
    from atm.market.klines import read_klines_parquet

    return read_klines_parquet(btc_parquet)


@pytest.fixture(scope="module")
def feats(btc):
    return compute_features(btc)


def walk(n=300, seed=0):
    rng = np.random.default_rng(seed)
    close = 100 + np.cumsum(rng.normal(0, 1, n))
    high = close + rng.uniform(0, 1, n)
    low = close - rng.uniform(0, 1, n)
    return pd.Series(close), pd.Series(high), pd.Series(low)


# ---------------------------------------------------------------------- references (loops)

def ref_rsi(c, n=14):
    d = [c[i] - c[i - 1] for i in range(1, len(c))]
    out = [math.nan] * len(c)
    g = sum(max(x, 0) for x in d[:n]) / n
    l_ = sum(max(-x, 0) for x in d[:n]) / n
    out[n] = 100 - 100 / (1 + g / l_)
    for i in range(n + 1, len(c)):
        x = d[i - 1]
        g = (g * (n - 1) + max(x, 0)) / n
        l_ = (l_ * (n - 1) + max(-x, 0)) / n
        out[i] = 100 - 100 / (1 + g / l_)
    return out


def ref_ema(x, span):
    a = 2 / (span + 1)
    out, e = [], None
    for v in x:
        e = v if e is None else a * v + (1 - a) * e
        out.append(e)
    return out


def ref_macd(c, fast=12, slow=26, sig=9):
    line = [f - s for f, s in zip(ref_ema(c, fast), ref_ema(c, slow))]
    valid = line[slow - 1:]
    signal = [math.nan] * (slow - 1) + ref_ema(valid, sig)
    line = [math.nan] * (slow - 1) + valid
    for i in range(slow - 1, slow + sig - 2):
        signal[i] = math.nan
    return line, signal


def ref_bb(c, w=20, k=2.0):
    out = [math.nan] * len(c)
    for i in range(w - 1, len(c)):
        win = c[i - w + 1: i + 1]
        m, sd = statistics.fmean(win), statistics.pstdev(win)
        out[i] = (c[i] - (m - k * sd)) / (2 * k * sd)
    return out


def ref_cci(h, l_, c, w=20):
    tp = [(a + b + d) / 3 for a, b, d in zip(h, l_, c)]
    out = [math.nan] * len(tp)
    for i in range(w - 1, len(tp)):
        win = tp[i - w + 1: i + 1]
        m = sum(win) / w
        md = sum(abs(x - m) for x in win) / w
        out[i] = (tp[i] - m) / (0.015 * md)
    return out


def close_to(got, ref, rel=1e-9, abs_=1e-9):
    got = np.asarray(got, dtype=float)
    ref = np.asarray(ref, dtype=float)
    assert got.shape == ref.shape
    assert (np.isnan(got) == np.isnan(ref)).all(), "NaN positions differ"
    m = ~np.isnan(ref)
    np.testing.assert_allclose(got[m], ref[m], rtol=rel, atol=abs_)


# --------------------------------------------------------------------------- indicators

def test_rsi_textbook_example():
    got = rsi(pd.Series(SC_CLOSES), 14)
    assert got.iloc[:14].isna().all()
    # first value from the hand sums: gains 3.34, losses 1.40 over 14 changes
    assert got.iloc[14] == pytest.approx(100 - 100 / (1 + 3.34 / 1.40), abs=1e-9)
    np.testing.assert_allclose(got.iloc[14:].to_numpy(), SC_RSI, atol=0.1)
    close_to(got, ref_rsi(SC_CLOSES))


def test_rsi_matches_loop_on_random_walk():
    c, _, _ = walk()
    close_to(rsi(c, 14), ref_rsi(list(c)), rel=1e-10)


def test_rsi_extremes():
    up = rsi(pd.Series(np.arange(1.0, 40.0)), 14)
    assert (up.iloc[14:] == 100).all()
    down = rsi(pd.Series(np.arange(40.0, 1.0, -1)), 14)
    assert (down.iloc[14:] == 0).all()


def test_macd_matches_loop():
    c, _, _ = walk()
    line, sig, hist = macd(c)
    rl, rs = ref_macd(list(c))
    close_to(line, rl)
    close_to(sig, rs)
    close_to(hist, np.asarray(rl) - np.asarray(rs))


def test_bollinger_matches_loop_and_bounds():
    c, _, _ = walk()
    got = bollinger_pos(c)
    close_to(got, ref_bb(list(c)), rel=1e-8)
    # by hand: window [1, 3] * 10 has mean 2, population std 1; bands 0 .. 4; close 3 -> 0.75
    assert bollinger_pos(pd.Series([1.0, 3.0] * 10)).iloc[-1] == pytest.approx(0.75)


def test_cci_matches_loop():
    c, h, l_ = walk()
    close_to(cci(h, l_, c), ref_cci(list(h), list(l_), list(c)), rel=1e-8)


# ------------------------------------------------------------------------ feature table

def test_columns_alignment_and_dtypes(btc, feats):
    cfg = FeatureConfig()
    assert list(feats.columns) == cfg.names()
    assert feats.index.equals(btc.index)
    assert (feats.dtypes == np.float64).all()
    assert feats.iloc[0].isna().all()  # nothing is known before the first bar
    w = cfg.warmup()
    assert not feats.iloc[w:].isna().any().any(), feats.iloc[w:].isna().sum()
    assert np.isfinite(feats.iloc[w:].to_numpy()).all()


def test_rows_use_the_previous_bar(btc, feats):
    """Spot checks on real rows: row t is computed from bars t-1 and earlier."""
    c = btc["close"].to_numpy()
    for t in (61, 500, 14400):
        assert feats["ret_1"].iloc[t] == pytest.approx(math.log(c[t - 1] / c[t - 2]), rel=1e-9)
        assert feats["ret_60"].iloc[t] == pytest.approx(math.log(c[t - 1] / c[t - 61]),
                                                        rel=1e-9)
        assert feats["taker_buy_ratio"].iloc[t] == pytest.approx(
            btc["taker_buy_volume"].iloc[t - 1] / btc["volume"].iloc[t - 1])
        assert feats["roc"].iloc[t] == pytest.approx(c[t - 1] / c[t - 11] - 1)
        lo = btc["low"].iloc[t - 60:t].min()
        hi = btc["high"].iloc[t - 60:t].max()
        assert feats["range_pos"].iloc[t] == pytest.approx((c[t - 1] - lo) / (hi - lo))
        v = np.log1p(btc["volume"].to_numpy()[t - 60:t])
        assert feats["volume_z"].iloc[t] == pytest.approx((v[-1] - v.mean()) / v.std(ddof=1))
        r = np.diff(np.log(c[t - 31:t]))
        assert feats["vol"].iloc[t] == pytest.approx(r.std(ddof=1))
    rsi_full = rsi(btc["close"], 14)
    assert feats["rsi"].iloc[1000] == rsi_full.iloc[999]


def test_value_ranges(feats):
    f = feats.dropna()
    assert f["rsi"].between(0, 100).all()
    assert f["range_pos"].between(0, 1).all()
    assert f["taker_buy_ratio"].between(0, 1).all()
    assert f["vol"].gt(0).all()


def test_zero_volume_gives_nan_not_inf(btc):
    df = btc.iloc[:200].copy()
    df.loc[100, ["volume", "taker_buy_volume"]] = 0.0
    f = compute_features(df)
    assert math.isnan(f["taker_buy_ratio"].iloc[101])
    assert np.isfinite(f.to_numpy()[~np.isnan(f.to_numpy())]).all()


def test_flat_prices_give_nan_not_inf():
    n = 200
    df = pd.DataFrame({"open": np.full(n, 10.0), "high": np.full(n, 10.0),
                       "low": np.full(n, 10.0), "close": np.full(n, 10.0),
                       "volume": np.full(n, 1.0), "count": np.full(n, 3),
                       "taker_buy_volume": np.full(n, 0.5)})
    f = compute_features(df)
    vals = f.to_numpy()
    assert not np.isinf(vals).any()
    assert (f["ret_1"].iloc[2:] == 0).all()


def test_config_validation_and_names():
    cfg = FeatureConfig.load(None, overrides=["return_lags=[60, 1, 1]", "rsi_period=7"])
    assert cfg.return_lags == [1, 60] and cfg.rsi_period == 7
    assert cfg.names()[:2] == ["ret_1", "ret_60"]
    with pytest.raises(ConfigError):
        FeatureConfig.load(None, overrides=["return_lags=[0]"])
    with pytest.raises(ConfigError, match="valid keys"):
        FeatureConfig.load(None, overrides=["rsi=3"])
    for name, field in FeatureConfig.model_fields.items():
        assert field.description, name


def test_missing_columns_error():
    with pytest.raises(DataError, match="taker_buy_volume"):
        compute_features(pd.DataFrame({"open": [1.0], "high": [1.0], "low": [1.0],
                                       "close": [1.0], "volume": [1.0], "count": [1]}))
