"""Classic models on datasets built by the real pipeline from synthetic klines with known structure.

A planted signal (the next minute's return depends on the last bar's volume, which the prompt's
window and the indicators both show) must be found by logreg and LightGBM; on a pure random walk
every model must stay at chance. Also: reproducibility, artifact reuse, the provider interface,
thresholds that never see the verify items, and walk-forward folds that keep their embargo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atm.errors import AtmError
from atm.eval import metrics as M
from atm.eval.classic import ClassicProvider
from atm.eval.classic.core import (ClassicConfig, fit_classic, load_classic, read_items, read_klines,
                                   train_classic, walk_forward_eval)
from atm.constants import ADVICES
from atm.eval.providers import get_provider

FAST = {"n_estimators": 150, "epochs": 3}  # keep CPU time short; the protocol is the same


def synth_klines(path, n: int, signal: float, seed: int) -> None:
    """Minute klines whose open-to-open return of bar t is ``signal * z(t-1) + noise``, z = the
    standardized log volume of bar t-1 (``signal=0``: a pure random walk, volume unrelated)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n)  # bar t's standardized log volume
    volume = 10.0 * np.exp(z)
    s = 0.001 * rng.standard_normal(n)  # s[t] = log(open(t+1) / open(t)): the move over bar t
    s[1:] += signal * z[:-1]  # ... driven by bar t-1's volume, known at the open of t
    opens = 100.0 * np.exp(np.concatenate([[0.0], np.cumsum(s[:-1])]))
    closes = opens * np.exp(s)  # close(t) = open(t+1)
    hi = np.maximum(opens, closes) * (1 + 0.0004 * rng.random(n))
    lo = np.minimum(opens, closes) * (1 - 0.0004 * rng.random(n))
    t = pd.date_range("2025-03-01", periods=n, freq="1min", tz="UTC")
    taker = volume * rng.uniform(0.3, 0.7, n)
    df = pd.DataFrame({
        "open_time": t, "open": opens, "high": hi, "low": lo, "close": closes, "volume": volume,
        "close_time": t + pd.Timedelta(milliseconds=59_999), "quote_volume": volume * closes,
        "count": rng.poisson(volume * 5).astype(np.int64) + 1, "taker_buy_volume": taker,
        "taker_buy_quote_volume": taker * closes})
    df.to_parquet(path, index=False)


ROOT = Path(__file__).resolve().parents[2]


def build(tmp, name: str, signal: float, n: int, seed: int):
    from atm.prompting.dataset import BuildConfig, build_dataset

    kp = tmp / f"{name}.parquet"
    synth_klines(kp, n, signal, seed)
    # fee-aware, 1-minute horizon: BUY if the next minute's return > 2*fee, SELL if < -2*fee
    return build_dataset(BuildConfig(klines=str(kp), out=str(tmp / name), template=str(ROOT / "prompts" / "seed.yaml"),
                                     encoder="seed-json", label="fee-aware", horizon=1, fee=0.0005,
                                     symbol="SYNUSDT"))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build(tmp_path_factory.mktemp("classic"), "planted", 0.0015, 6000, 1)


@pytest.fixture(scope="module")
def random_walk(tmp_path_factory):
    return build(tmp_path_factory.mktemp("classic"), "rw", 0.0, 6000, 2)


def verify_scores(path, model_dir, level=0.95):
    kl = read_klines(path)
    items = read_items(path, "verify")
    model = load_classic(model_dir)
    P = model.predict_proba(kl, items["row"].to_numpy())
    pred = model.advice(P, items["symbol"].tolist())
    y = M.encode_true(items["label"].tolist())
    res = M.classification(y, pred)
    res["ci"] = M.bootstrap_ci(y, pred, M.BootConfig(n_boot=500, level=level, horizon=1))
    res["majority"] = float(np.bincount(y, minlength=3).max() / len(y))
    return res, P


@pytest.mark.parametrize("name", ["logreg", "lgbm"])
def test_planted_signal_is_found(planted, tmp_path, name):
    out = train_classic(planted, ClassicConfig(model=name, **FAST), root=tmp_path)
    res, P = verify_scores(planted, out)
    assert np.allclose(P.sum(axis=1), 1.0)
    # chance: 1/3 balanced accuracy; always-majority accuracy res["majority"] (~0.4 here)
    assert res["ci"]["balanced_accuracy"][0] > 0.55, res
    assert res["accuracy"] > res["majority"] + 0.15, res
    rec = json.loads((out / "atm_classic.json").read_text())
    assert rec["class_weight"]["mode"] == "balanced" and set(rec["class_weight"]["weights"]) == set(ADVICES)
    assert "n / (k * n_c)" in rec["class_weight"]["statement"]
    assert rec["design"]["window"] == 10 and rec["design"]["columns"][1] == "prev_volumes"
    versions = rec["provenance"]["versions"]
    assert versions["scikit-learn"] and versions["lightgbm"] and rec["dataset"]["klines_sha256"]


@pytest.mark.parametrize("name", ["logreg", "lgbm", "cnn", "lstm"])
def test_random_walk_stays_at_chance(random_walk, tmp_path, name):
    out = train_classic(random_walk, ClassicConfig(model=name, **FAST), root=tmp_path)
    res, _ = verify_scores(random_walk, out, level=0.99)
    lo, hi = res["ci"]["balanced_accuracy"]
    assert lo <= 1 / 3 <= hi, (name, res["balanced_accuracy"], res["ci"])
    assert abs(res["balanced_accuracy"] - 1 / 3) < 0.06


@pytest.mark.parametrize("name", ["logreg", "lgbm", "lstm"])
def test_training_is_reproducible_and_artifacts_reload_identically(planted, tmp_path, name):
    kl = read_klines(planted)
    items = read_items(planted, "verify")
    rows = items["row"].to_numpy()
    a = train_classic(planted, ClassicConfig(model=name, **FAST), root=tmp_path / "a")
    b = train_classic(planted, ClassicConfig(model=name, **FAST), root=tmp_path / "b")
    assert a.name == b.name  # the hash covers config + data
    pa = load_classic(a).predict_proba(kl, rows)
    pb = load_classic(b).predict_proba(kl, rows)
    assert np.array_equal(pa, pb)  # trained twice from scratch: bit-identical
    # the in-memory model and its saved artifact agree exactly
    fitted = fit_classic(kl, read_items(planted, "train"), ClassicConfig(model=name, **FAST),
                         json.loads((planted / "dataset.json").read_text()))
    assert np.array_equal(fitted.predict_proba(kl, rows), pa)
    # a second train_classic call reuses the artifact instead of training
    mtime = (a / "atm_classic.json").stat().st_mtime_ns
    assert train_classic(planted, ClassicConfig(model=name, **FAST), root=tmp_path / "a") == a
    assert (a / "atm_classic.json").stat().st_mtime_ns == mtime
    # another seed is another artifact
    c = train_classic(planted, ClassicConfig(model=name, seed=1, **FAST), root=tmp_path / "a")
    assert c != a


def test_thresholds_come_from_the_validation_tail_never_verify(planted, tmp_path):
    cfg = ClassicConfig(model="logreg", threshold="mean_return")
    out = train_classic(planted, cfg, root=tmp_path / "one")
    rec = json.loads((out / "atm_classic.json").read_text())
    tr = rec["train"]
    # the validation tail is after the fitted part, separated by the embargo
    fit_end, val_start = pd.Timestamp(tr["fit_period"][1]), pd.Timestamp(tr["val_period"][0])
    assert (val_start - fit_end) >= pd.Timedelta(minutes=tr["embargo_minutes"] + 1)
    verify_first = read_items(planted, "verify")["open_time"].min()
    assert pd.Timestamp(tr["val_period"][1]) < verify_first
    assert rec["threshold_tuning"]["*"]["objective"] == "mean_return"
    assert set(rec["thresholds"]) == {"*", "SYNUSDT"}
    # scrambling the verify labels changes nothing in training
    vpath = planted / "items" / "data" / "verify-00000-of-00001.parquet"
    original = vpath.read_bytes()
    try:
        v = pd.read_parquet(vpath)
        v["label"] = np.random.default_rng(0).permutation(v["label"].to_numpy())
        v.to_parquet(vpath, index=False)
        again = train_classic(planted, cfg, root=tmp_path / "two", force=True)
        assert json.loads((again / "atm_classic.json").read_text())["thresholds"] == rec["thresholds"]
    finally:
        vpath.write_bytes(original)


def test_decision_threshold_rule():
    from atm.eval.classic.core import decide

    P = np.array([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.34, 0.33, 0.33], [0.1, 0.8, 0.1]])
    assert decide(P, None).tolist() == [0, 2, 0, 1]
    assert decide(P, 0.45).tolist() == [0, 2, 1, 1]  # a side only when confident enough, else NOOP
    assert decide(P, float("inf")).tolist() == [1, 1, 1, 1]


def test_provider_interface_and_artifact_reuse(planted, tmp_path, monkeypatch):
    monkeypatch.setenv("ATM_CLASSIC_DIR", str(tmp_path / "runs"))
    items = read_items(planted, "verify").head(300)
    batch = [{"id": str(r.id), "row": int(r.row), "open_time": str(r.open_time), "symbol": r.symbol}
             for r in items.itertuples()]
    prov = get_provider("classic:logreg", dataset_dir=str(planted))
    assert isinstance(prov, ClassicProvider) and prov.supports_loglik and prov.needs_fit
    prov.fit(str(planted), [])
    preds = prov.predict(batch, "loglik")
    assert [p.id for p in preds] == [b["id"] for b in batch]
    assert all(p.valid and p.advice in ADVICES and abs(sum(p.probs.values()) - 1) < 1e-9 for p in preds)
    assert json.loads(preds[0].raw)["advice"] == preds[0].advice
    desc = prov.describe()
    assert desc["class_weight"]["mode"] == "balanced" and desc["artifact"].startswith(str(tmp_path / "runs"))
    # classic:logreg@DIR loads the saved model and trains nothing: identical probabilities
    again = get_provider(f"classic:logreg@{desc['artifact']}")
    again.fit(str(planted), [])
    assert [p.probs for p in again.predict(batch)] == [p.probs for p in preds]
    with pytest.raises(AtmError, match="holds a classic:logreg model"):
        get_provider(f"classic:lgbm@{desc['artifact']}").fit(str(planted), [])
    with pytest.raises(AtmError, match="classic:lgbm, classic:cnn"):
        get_provider("classic:xgboost")
    with pytest.raises(AtmError, match="not a classic-model artifact"):
        get_provider(f"classic:lgbm@{tmp_path}").fit(str(planted), [])
    # asking about minutes the model was trained on is flagged, not silently scored
    train_batch = [{"id": str(r.id), "row": int(r.row), "open_time": str(r.open_time), "symbol": r.symbol}
                   for r in read_items(planted, "train").head(50).itertuples()]
    again.predict(train_batch)
    assert again.mode_note and "inside" in again.mode_note and "training period" in again.mode_note
    other = get_provider(f"classic:logreg@{desc['artifact']}")
    other.fit(str(planted), [])
    other.predict([{**b, "symbol": "OTHERUSDT"} for b in train_batch])  # another pair at those times: no leak
    assert other.mode_note is None


def test_walk_forward_folds_keep_the_embargo(planted, tmp_path):
    res = walk_forward_eval(planted, ClassicConfig(model="logreg"), 3, embargo=120, n_boot=200,
                            out=tmp_path / "wf")
    folds = res["folds"]
    assert len(folds) == 3
    tests = []
    for f in folds:
        train_end = pd.Timestamp(f["train_period"][1])
        test_start, test_end = (pd.Timestamp(x) for x in f["test_period"])
        assert test_start - train_end >= pd.Timedelta(minutes=121)  # embargo kept
        assert f["gap_minutes"] >= 120
        # the fold's own threshold-validation tail is embargoed inside its train part
        assert pd.Timestamp(f["val_period"][0]) - pd.Timestamp(f["fit_period"][1]) >= pd.Timedelta(minutes=181)
        assert pd.Timestamp(f["val_period"][1]) <= train_end
        tests.append((test_start, test_end))
        assert f["ci"]["balanced_accuracy"][0] is not None
    for (s1, e1), (s2, e2) in zip(tests, tests[1:]):
        assert e1 < s2  # test blocks disjoint and in order
    for f, (s, _) in zip(folds[1:], tests[1:]):
        assert pd.Timestamp(f["train_period"][0]) <= tests[0][0]  # expanding: each fold starts at the beginning
    assert res["pooled"]["test_items"] == sum(f["test_items"] for f in folds)
    assert res["pooled"]["balanced_accuracy"] > 0.55  # the planted signal holds in every period
    assert "ece" in res["pooled"]["calibration"]
    md = (tmp_path / "wf" / "walk_forward.md").read_text()
    assert md.count("\n| ") == 5 and "pooled" in md
    assert json.loads((tmp_path / "wf" / "walk_forward.json").read_text())["k"] == 3


def test_design_uses_only_bars_before_t(planted):
    """Perturb every bar from minute c on: the window and indicators of rows <= c must not change."""
    from atm.eval.classic.design import build_design, compute_indicators, window_spec_from_meta

    kl = read_klines(planted)
    spec = window_spec_from_meta(json.loads((planted / "dataset.json").read_text()))
    c = 3000
    rows = np.arange(200, c + 1)
    base = build_design(kl, rows, spec, compute_indicators(kl, {}))
    moved = kl.copy()
    factor = np.random.default_rng(0).uniform(0.5, 1.5, len(kl) - c)
    for col in ("open", "high", "low", "close", "volume", "quote_volume", "taker_buy_volume",
                "taker_buy_quote_volume"):
        vals = moved[col].to_numpy(dtype=np.float64).copy()
        vals[c:] *= factor
        moved[col] = vals
    moved["count"] = moved["count"].to_numpy() * np.where(np.arange(len(kl)) >= c, 3, 1)
    after = build_design(moved, rows, spec, compute_indicators(moved, {}))
    assert np.array_equal(base.table, after.table, equal_nan=True)
    # and the first perturbed row does change (the check can fail)
    nxt = build_design(kl, np.array([c + 1]), spec, compute_indicators(kl, {}))
    nxt2 = build_design(moved, np.array([c + 1]), spec, compute_indicators(moved, {}))
    assert not np.array_equal(nxt.table, nxt2.table, equal_nan=True)
