"""Chronological splits and walk-forward folds: ordered, disjoint, embargo kept, clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from atm.errors import AtmError, ConfigError
from atm.market.splits import SplitConfig, chronological_split, walk_forward

MIN = pd.Timedelta(minutes=1)


def minutes(n, start="2025-08-01", drop=()):
    t = pd.date_range(start, periods=n, freq="1min", tz="UTC")
    return pd.Series(t.delete(list(drop)) if drop else t)


def gap_minutes(t: pd.Series, a: np.ndarray, b: np.ndarray) -> int:
    """Minutes strictly between the last row of ``a`` and the first row of ``b``."""
    return int((t.iloc[b[0]] - t.iloc[a[-1]]) / MIN) - 1


def check_parts(t, parts, embargo):
    names = list(parts)
    for name in names:
        rows = parts[name]
        assert rows.dtype == np.int64 and len(rows) > 0
        assert (np.diff(rows) == 1).all()  # contiguous ascending positions
    for a, b in zip(names, names[1:]):
        assert parts[a][-1] < parts[b][0]
        assert gap_minutes(t, parts[a], parts[b]) >= embargo
    allrows = np.concatenate(list(parts.values()))
    assert len(np.unique(allrows)) == len(allrows)


def test_fraction_default_on_sample(btc_parquet):
    from atm.market.klines import read_klines_parquet

    t = read_klines_parquet(btc_parquet)["open_time"]
    cfg = SplitConfig()
    parts = chronological_split(t, cfg)
    assert list(parts) == ["train", "verify"]
    check_parts(t, parts, cfg.embargo)
    n = len(t)
    # verify is exactly the last 20% whatever the embargo; train lost exactly `embargo` rows
    assert parts["verify"][0] == n - round(0.2 * n) and parts["verify"][-1] == n - 1
    assert gap_minutes(t, parts["train"], parts["verify"]) == cfg.embargo
    assert len(parts["train"]) == round(0.8 * n) - cfg.embargo


def test_fraction_with_val_is_tail_of_train():
    t = minutes(10_000)
    cfg = SplitConfig(train=0.8, val=0.1, verify=0.2, embargo=30)
    parts = chronological_split(t, cfg)
    assert list(parts) == ["train", "val", "verify"]
    check_parts(t, parts, 30)
    # verify does not move when val is switched on
    assert np.array_equal(parts["verify"],
                          chronological_split(t, SplitConfig(embargo=30))["verify"])
    assert parts["val"][0] == 7000 and parts["val"][-1] == 8000 - 31
    assert parts["train"][-1] == 7000 - 31


@pytest.mark.parametrize("embargo", [0, 1, 10, 180])
def test_embargo_is_exact_on_contiguous_minutes(embargo):
    t = minutes(5000)
    parts = chronological_split(t, SplitConfig(train=0.7, val=0.1, verify=0.3, embargo=embargo))
    check_parts(t, parts, embargo)
    assert gap_minutes(t, parts["train"], parts["val"]) == embargo
    assert gap_minutes(t, parts["val"], parts["verify"]) == embargo


def test_embargo_counts_minutes_across_gaps():
    # 50 missing minutes inside the embargo window before verify: they count towards the gap,
    # so train loses only 120 - 50 = 70 rows instead of 120.
    t = minutes(3000, drop=range(2250, 2300))
    parts = chronological_split(t, SplitConfig(train=0.77, verify=0.23, embargo=120))
    check_parts(t, parts, 120)
    v0 = parts["verify"][0]
    assert t.iloc[v0] == t.iloc[0] + 2322 * MIN  # position 2272 is minute 2322 (after the hole)
    assert v0 - len(parts["train"]) == 70
    assert gap_minutes(t, parts["train"], parts["verify"]) == 120


def test_dates_method():
    t = minutes(10 * 1440)  # 2025-08-01 .. 2025-08-10
    cfg = SplitConfig(method="dates", train_dates=["2025-08-01", "2025-08-07"],
                      val_dates=["2025-08-07", "2025-08-08"],
                      verify_dates=["2025-08-08", "2025-08-11"], embargo=60)
    parts = chronological_split(t, cfg)
    check_parts(t, parts, 60)
    assert t.iloc[parts["verify"][0]] == pd.Timestamp("2025-08-08", tz="UTC")
    assert t.iloc[parts["verify"][-1]] == t.iloc[-1]
    assert t.iloc[parts["val"][0]] == pd.Timestamp("2025-08-07", tz="UTC")
    assert t.iloc[parts["train"][0]] == t.iloc[0]
    # dates already far apart: nothing trimmed
    far = SplitConfig(method="dates", train_dates=["2025-08-01", "2025-08-03"],
                      verify_dates=["2025-08-05", "2025-08-06"], embargo=60)
    p2 = chronological_split(t, far)
    assert t.iloc[p2["train"][-1]] == pd.Timestamp("2025-08-02 23:59", tz="UTC")


def test_overlapping_dates_rejected():
    t = minutes(3 * 1440)
    cfg = SplitConfig(method="dates", train_dates=["2025-08-01", "2025-08-03"],
                      verify_dates=["2025-08-02", "2025-08-04"])
    with pytest.raises(ConfigError, match="overlap"):
        chronological_split(t, cfg)


def test_overlapping_fractions_rejected():
    with pytest.raises(ConfigError, match="overlap"):
        SplitConfig(train=0.9, verify=0.2)
    with pytest.raises(ConfigError, match="val"):
        SplitConfig(train=0.5, val=0.5, verify=0.5)


def test_empty_parts_are_errors():
    t = minutes(3 * 1440)
    cfg = SplitConfig(method="dates", train_dates=["2025-07-01", "2025-07-02"],
                      verify_dates=["2025-08-02", "2025-08-03"])
    with pytest.raises(AtmError, match="'train' is empty"):
        chronological_split(t, cfg)
    # train entirely eaten by the embargo
    with pytest.raises(AtmError, match="embargo"):
        chronological_split(minutes(500), SplitConfig(train=0.2, verify=0.8, embargo=200))
    with pytest.raises(ConfigError, match="verify_dates"):
        SplitConfig(method="dates", train_dates=["2025-08-01", "2025-08-02"])


def test_unsorted_or_numeric_times_rejected():
    t = minutes(100)
    with pytest.raises(AtmError, match="strictly increasing"):
        chronological_split(t.iloc[::-1].reset_index(drop=True), SplitConfig(embargo=0))
    with pytest.raises(AtmError, match="datetimes"):
        chronological_split(np.arange(100), SplitConfig(embargo=0))


# ------------------------------------------------------------------------ walk-forward

@pytest.mark.parametrize("k", [1, 3, 5])
def test_walk_forward_folds(k):
    t = minutes(6000)
    folds = list(walk_forward(t, k, embargo=45))
    assert len(folds) == k
    tests = []
    prev_train = 0
    for train, test in folds:
        assert len(train) and len(test)
        assert train[-1] < test[0]
        assert not np.intersect1d(train, test).size
        assert gap_minutes(t, train, test) >= 45
        assert train[0] == 0 and len(train) > prev_train  # expanding window
        prev_train = len(train)
        tests.append(test)
    alltest = np.concatenate(tests)
    assert len(np.unique(alltest)) == len(alltest)  # disjoint test blocks
    assert alltest[-1] == len(t) - 1
    assert alltest[0] == round(len(t) / (k + 1))


def test_walk_forward_errors():
    with pytest.raises(ConfigError):
        list(walk_forward(minutes(100), 0))
    with pytest.raises(AtmError, match="fold 1/"):
        list(walk_forward(minutes(100), 2, embargo=200))
