"""Labels: the seed rule hand-checked on real sample rows; the others on tiny hand-made frames."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from atm.errors import ConfigError, DataError
from atm.market.labels import (LabelConfig, class_balance, compute_labels, label_horizon,
                               label_lookback, realized_returns)
from leakage import raw_sample_rows

DAY1 = "BTCUSDT-1m-2025-08-01.zip"


@pytest.fixture(scope="module")
def btc(btc_parquet):
    from atm.market.klines import read_klines_parquet

    return read_klines_parquet(btc_parquet)


@pytest.fixture(scope="module")
def day1_raw(sample_raw):
    path = sample_raw / "data/spot/daily/klines/BTCUSDT/1m" / DAY1
    return raw_sample_rows(path)


def frame(open_, high=None, low=None, start="2025-01-01", freq="1min", times=None):
    open_ = np.asarray(open_, dtype=float)
    high = open_ if high is None else np.asarray(high, dtype=float)
    low = open_ if low is None else np.asarray(low, dtype=float)
    t = pd.date_range(start, periods=len(open_), freq=freq, tz="UTC") if times is None else times
    return pd.DataFrame({"open_time": t, "open": open_, "high": high, "low": low,
                         "close": open_})


# ------------------------------------------------------------------------------ seed

def test_seed_matches_hand_rule_on_real_first_day(btc, day1_raw):
    """Every minute of 2025-08-01, recomputed from the raw CSV strings with the script's if/elif."""
    labels = compute_labels(btc, LabelConfig(rule="seed"))
    assert len(day1_raw) == 1440
    expected = []
    for t, row in enumerate(day1_raw):
        if t < 10:
            expected.append(None)
            continue
        high, low = float(row[2]), float(row[3])
        high10, low10 = float(day1_raw[t - 10][2]), float(day1_raw[t - 10][3])
        if high > 1.002 * high10:
            expected.append("BUY")
        elif low < 0.998 * low10:
            expected.append("SELL")
        else:
            expected.append("NOOP")
    got = labels.iloc[:1440].tolist()
    assert got == expected
    assert {"BUY", "SELL", "NOOP"} <= set(expected)  # the day exercises every branch


def test_seed_specific_real_rows(btc, day1_raw):
    """A few rows spelled out: the label, and the raw numbers that decide it."""
    labels = compute_labels(btc, LabelConfig(rule="seed"))
    buys = [t for t in range(10, 1440) if labels.iloc[t] == "BUY"]
    sells = [t for t in range(10, 1440) if labels.iloc[t] == "SELL"]
    t = buys[0]
    assert float(day1_raw[t][2]) > 1.002 * float(day1_raw[t - 10][2])
    t = sells[0]
    assert not float(day1_raw[t][2]) > 1.002 * float(day1_raw[t - 10][2])
    assert float(day1_raw[t][3]) < 0.998 * float(day1_raw[t - 10][3])
    # the first row: 2025-08-01 00:00 is present (the original loader lost it) and unlabelled
    assert btc["open_time"].iloc[0] == pd.Timestamp("2025-08-01 00:00", tz="UTC")
    assert labels.iloc[:10].isna().all() and labels.iloc[10] is not None


def test_seed_class_balance_of_sample(btc):
    bal = class_balance(compute_labels(btc, LabelConfig(rule="seed")))
    assert bal["total"] == 14401 and bal["missing"] == 10
    assert bal["counts"] == {"BUY": 663, "NOOP": 13128, "SELL": 600}
    assert sum(bal["counts"].values()) == bal["labelled"]
    assert math.isclose(sum(bal["fractions"].values()), 1.0)


def test_seed_buy_wins_when_both_hold():
    high = [100] * 10 + [101]   # +1% > 0.2%
    low = [100] * 10 + [90]     # -10% < -0.2%
    df = frame([100] * 11, high, low)
    lab = compute_labels(df, LabelConfig(rule="seed"))
    assert lab.iloc[10] == "BUY"
    assert lab.iloc[:10].isna().all()


def test_seed_strict_inequalities():
    # exactly 1.002 * high(t-10) is not a BUY; exactly 0.998 * low(t-10) is not a SELL
    df = frame([1000] * 12, [1000] * 10 + [1.002 * 1000, 1000], [1000] * 11 + [0.998 * 1000])
    lab = compute_labels(df, LabelConfig(rule="seed"))
    assert lab.iloc[10] == "NOOP" and lab.iloc[11] == "NOOP"


def test_seed_gap_in_lookback_is_unlabelled():
    times = pd.date_range("2025-01-01", periods=30, freq="1min", tz="UTC")
    times = times.delete(15)  # minute 15 missing
    df = frame(np.full(29, 100.0), times=times)
    lab = compute_labels(df, LabelConfig(rule="seed"))
    # rows 15..24 (positions after the gap) would compare with a bar 11 minutes back
    assert lab.iloc[10:15].notna().all()
    assert lab.iloc[15:25].isna().all()
    assert lab.iloc[25:].notna().all()


# ----------------------------------------------------------------------------- entry

def test_entry_hand_computed():
    # H=3, x=1%: BUY if max(high[t..t+2]) >= open[t] * 1.01
    open_ = [100, 100, 102, 100, 100, 100]
    high = [100, 100.5, 103, 100.9, 101.0, 100]
    lab = compute_labels(frame(open_, high), LabelConfig(rule="entry", horizon=3, threshold=0.01))
    # t0: max(100,100.5,103)=103>=101 BUY; t1: 103>=101 BUY; t2: max(103,100.9,101)=103 < 103.02
    # NOOP; t3: max(100.9,101,100)=101 >= 101 BUY (>= is inclusive); t4, t5: horizon past end
    assert lab.tolist() == ["BUY", "BUY", "NOOP", "BUY", None, None]


def test_entry_absolute():
    open_ = [100, 100, 100, 100]
    high = [100, 100.4, 100.6, 100]
    lab = compute_labels(frame(open_, high),
                         LabelConfig(rule="entry", horizon=2, threshold=0.5, absolute=True))
    assert lab.tolist() == ["NOOP", "BUY", "BUY", None]


def test_entry_only_buy_or_noop_on_sample(btc):
    lab = compute_labels(btc, LabelConfig(rule="entry", horizon=10, threshold=0.002))
    assert set(lab.dropna()) <= {"BUY", "NOOP"}
    assert lab.iloc[-9:].isna().all() and lab.iloc[-10] is not None


def test_entry_threshold_zero_rejected():
    with pytest.raises(ConfigError, match="threshold"):
        LabelConfig(rule="entry", threshold=0.0)


# ---------------------------------------------------------------------------- return

def test_return_hand_computed():
    lab = compute_labels(frame([100, 101, 99, 102]), LabelConfig(rule="return", horizon=2))
    assert lab.dtype == np.float64
    assert lab.iloc[0] == pytest.approx(99 / 100 - 1)
    assert lab.iloc[1] == pytest.approx(102 / 101 - 1)
    assert lab.iloc[2:].isna().all()


def test_return_gap_in_horizon_is_nan():
    times = pd.date_range("2025-01-01", periods=6, freq="1min", tz="UTC").delete(3)
    lab = compute_labels(frame([100, 101, 102, 103, 104], times=times),
                         LabelConfig(rule="return", horizon=1))
    assert lab.iloc[0] == pytest.approx(0.01)
    assert math.isnan(lab.iloc[2])  # minute 2 -> next row is minute 4
    assert lab.iloc[3] == pytest.approx(104 / 103 - 1)


# ------------------------------------------------------------------------- fee-aware

def test_fee_aware_hand_computed():
    # fee 0.1% per side: band 0.2%; H=1
    open_ = [100, 100.3, 100.3, 100.0, 100.15, 100.15]
    lab = compute_labels(frame(open_), LabelConfig(rule="fee-aware", horizon=1, fee=0.001))
    # +0.3% BUY; 0 NOOP; -0.299% SELL; +0.15% NOOP; 0 NOOP; last None
    assert lab.tolist() == ["BUY", "NOOP", "SELL", "NOOP", "NOOP", None]


def test_fee_aware_is_argmax_of_realized_returns(btc):
    lab = compute_labels(btc, LabelConfig(rule="fee-aware", horizon=10, fee=0.001))
    rr = realized_returns(btc, 10, fee=0.001)
    ok = lab.notna()
    assert (ok == rr["BUY"].notna()).all()
    # r - cost > 0 exactly when r > cost (IEEE subtraction), so the label is the argmax;
    # a tie (r == cost exactly) would go NOOP in the label but BUY in idxmax: none in the sample.
    best = rr[ok].idxmax(axis=1)
    assert (best == lab[ok]).all()
    assert set(lab[ok]) == {"BUY", "NOOP", "SELL"}


# -------------------------------------------------------------------- realized returns

def test_realized_returns_hand_computed():
    rr = realized_returns(frame([100, 102, 99]), horizon=1, fee=0.001, slippage_bps=5)
    cost = 2 * (0.001 + 0.0005)
    assert list(rr.columns) == ["BUY", "NOOP", "SELL"]
    assert rr["BUY"].iloc[0] == pytest.approx(0.02 - cost)
    assert rr["SELL"].iloc[0] == pytest.approx(-0.02 - cost)
    assert rr["NOOP"].iloc[0] == 0.0
    assert rr["BUY"].iloc[1] == pytest.approx(99 / 102 - 1 - cost)
    assert rr.iloc[2].isna().all()


def test_realized_returns_rejects_bad_horizon():
    with pytest.raises(ValueError):
        realized_returns(frame([1, 2, 3]), horizon=0)


# --------------------------------------------------------------------------- helpers

def test_class_balance_counts_missing():
    s = pd.Series(["BUY", None, "NOOP", "NOOP", None, "SELL"], dtype=object)
    bal = class_balance(s)
    assert bal == {"total": 6, "labelled": 4, "missing": 2,
                   "counts": {"BUY": 1, "NOOP": 2, "SELL": 1},
                   "fractions": {"BUY": 0.25, "NOOP": 0.5, "SELL": 0.25}}
    with pytest.raises(ValueError, match="unexpected"):
        class_balance(pd.Series(["BUY", "HOLD"]))


def test_class_balance_of_returns():
    bal = class_balance(pd.Series([0.01, -0.02, 0.0, np.nan]))
    assert bal["missing"] == 1 and bal["labelled"] == 3
    assert bal["fractions"] == pytest.approx({"up": 1 / 3, "flat": 1 / 3, "down": 1 / 3})
    assert bal["min"] == -0.02 and bal["max"] == 0.01


def test_label_horizon_and_lookback():
    assert label_horizon(LabelConfig(rule="seed")) == 1
    assert label_lookback(LabelConfig(rule="seed")) == 10
    for rule in ("entry", "return", "fee-aware"):
        assert label_horizon(LabelConfig(rule=rule, horizon=30)) == 30
        assert label_lookback(LabelConfig(rule=rule, horizon=30)) == 0


def test_label_config_load_and_unknown_key(tmp_path):
    p = tmp_path / "labels.yaml"
    p.write_text("rule: fee-aware\nhorizon: 15\n")
    cfg = LabelConfig.load(p, overrides=["fee=0.0005"])
    assert (cfg.rule, cfg.horizon, cfg.fee) == ("fee-aware", 15, 0.0005)
    with pytest.raises(ConfigError, match="horizon"):
        LabelConfig.load(None, overrides=["horizn=5"])
    with pytest.raises(ConfigError):
        LabelConfig.load(None, overrides=["rule=random"])
    for name, field in LabelConfig.model_fields.items():
        assert field.description, name


def test_missing_column_is_a_clear_error():
    with pytest.raises(DataError, match="low"):
        compute_labels(pd.DataFrame({"open": [1.0], "high": [1.0]}), LabelConfig(rule="seed"))


# ------------------------------------------------------------------------------- CLI

def test_cli_labels_prints_balance_and_writes(cli, btc_parquet, tmp_path):
    out = tmp_path / "labels.parquet"
    proc = cli("data", "labels", "--klines", str(btc_parquet), "--rule", "seed", "--out", str(out))
    assert "BUY          663" in proc.stdout and "NOOP      13,128" in proc.stdout
    assert "unlabelled 10" in proc.stdout
    written = pd.read_parquet(out)
    assert list(written.columns) == ["open_time", "label"] and len(written) == 14401
    assert written["label"].iloc[:10].isna().all()
    proc = cli("data", "labels", "--klines", str(btc_parquet), "--rule", "fee-aware",
               "--set", "horizon=30", "--json")
    import json

    doc = json.loads(proc.stdout)
    assert doc["config"]["horizon"] == 30 and doc["balance"]["missing"] == 30
    bad = cli("data", "labels", "--klines", str(btc_parquet), "--set", "horizn=3", check=False)
    assert bad.returncode == 2 and "did you mean 'horizon'" in bad.stderr
