"""Metrics on hand-computed cases, and the block bootstrap's coverage on autocorrelated data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from atm.eval import metrics as M

B, N, S, INV = 0, 1, 2, 3


def test_hand_computed_classification():
    # true: B B N N N S ; pred: B N N N INVALID S
    t = np.array([B, B, N, N, N, S])
    p = np.array([B, N, N, N, INV, S])
    r = M.classification(t, p)
    assert r["accuracy"] == pytest.approx(4 / 6)
    # recalls: B 1/2, N 2/3, S 1 -> mean
    assert r["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    # F1: B = 2*1/(2+1), N = 2*2/(3+3), S = 1
    assert r["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert r["per_class"]["NOOP"]["precision"] == pytest.approx(2 / 3)
    assert r["per_class"]["BUY"]["recall"] == pytest.approx(1 / 2)
    assert r["confusion"]["cols"] == ["BUY", "NOOP", "SELL", "INVALID"]
    assert r["confusion"]["matrix"] == [[1, 1, 0, 0], [0, 2, 0, 1], [0, 0, 1, 0]]


def test_invalid_counts_as_wrong_never_excluded():
    t = np.array([N, N, N, N])
    all_invalid = M.classification(t, np.array([INV] * 4))
    assert all_invalid["accuracy"] == 0.0 and all_invalid["balanced_accuracy"] == 0.0
    half = M.classification(t, np.array([N, N, INV, INV]))
    assert half["accuracy"] == 0.5  # not 1.0, as it would be if invalid answers were dropped


def test_matches_sklearn_on_random_labels():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    t = rng.integers(0, 3, 500)
    p = rng.integers(0, 4, 500)
    r = M.classification(t, p)
    names = np.array(["BUY", "NOOP", "SELL", "INVALID"])
    assert r["accuracy"] == pytest.approx(sk.accuracy_score(names[t], names[p]))
    assert r["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(names[t], names[p]))
    assert r["macro_f1"] == pytest.approx(sk.f1_score(names[t], names[p], labels=["BUY", "NOOP", "SELL"],
                                                      average="macro", zero_division=0))


def test_encode_pred_unknown_and_invalid():
    p = M.encode_pred(["BUY", "buy", None, "SELL", "NOOP"], [True, True, True, False, True])
    assert p.tolist() == [B, INV, INV, INV, N]
    with pytest.raises(ValueError, match="label"):
        M.encode_true(["BUY", "HOLD"])


def test_mcnemar_exact():
    a = np.array([1] * 8 + [0] * 2 + [1] * 5, dtype=bool)
    b = np.array([0] * 8 + [1] * 2 + [1] * 5, dtype=bool)
    r = M.mcnemar(a, b)
    assert (r["a_only"], r["b_only"]) == (8, 2)
    assert r["p_value"] == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert M.mcnemar(a, a)["p_value"] == 1.0


def test_calibration_perfect_and_overconfident():
    t = np.array([B] * 50 + [N] * 50)
    perfect = np.tile([0.5, 0.5, 0.0], (100, 1))
    c = M.calibration(t, perfect)
    assert c["ece"] == pytest.approx(0.0, abs=1e-12)
    assert c["brier"] == pytest.approx(0.5)
    over = np.tile([0.99, 0.01, 0.0], (100, 1))
    c2 = M.calibration(t, over)
    assert c2["ece"] == pytest.approx(0.49)
    assert c2["log_loss"] > c["log_loss"]


def test_change_metrics_coverage():
    r = M.change_metrics([1.0, -2.0, None, 0.5], [2.0, -1.0, 3.0, -0.5])
    assert r["n"] == 3 and r["coverage"] == 0.75
    assert r["mae"] == pytest.approx((1 + 1 + 1) / 3)
    assert r["direction_accuracy"] == pytest.approx(2 / 3)


def test_validity_reasons():
    v = M.validity([True, False, False, False], [None, "truncated: x", "truncated: y", None])
    assert v["valid"] == 1 and v["reasons"] == {"truncated": 2, "invalid (no reason given)": 1}


def test_block_length_rule():
    assert M.block_length(2880, horizon=10) == 54
    assert M.block_length(100, horizon=30) == 25  # capped at n/4
    assert M.block_length(43200, horizon=1) == 208


def _ar_hits(rng, n, phi):
    z = np.empty(n)
    z[0] = rng.standard_normal()
    e = rng.standard_normal(n) * math.sqrt(1 - phi ** 2)
    for i in range(1, n):
        z[i] = phi * z[i - 1] + e[i]
    return z > 0  # P = 0.5, strongly autocorrelated


def test_block_bootstrap_covers_truth_on_ar_series():
    """95% block-bootstrap CIs cover the true accuracy (0.5) at roughly the nominal rate on AR(1)
    data, where the i.i.d. bootstrap (block 1) is far too narrow."""
    rng = np.random.default_rng(0)
    reps, n = 150, 600
    cover_block = cover_iid = 0
    for r in range(reps):
        hit = _ar_hits(rng, n, 0.9)
        t = np.where(hit, B, S)
        p = np.full(n, B)
        ci = M.bootstrap_ci(t, p, M.BootConfig(n_boot=300, seed=r, horizon=1))["accuracy"]
        cover_block += ci[0] <= 0.5 <= ci[1]
        ci1 = M.bootstrap_ci(t, p, M.BootConfig(n_boot=300, seed=r, block=1))["accuracy"]
        cover_iid += ci1[0] <= 0.5 <= ci1[1]
    assert 0.85 <= cover_block / reps <= 0.995, cover_block / reps
    assert cover_iid / reps < 0.7, cover_iid / reps


def test_paired_bootstrap_detects_real_difference_only():
    rng = np.random.default_rng(3)
    n = 2000
    t = rng.integers(0, 3, n)
    good = np.where(rng.random(n) < 0.7, t, rng.integers(0, 3, n))
    bad = rng.integers(0, 3, n)
    cfg = M.BootConfig(n_boot=500, seed=0, horizon=10)
    d = M.paired_bootstrap(t, good, bad, cfg)
    assert d["ci"][0] > 0 and d["p_not_better"] == 0.0
    same = M.paired_bootstrap(t, bad, bad, cfg)
    assert same["diff"] == 0.0 and same["p_not_better"] == 1.0


def _two_minority(n: int = 400) -> np.ndarray:
    """A quiet stretch: all NOOP but one BUY minute and one SELL minute (2 minority minutes)."""
    t = np.full(n, N)
    t[57], t[301] = B, S
    return t


def test_constant_answer_ci_is_its_exact_value_on_a_one_sided_set():
    """Resamples that lack BUY or SELL are drawn again: balanced accuracy over the classes a
    replicate happens to hold would give always-NOOP 1.0 there (the interval read [0.333, 1.000])."""
    t = _two_minority()
    const = np.full(len(t), N)
    ci = M.bootstrap_ci(t, const, M.BootConfig(n_boot=500, seed=1, horizon=10))
    assert ci["balanced_accuracy"] == [pytest.approx(1 / 3, abs=1e-12)] * 2
    assert ci["redrawn"] > 0  # most blocks hold neither minority minute
    # a model that finds the two minutes: its interval never comes from resamples without them
    hit = t.copy()
    hit[[10, 20, 30]] = B  # three false BUYs
    ci_hit = M.bootstrap_ci(t, hit, M.BootConfig(n_boot=500, seed=1, horizon=10))["balanced_accuracy"]
    assert 0.99 < ci_hit[0] <= ci_hit[1] <= 1.0  # recall 1 on every class in every replicate, less NOOP's 3 misses
    d = M.paired_bootstrap(t, const, const, M.BootConfig(n_boot=300, seed=0, horizon=10))
    assert d["ci"] == [0.0, 0.0]
    d = M.paired_bootstrap(t, hit, const, M.BootConfig(n_boot=300, seed=0, horizon=10))
    assert d["ci"][0] > 0.6 and d["redrawn"] > 0


def test_a_set_with_one_class_is_not_conditioned():
    t = np.full(50, N)
    ci = M.bootstrap_ci(t, np.full(50, N), M.BootConfig(n_boot=200, seed=0))
    assert ci["balanced_accuracy"] == [1.0, 1.0] and ci["redrawn"] == 0
