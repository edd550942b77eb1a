"""No leakage: changing any bar from t on leaves everything known at the open of t unchanged.

Features of row t may use bars < t only: perturbing every bar at positions >= t (bar t itself
included) must leave feature rows <= t bit-identical, for several t and random perturbations.
Labels look ahead by design; the test pins exactly how far (``label_horizon``) and checks the
perturbation does change what it should, so the tests could fail.
The prompting tests extend this to prompt contexts with the same helpers (tests/leakage.py).
"""

from __future__ import annotations

import numpy as np
import pytest

from atm.market.features import FeatureConfig, compute_features
from atm.market.labels import LabelConfig, compute_labels, label_horizon, realized_returns
from leakage import assert_frames_equal_upto, perturb_after, perturb_from

CUTS = [0, 1, 2, 30, 121, 122, 123, 777, 3000]


@pytest.fixture(scope="module")
def btc(btc_parquet):
    from atm.market.klines import read_klines_parquet

    # 4,000 real minutes keep this quick while covering every warm-up boundary
    return read_klines_parquet(btc_parquet).iloc[:4000].reset_index(drop=True)


@pytest.fixture(scope="module")
def base_features(btc):
    return compute_features(btc)


def test_perturb_from_changes_only_the_future(btc):
    t = 500
    p = perturb_from(btc, t, seed=3)
    assert p.iloc[:t].equals(btc.iloc[:t])
    for c in ("open", "high", "low", "close", "volume", "count", "taker_buy_volume"):
        assert (p[c].iloc[t:] != btc[c].iloc[t:]).mean() > 0.99, c
    assert (p["high"] >= p[["open", "close"]].max(axis=1)).all()
    assert (p["low"] <= p[["open", "close"]].min(axis=1)).all()
    assert p["open_time"].equals(btc["open_time"])
    q = perturb_after(btc, t, seed=3)
    assert q.iloc[: t + 1].equals(btc.iloc[: t + 1]) and not q.iloc[t + 1:].equals(btc.iloc[t + 1:])


@pytest.mark.parametrize("t", CUTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_features_of_rows_up_to_t_ignore_bars_from_t(btc, base_features, t, seed):
    changed = compute_features(perturb_from(btc, t, seed=seed))
    assert_frames_equal_upto(base_features, changed, t)
    # and the perturbation is visible right after: row t+1 sees bar t (else the test is vacuous)
    if t + 1 >= FeatureConfig().warmup():
        assert not changed.iloc[t + 1].equals(base_features.iloc[t + 1])


def test_features_with_other_windows(btc):
    cfg = FeatureConfig(return_lags=[2, 240], vol_window=5, vol_long_window=300, rsi_period=3,
                        bb_window=5, cci_window=7, range_window=500, ema_span=100)
    base = compute_features(btc, cfg)
    for t in (5, 400, 1500):
        assert_frames_equal_upto(base, compute_features(perturb_from(btc, t, seed=t), cfg), t)


def test_features_equal_on_truncated_history(btc, base_features):
    """Row t computed from the frame cut right after bar t equals the full frame's row t."""
    for t in (200, 2500, 3999):
        cut = compute_features(btc.iloc[: t + 1])
        assert_frames_equal_upto(base_features, cut, t)


@pytest.mark.parametrize("rule", ["seed", "entry", "return", "fee-aware"])
def test_labels_read_exactly_their_horizon(btc, rule):
    """The label of t is unchanged by bars after t + label_horizon - 1 (+1 for the exit open)."""
    cfg = LabelConfig(rule=rule, horizon=10)
    base = compute_labels(btc, cfg)
    h = label_horizon(cfg)
    # entry reads bars t..t+H-1 (all columns); return/fee-aware read open(t+H); seed reads bar t
    last_read = {"seed": 0, "entry": h - 1, "return": h, "fee-aware": h}[rule]
    for t in (20, 1000, 3000):
        changed = compute_labels(perturb_from(btc, t + last_read + 1, seed=t), cfg)
        assert base.iloc[: t + 1].equals(changed.iloc[: t + 1])
    # the last bar read does matter somewhere (the horizon is not shorter than claimed)
    moved = 0
    for seed in range(5):
        for t in (20, 1000, 3000):
            changed = compute_labels(perturb_from(btc, t + last_read, seed=seed), cfg)
            moved += not (base.iloc[t] == changed.iloc[t] or
                          (base.isna().iloc[t] and changed.isna().iloc[t]))
    assert moved > 0


def test_realized_returns_read_open_at_t_plus_h(btc):
    base = realized_returns(btc, 10)
    for t in (20, 3000):
        same = realized_returns(perturb_from(btc, t + 11, seed=1), 10)
        assert_frames_equal_upto(base, same, t)
        diff = realized_returns(perturb_from(btc, t + 10, seed=1), 10)
        assert not np.isclose(diff["BUY"].iloc[t], base["BUY"].iloc[t])
