"""Plain baselines every model is read against: ``baseline:random|majority|prior|momentum|persistence``.

All are fitted on the dataset's TRAIN split only and give class probabilities:
- ``random``: uniform over BUY/NOOP/SELL (seeded per item id, so resuming gives the same answers).
- ``majority``: the train split's most frequent label; probabilities = the train class prior.
- ``prior``: samples each answer from the train class prior (seeded per item id).
- ``momentum``: sign of the recent return close(t-1)/close(t-1-lookback)-1 -> BUY / SELL, NOOP inside
  +-band (defaults: lookback = label horizon, band = half the label threshold). Probabilities are
  P(label | momentum signal) estimated on train (Laplace-smoothed).
- ``persistence``: the most recent label that is already KNOWN at the open of minute t. For a label
  that looks ``h`` minutes ahead that is the label of minute t-h-1, not t-1; the lag is measured
  (``label_lag``) by perturbing every bar from t on and seeing which earlier labels change, so the
  baseline cannot look ahead whatever the label rule. Probabilities: P(label | that label) on train.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from atm.errors import AtmError
from atm.artifacts import DatasetDir
from atm.constants import ADVICES
from atm.eval.providers import Prediction, Provider

KINDS = ("random", "majority", "prior", "momentum", "persistence")


def _item_rng(seed: int, item_id: Any) -> np.random.Generator:
    h = int(hashlib.sha256(str(item_id).encode()).hexdigest()[:12], 16)
    return np.random.default_rng([int(seed), h])


def label_lag(df, cfg, probes: int = 3, seed: int = 0) -> int:
    """Minutes between t and the latest label known at the open of t, measured, not assumed.

    For several cut points c, every bar from c on is rescaled by a random factor; labels of rows
    s < c that change depend on bars not yet seen at the open of c. The lag is c - min(changed s) + 1
    (at least 1: the label of minute t itself is never known at its open).
    """
    from atm.market.labels import compute_labels

    base = np.asarray(compute_labels(df, cfg), dtype=object)
    n = len(df)
    rng = np.random.default_rng(seed)
    lag = 1
    cols = [c for c in ("open", "high", "low", "close") if c in df.columns]
    for frac in np.linspace(0.3, 0.7, probes):
        c = int(n * frac)
        if c < 2 or c >= n - 1:
            continue
        d2 = df.copy()
        factor = rng.uniform(0.5, 1.5, n - c)
        for col in cols:
            vals = d2[col].to_numpy(dtype=np.float64).copy()
            vals[c:] *= factor
            d2[col] = vals
        for col in ("volume", "quote_volume", "taker_buy_volume", "taker_buy_quote_volume"):
            if col in d2.columns:
                vals = d2[col].to_numpy(dtype=np.float64).copy()
                vals[c:] *= factor
                d2[col] = vals
        other = np.asarray(compute_labels(d2, cfg), dtype=object)
        changed = [s for s in range(c) if not _same(base[s], other[s])]
        if changed:
            lag = max(lag, c - min(changed) + 1)
    return lag


def _same(a: Any, b: Any) -> bool:
    na = a is None or (isinstance(a, float) and np.isnan(a))
    nb = b is None or (isinstance(b, float) and np.isnan(b))
    if na or nb:
        return na and nb
    return a == b


def _laplace(counts: np.ndarray) -> np.ndarray:
    c = counts.astype(np.float64) + 1.0
    return c / c.sum()


class BaselineProvider(Provider):
    """``baseline:KIND`` (see module docstring). Options: ``seed``, ``lookback``, ``band``."""

    supports_loglik = True  # probabilities come for free; mode does not change anything
    needs_fit = True

    def __init__(self, spec: str, arg: str, **options: Any):
        super().__init__(spec, arg, **options)
        kind = arg.split("@")[0]
        if kind not in KINDS:
            raise AtmError(f"unknown baseline {arg!r}; valid: " + ", ".join(f"baseline:{k}" for k in KINDS))
        self.kind = kind
        self.seed = int(options.get("seed", 0))
        self.prior = np.ones(len(ADVICES)) / len(ADVICES)
        self.fitted: dict[str, Any] = {}
        self._signal: dict[int, int] = {}  # row -> conditioning class (momentum / persistence)
        self._cond: np.ndarray | None = None  # (K+1, K): P(label | signal); row K = signal unknown

    # ------------------------------------------------------------------ fit on train
    def fit(self, dataset_dir: str, train_items: Sequence[dict]) -> None:
        labels = [it["label"] for it in train_items if it.get("label") in ADVICES]
        if not labels:
            raise AtmError(f"{dataset_dir}: the train split has no labelled items to fit baseline:{self.kind}")
        counts = np.array([labels.count(a) for a in ADVICES], dtype=np.float64)
        self.prior = counts / counts.sum()
        self.fitted = {"train_n": len(labels), "train_prior": dict(zip(ADVICES, self.prior.round(6).tolist())),
                       "majority": ADVICES[int(np.argmax(counts))]}
        if self.kind in ("momentum", "persistence"):
            self._fit_signal(Path(dataset_dir), train_items)

    def _fit_signal(self, dataset_dir: Path, train_items: Sequence[dict]) -> None:
        import pandas as pd

        from atm.market.labels import label_config_of

        ds = DatasetDir(dataset_dir)
        if not ds.klines_path.exists():
            raise AtmError(f"{dataset_dir}: klines.parquet missing; baseline:{self.kind} needs the klines")
        df = pd.read_parquet(ds.klines_path)
        lcfg = label_config_of(ds.card().label)
        horizon = int(lcfg.get("horizon", 10) or 10)
        threshold = float(lcfg.get("threshold", 0.002) or 0.002)
        if self.kind == "momentum":
            lookback = int(self.options.get("lookback", horizon))
            band = float(self.options.get("band", threshold / 2))
            close = df["close"].to_numpy(dtype=np.float64)
            n = len(close)
            sig = np.full(n, len(ADVICES), dtype=np.int64)  # unknown
            # row t: return over bars t-1-lookback .. t-1 (all closed before the open of t)
            t = np.arange(n)
            ok = t - 1 - lookback >= 0
            r = np.full(n, np.nan)
            r[ok] = close[t[ok] - 1] / close[t[ok] - 1 - lookback] - 1.0
            sig[ok & (r > band)] = 0
            sig[ok & (np.abs(r) <= band)] = 1
            sig[ok & (r < -band)] = 2
            self._sig_arr = sig
            self.fitted.update({"lookback": lookback, "band": band,
                                "rule": f"r = close(t-1)/close(t-1-{lookback}) - 1; BUY if r > {band:g}, "
                                        f"SELL if r < -{band:g}, else NOOP"})
        else:
            from atm.market.labels import LabelConfig, compute_labels

            cfg = LabelConfig(**lcfg) if lcfg else LabelConfig()
            labels = np.asarray(compute_labels(df, cfg), dtype=object)
            lag = int(self.options.get("lag") or label_lag(df, cfg))
            idx = {a: i for i, a in enumerate(ADVICES)}
            n = len(labels)
            sig = np.full(n, len(ADVICES), dtype=np.int64)
            for t in range(lag, n):
                sig[t] = idx.get(labels[t - lag], len(ADVICES))
            self._sig_arr = sig
            self.fitted.update({"lag": lag, "label_rule": cfg.model_dump() if hasattr(cfg, "model_dump") else lcfg,
                                "rule": f"advice(t) = label(t-{lag}), the latest label known at the open of t"})
        # P(label | signal) on train, Laplace-smoothed; unknown signal -> prior
        K = len(ADVICES)
        counts = np.zeros((K + 1, K))
        idx = {a: i for i, a in enumerate(ADVICES)}
        for it in train_items:
            if it.get("label") in idx:
                s = self._sig_arr[int(it["row"])]
                counts[s, idx[it["label"]]] += 1
        cond = np.vstack([_laplace(counts[s]) for s in range(K)] + [self.prior])
        self._cond = cond
        self.fitted["p_label_given_signal"] = {
            (ADVICES[s] if s < K else "unknown"): dict(zip(ADVICES, cond[s].round(4).tolist())) for s in range(K + 1)}

    # ------------------------------------------------------------------ predict
    def predict(self, items: Sequence[dict], mode: str = "generate") -> list[Prediction]:
        out = []
        K = len(ADVICES)
        for it in items:
            if self.kind == "random":
                probs = np.ones(K) / K
                a = ADVICES[int(_item_rng(self.seed, it["id"]).integers(0, K))]
            elif self.kind == "majority":
                probs = self.prior
                a = ADVICES[int(np.argmax(self.prior))]
            elif self.kind == "prior":
                probs = self.prior
                a = ADVICES[int(_item_rng(self.seed, it["id"]).choice(K, p=self.prior))]
            else:
                s = int(self._sig_arr[int(it["row"])])
                probs = self._cond[s]
                # the signal itself is the advice; unknown signal (start of data) -> NOOP
                a = ADVICES[s] if s < K else "NOOP"
            out.append(Prediction(id=str(it["id"]), raw=json.dumps({"advice": a}), advice=a,
                                  predicted_change=None,
                                  probs={c: float(p) for c, p in zip(ADVICES, probs)},
                                  valid=True, reason=None, latency=0.0))
        return out

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "seed": self.seed, **self.fitted}
