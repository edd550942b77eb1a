"""Metrics for advice predictions, with uncertainty that respects autocorrelated minutes.

Conventions (stated in every report):
- An invalid answer (bad JSON, wrong enum, request that failed after its retries) counts as WRONG.
  It is never excluded: it sits in the confusion matrix's ``INVALID`` column, lowers accuracy and
  recall, and is listed with its reason under "validity".
- Balanced accuracy (mean recall over the true classes present) is the primary metric: raw accuracy
  rewards always answering the majority class (the original experiment's always-NOOP scored 86.9%).
- Confidence intervals come from a circular moving-block bootstrap (see ``block_length``): labels of
  neighbouring minutes share most of their future window, so an i.i.d. bootstrap would be too narrow.
- Every replicate holds every class the full set holds (replicates that lack one are drawn again):
  balanced accuracy over the classes a replicate happens to contain would give a constant answer
  1.0 on a resample without BUY or SELL minutes, so on small or one-sided sets the interval of
  always-NOOP read [0.333, 1.000]. Conditioned this way, a constant answer's interval is its exact
  value (1/3 with three classes present), and the share of redrawn replicates is reported.
- Paired comparisons resample the SAME blocks for both models (paired block bootstrap of the
  difference); McNemar's test is given too but assumes independent items, so the verdict uses the
  bootstrap.

Every statistic here is a function of column sums of per-item indicator vectors (true class,
predicted class, hit), so one bootstrap replicate is a sum of a few block sums: 1,000 replicates of
43,200 minutes take milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from atm.constants import ADVICES

CLASSES = ADVICES
INVALID = "INVALID"
K = len(CLASSES)
# indicator columns: true_c (0..K-1), pred_c (K..2K-1), tp_c (2K..3K-1), ones (3K)
_COLS = 3 * K + 1


def encode_true(labels: Sequence[Any]) -> np.ndarray:
    idx = {c: i for i, c in enumerate(CLASSES)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, lab in enumerate(labels):
        if lab not in idx:
            raise ValueError(f"item {i}: label {lab!r} is not one of {CLASSES}")
        out[i] = idx[lab]
    return out


def encode_pred(advice: Sequence[Any], valid: Sequence[bool] | None = None) -> np.ndarray:
    """Class index per prediction; invalid / missing / unknown advice -> K (the INVALID column)."""
    idx = {c: i for i, c in enumerate(CLASSES)}
    out = np.full(len(advice), K, dtype=np.int64)
    for i, a in enumerate(advice):
        if (valid is None or valid[i]) and a in idx:
            out[i] = idx[a]
    return out


def indicators(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-item indicator matrix (n, 3K+1) from which every classification metric is computed."""
    n = len(t)
    x = np.zeros((n, _COLS), dtype=np.float64)
    rows = np.arange(n)
    x[rows, t] = 1.0
    ok = p < K
    x[rows[ok], K + p[ok]] = 1.0
    hit = ok & (p == t)
    x[rows[hit], 2 * K + t[hit]] = 1.0
    x[:, 3 * K] = 1.0
    return x


def _from_sums(s: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics from column sums; ``s`` is (..., 3K+1). NaN where undefined (no such class)."""
    true = s[..., 0:K]
    pred = s[..., K:2 * K]
    tp = s[..., 2 * K:3 * K]
    n = s[..., 3 * K]
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(true > 0, tp / np.where(true > 0, true, 1), np.nan)
        precision = np.where(pred > 0, tp / np.where(pred > 0, pred, 1), np.nan)
        denom = true + pred
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)
        acc = tp.sum(axis=-1) / n
        bal = _nanmean(recall)
        macro_f1 = _nanmean(f1)
    return {"accuracy": acc, "balanced_accuracy": bal, "macro_f1": macro_f1,
            "recall": recall, "precision": precision, "f1": f1}


def _nanmean(a: np.ndarray) -> np.ndarray:
    cnt = np.sum(~np.isnan(a), axis=-1)
    tot = np.nansum(a, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def confusion_matrix(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Rows: true BUY/NOOP/SELL; columns: predicted BUY/NOOP/SELL/INVALID."""
    m = np.zeros((K, K + 1), dtype=np.int64)
    np.add.at(m, (t, p), 1)
    return m


def classification(t: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Point estimates: accuracy, balanced accuracy, macro-F1, per-class P/R/F1, confusion."""
    m = _from_sums(indicators(t, p).sum(axis=0))
    per_class = {}
    for i, c in enumerate(CLASSES):
        per_class[c] = {"precision": _f(m["precision"][i]), "recall": _f(m["recall"][i]),
                        "f1": _f(m["f1"][i]), "support": int(np.sum(t == i)),
                        "predicted": int(np.sum(p == i))}
    return {"accuracy": _f(m["accuracy"]), "balanced_accuracy": _f(m["balanced_accuracy"]),
            "macro_f1": _f(m["macro_f1"]), "per_class": per_class,
            "confusion": {"rows": list(CLASSES), "cols": [*CLASSES, INVALID],
                          "matrix": confusion_matrix(t, p).tolist()}}


def _f(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


# ---------------------------------------------------------------- block bootstrap
def block_length(n: int, horizon: int = 1) -> int:
    """Block length for the moving-block bootstrap: max(label horizon, ceil(sqrt(n))), at most n/4.

    Why: a label looks ``horizon`` minutes ahead, so items closer than the horizon share most of
    their future window and are strongly dependent: a block shorter than the horizon would cut that
    dependence and give too-narrow intervals. Beyond it, minute returns carry volatility regimes
    lasting hours; sqrt(n) (about 54 minutes for a 2,880-minute verify split, 208 for a 30-day
    month) grows with the sample so longer-range dependence is kept, while still leaving
    sqrt(n) blocks to resample. The n/4 cap keeps at least 4 blocks on tiny sets.
    """
    if n <= 1:
        return 1
    b = max(int(horizon), int(math.ceil(math.sqrt(n))))
    return int(max(1, min(b, n // 4 if n >= 4 else 1)))


def _block_sums(x: np.ndarray, L: int) -> np.ndarray:
    """Circular block sums: row j = sum of x[j .. j+L-1] (wrapping)."""
    n = x.shape[0]
    ext = np.concatenate([x, x[:L]], axis=0)
    c = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(ext, axis=0)], axis=0)
    return c[L:L + n] - c[:n]


def _replicate_sums(xs: list[np.ndarray], L: int, n_boot: int, seed: int,
                    keep_cols: slice | None = None) -> tuple[list[np.ndarray], int]:
    """Circular moving-block bootstrap replicates of column sums, the same blocks for every x.

    ``keep_cols``: columns of ``xs[0]`` (the true-class indicators) that are non-zero in the full
    sum must be non-zero in every replicate; a replicate that lacks one is drawn again (the
    bootstrap conditioned on the class set). Returns the replicates and how many were redrawn."""
    n = xs[0].shape[0]
    k = int(math.ceil(n / L))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n, size=(n_boot, k))
    sums = [_block_sums(x, L) for x in xs]
    redrawn = 0
    if keep_cols is not None:
        need = xs[0][:, keep_cols].sum(axis=0) > 0
        covers = sums[0][:, keep_cols][:, need] > 0  # (n, classes needed): block j holds class c
        for _ in range(10_000):
            bad = ~covers[starts].any(axis=1).all(axis=1)
            if not bad.any():
                break
            redrawn += int(bad.sum())
            starts[bad] = rng.integers(0, n, size=(int(bad.sum()), k))
        else:  # unreachable in practice: every needed class lies in at least L of the n blocks
            raise RuntimeError("block bootstrap: could not draw replicates holding every class")
    return [bs[starts].sum(axis=1) for bs in sums], redrawn  # each (n_boot, cols)


@dataclass
class BootConfig:
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    block: int | None = None  # None: block_length(n, horizon)
    horizon: int = 1


def _ci(a: np.ndarray, level: float) -> list[float | None]:
    a = a[~np.isnan(a)]
    if a.size == 0:
        return [None, None]
    lo, hi = np.percentile(a, [50 * (1 - level), 100 - 50 * (1 - level)])
    return [float(lo), float(hi)]


def bootstrap_ci(t: np.ndarray, p: np.ndarray, cfg: BootConfig = BootConfig()) -> dict[str, Any]:
    """Block-bootstrap CIs of accuracy, balanced accuracy and macro-F1."""
    n = len(t)
    L = cfg.block or block_length(n, cfg.horizon)
    if n < 2:
        return {"block": L, "n_boot": 0, "accuracy": [None, None], "balanced_accuracy": [None, None],
                "macro_f1": [None, None]}
    (s,), redrawn = _replicate_sums([indicators(t, p)], L, cfg.n_boot, cfg.seed, keep_cols=slice(0, K))
    m = _from_sums(s)
    return {"block": L, "n_boot": cfg.n_boot, "level": cfg.level, "redrawn": redrawn,
            **{k: _ci(m[k], cfg.level) for k in ("accuracy", "balanced_accuracy", "macro_f1")}}


def mean_ci(values: np.ndarray, cfg: BootConfig = BootConfig()) -> dict[str, Any]:
    """Block-bootstrap CI of a mean (e.g. a per-item reward or a 0/1 hit series)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    L = cfg.block or block_length(n, cfg.horizon)
    if n < 2:
        return {"mean": float(v.mean()) if n else None, "ci": [None, None], "block": L}
    x = np.stack([v, np.ones(n)], axis=1)
    (s,), _ = _replicate_sums([x], L, cfg.n_boot, cfg.seed)
    return {"mean": float(v.mean()), "ci": _ci(s[:, 0] / s[:, 1], cfg.level), "block": L}


def paired_bootstrap(t: np.ndarray, p_a: np.ndarray, p_b: np.ndarray,
                     cfg: BootConfig = BootConfig(), metric: str = "balanced_accuracy") -> dict[str, Any]:
    """Paired block bootstrap of metric(a) - metric(b) on the same items and the same blocks.

    ``p_better`` is the share of replicates where a is NOT better (a one-sided bootstrap p-value for
    "a beats b"); the verdict calls a better only when the whole CI of the difference is above 0.
    """
    n = len(t)
    L = cfg.block or block_length(n, cfg.horizon)
    point = float(_from_sums(indicators(t, p_a).sum(0))[metric]) - float(
        _from_sums(indicators(t, p_b).sum(0))[metric])
    if n < 2:
        return {"metric": metric, "diff": point, "ci": [None, None], "p_not_better": None, "block": L}
    (sa, sb), redrawn = _replicate_sums([indicators(t, p_a), indicators(t, p_b)], L, cfg.n_boot, cfg.seed,
                                        keep_cols=slice(0, K))
    d = _from_sums(sa)[metric] - _from_sums(sb)[metric]
    d = d[~np.isnan(d)]
    return {"metric": metric, "diff": point, "ci": _ci(d, cfg.level),
            "p_not_better": float(np.mean(d <= 0)) if d.size else None, "block": L,
            "n_boot": cfg.n_boot, "redrawn": redrawn}


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """McNemar's test on paired correctness (exact binomial; assumes independent items).

    b = a right & b wrong, c = a wrong & b right; two-sided p = P(Bin(b+c, 1/2) as extreme).
    """
    a = np.asarray(correct_a, dtype=bool)
    bb = np.asarray(correct_b, dtype=bool)
    b = int(np.sum(a & ~bb))
    c = int(np.sum(~a & bb))
    return {"a_only": b, "b_only": c, "p_value": _binom_two_sided(min(b, c), b + c)}


def _binom_two_sided(k: int, n: int) -> float:
    if n == 0:
        return 1.0
    if n > 5000:  # normal approximation with continuity correction
        z = (abs(n - 2 * k) - 1) / math.sqrt(n)
        return float(min(1.0, math.erfc(max(z, 0) / math.sqrt(2))))
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(0, k + 1)]
    m = max(logs)
    tail = math.exp(m) * sum(math.exp(v - m) for v in logs)
    return float(min(1.0, 2 * tail))


# ---------------------------------------------------------------- calibration
def calibration(t: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Top-label reliability bins, ECE, multi-class Brier score and log loss.

    ``probs`` is (n, K) rows summing to 1 for the items that have probabilities.
    """
    probs = np.asarray(probs, dtype=np.float64)
    n = len(t)
    if n == 0:
        return {"n": 0}
    conf = probs.max(axis=1)
    pred = probs.argmax(axis=1)
    hit = (pred == t).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    ece = 0.0
    for b in range(bins):
        sel = which == b
        cnt = int(sel.sum())
        if cnt:
            acc_b, conf_b = float(hit[sel].mean()), float(conf[sel].mean())
            ece += cnt / n * abs(acc_b - conf_b)
        else:
            acc_b = conf_b = None
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": cnt,
                     "accuracy": acc_b, "confidence": conf_b})
    onehot = np.eye(K)[t]
    brier = float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    logloss = float(-np.mean(np.log(np.clip(probs[np.arange(n), t], 1e-12, 1.0))))
    return {"n": n, "ece": float(ece), "brier": brier, "log_loss": logloss, "bins": rows}


# ---------------------------------------------------------------- predicted change
def change_metrics(pred_change: Sequence[float | None], true_change: Sequence[float | None]) -> dict:
    """MAE and direction accuracy of the predicted change over items where both exist.

    Coverage is reported: items with no (valid) predicted change are not silently scored as 0.
    """
    pc = np.array([np.nan if v is None else float(v) for v in pred_change], dtype=np.float64)
    tc = np.array([np.nan if v is None else float(v) for v in true_change], dtype=np.float64)
    both = ~np.isnan(pc) & ~np.isnan(tc)
    n = int(both.sum())
    if n == 0:
        return {"n": 0, "coverage": 0.0, "mae": None, "direction_accuracy": None}
    err = np.abs(pc[both] - tc[both])
    nz = both & (tc != 0)
    dir_acc = float(np.mean(np.sign(pc[nz]) == np.sign(tc[nz]))) if nz.any() else None
    return {"n": n, "coverage": n / len(pc), "mae": float(err.mean()),
            "direction_accuracy": dir_acc, "direction_n": int(nz.sum())}


def validity(valid: Sequence[bool], reasons: Sequence[str | None]) -> dict[str, Any]:
    """Share of valid answers and a count per reason (reasons are grouped by their first clause)."""
    n = len(valid)
    counts: dict[str, int] = {}
    for ok, r in zip(valid, reasons):
        if not ok:
            key = (r or "invalid (no reason given)").split(":")[0][:80]
            counts[key] = counts.get(key, 0) + 1
    nv = int(sum(bool(v) for v in valid))
    return {"n": n, "valid": nv, "rate": nv / n if n else None,
            "reasons": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}
