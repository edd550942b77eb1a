"""Classic models on the shipped sample dataset, through the real CLI and the real eval harness."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atm.eval.classic.core import ClassicConfig, load_classic, read_items, read_klines, train_classic


@pytest.mark.parametrize("name", ["cnn", "lstm"])
def test_networks_train_a_few_epochs_on_the_sample(sample_dataset, tmp_path, name):
    out = train_classic(sample_dataset, ClassicConfig(model=name, epochs=3, hidden=16), root=tmp_path)
    rec = json.loads((out / "atm_classic.json").read_text())
    est = rec["estimator"]
    assert 1 <= est["epochs_run"] <= 3 and est["parameters"] > 1000
    assert est["history"][0]["val_loss"] > 0  # early stopping watched the validation tail
    assert rec["train"]["rows_with_missing_features"] > 0  # the indicators' warm-up, imputed and counted
    print(f"{name}: {est['epochs_run']} epochs in {rec['train_seconds']} s, validation {rec['validation']}")
    items = read_items(sample_dataset, "verify")
    P = load_classic(out).predict_proba(read_klines(sample_dataset), items["row"].to_numpy())
    assert P.shape == (len(items), 3) and np.allclose(P.sum(axis=1), 1.0) and np.isfinite(P).all()


def test_train_classic_cli_and_walk_forward(cli, sample_dataset, tmp_path):
    root = tmp_path / "classic"
    p = cli("eval", "train-classic", "--model", "logreg", "--data", str(sample_dataset), "--out", str(root))
    assert "artifact:" in p.stdout and "classic:logreg@" in p.stdout
    artifact = next(root.glob("logreg-*"))
    p2 = cli("eval", "train-classic", "--model", "classic:logreg", "--data", str(sample_dataset), "--out", str(root))
    assert "reusing" in p2.stdout
    wf = cli("eval", "train-classic", "--model", "logreg", "--data", str(sample_dataset), "--out", str(root),
             "--walk-forward", "2", "--set", "threshold=none")
    assert "| pooled |" in wf.stdout and "fold 2/2" in wf.stdout
    res = json.loads(next(root.glob("walk-forward-logreg-*-k2")).joinpath("walk_forward.json").read_text())
    assert res["pooled"]["test_items"] == sum(f["test_items"] for f in res["folds"])
    bad = cli("eval", "train-classic", "--model", "svm", "--data", str(sample_dataset), check=False)
    assert bad.returncode == 2 and "unknown classic model" in bad.stderr
    bad = cli("eval", "train-classic", "--model", "lgbm", "--data", str(sample_dataset), "--set", "epoch=3",
              check=False)
    assert bad.returncode == 2 and "did you mean 'epochs'" in bad.stderr
    assert artifact.is_dir()


def test_atm_eval_run_classic_beside_baselines(cli, sample_dataset, tmp_path):
    """The issue's "done when": metrics with CIs, a backtest table and equity curves in the report."""
    out = tmp_path / "run"
    env = {"ATM_CLASSIC_DIR": str(tmp_path / "classic")}
    p = cli("eval", "run", "--model", "classic:lgbm", "--model", "classic:logreg", "--model", "baseline:majority",
            "--data", str(sample_dataset), "--out", str(out), "--set", "metrics.n_boot=200", env=env)
    assert "classic:lgbm" in p.stdout and "verdict:" in p.stdout
    m = json.loads((out / "metrics.json").read_text())
    for spec in ("classic:lgbm", "classic:logreg", "baseline:majority"):
        r = m["models"][spec]
        assert r["complete"] and r["validity"]["rate"] == 1.0
        lo, hi = r["ci"]["balanced_accuracy"]
        assert lo <= r["balanced_accuracy"] <= hi
    assert m["models"]["classic:lgbm"]["kind"] == "classic" and "calibration" in m["models"]["classic:lgbm"]
    manifest = json.loads((out / "manifest.json").read_text())
    desc = manifest["models"]["classic:lgbm"]["describe"]
    assert desc["class_weight"]["mode"] == "balanced" and desc["artifact"]
    report = (out / "report.md").read_text()
    assert "| classic:lgbm |" in report.split("## Backtest")[1] and "| buy-and-hold |" in report
    assert (out / "report_files" / "equity.png").stat().st_size > 5000
    # the same run backtested again with another SELL meaning, from the CLI
    bt = cli("eval", "backtest", str(out), "--set", "sell_mode=flat", "--set", "slippage_bps=2")
    assert "| classic:logreg |" in bt.stdout and "SELL = flat" in bt.stdout and "2 bps" in bt.stdout
    flat = json.loads((out / "backtest.json").read_text())["results"]
    assert flat["classic:lgbm"]["short_share"] == 0.0 and flat["baseline:majority"]["total_return"] == 0.0
    assert (out / "equity.svg").exists()
    # the saved model is reused by path: identical answers
    out2 = tmp_path / "run2"
    cli("eval", "run", "--model", f"classic:lgbm@{desc['artifact']}", "--no-baselines", "--data",
        str(sample_dataset), "--out", str(out2), "--no-report", "--set", "metrics.n_boot=50", env=env)

    def answers(run):
        mf = json.loads((run / "manifest.json").read_text())
        spec = next(s for s in mf["models"] if s.startswith("classic:lgbm"))
        lines = (run / mf["models"][spec]["file"]).read_text().splitlines()
        return {json.loads(x)["id"]: json.loads(x)["probs"] for x in lines}

    assert answers(out) == answers(out2)
