"""Backtest accounting checked by hand on small cases, against a plain loop, and on real files."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from atm.errors import DataError
from atm.eval.backtest import (BUY_AND_HOLD, BacktestConfig, _simulate_loop, backtest, backtest_many,
                               load_predictions, plot_equity, positions_from_signals, simulate,
                               summary_table)


def klines_from_opens(opens, start="2025-08-01") -> pd.DataFrame:
    opens = np.asarray(opens, dtype=np.float64)
    t = pd.date_range(start, periods=len(opens), freq="1min", tz="UTC")
    return pd.DataFrame({"open_time": t, "open": opens, "high": opens * 1.001, "low": opens * 0.999,
                         "close": opens, "volume": 1.0, "count": 1})


def preds(kl: pd.DataFrame, advice: list[str | None]) -> pd.DataFrame:
    return pd.DataFrame({"open_time": kl["open_time"].iloc[:len(advice)].to_numpy(), "advice": advice})


PRICES = [100.0, 110.0, 121.0, 110.0, 99.0, 99.0, 108.9]


def test_always_flat_is_exactly_zero():
    kl = klines_from_opens(100 * np.cumprod(1 + np.random.default_rng(0).normal(0, 1e-3, 500)))
    for advice in ("NOOP", None):
        res = backtest(preds(kl, [advice] * 490), kl, BacktestConfig(fee=0.001, slippage_bps=3))
        assert res.metrics["total_return"] == 0.0
        assert (res.equity.to_numpy() == 1.0).all()
        assert res.metrics["turnover"] == 0.0 and res.metrics["n_trades"] == 0
        assert res.metrics["sharpe"] == 0.0 and res.metrics["max_drawdown"] == 0.0
        assert res.metrics["exposure"] == 0.0
    # SELL in flat mode means "stay out": also exactly zero
    res = backtest(preds(kl, ["SELL"] * 490), kl, BacktestConfig(sell_mode="flat"))
    assert res.metrics["total_return"] == 0.0


def test_lone_buy_hand_computed_with_fee_per_side():
    kl = klines_from_opens(PRICES)
    f = 0.01
    cfg = BacktestConfig(fee=f, horizon=2)
    res = backtest(preds(kl, ["BUY", "NOOP"]), kl, cfg)  # period: rows 0..3 (last + horizon)
    assert res.position.tolist() == [1.0, 1.0, 0.0]
    # entry at 100 paying 1%, marked at 110 and 121; the exit at open(2)=121 pays 1% in bar 2
    expected = [(1 - f) * 1.10, (1 - f) * 1.21, (1 - f) * 1.21 * (1 - f)]
    assert res.equity.to_numpy() == pytest.approx(expected, rel=1e-12)
    assert res.metrics["total_return"] == pytest.approx((1 - f) ** 2 * 1.21 - 1, rel=1e-12)
    assert res.metrics["turnover"] == 2.0  # in and out
    assert res.metrics["n_trades"] == 1 and res.metrics["hit_rate"] == 1.0
    # buy-and-hold over the same 3 bars: 100 -> 110 (row 3), in and out charged
    assert res.metrics["buy_and_hold_return"] == pytest.approx((1 - f) ** 2 * 1.10 - 1, rel=1e-12)


def test_fees_on_each_position_change_short_mode():
    kl = klines_from_opens(PRICES)
    f, slip = 0.001, 5.0  # 0.1% + 5 bps = 0.15% per unit traded
    c = f + slip / 1e4
    cfg = BacktestConfig(fee=f, slippage_bps=slip, hold="until-next-signal", horizon=1)
    # BUY at 0 (trade 1 unit), SELL at 2 (flip: 2 units), BUY at 4 (flip: 2 units), close at end (1 unit)
    res = backtest(preds(kl, ["BUY", "NOOP", "SELL", "NOOP", "BUY", "NOOP"]), kl, cfg)
    assert res.position.tolist() == [1, 1, -1, -1, 1, 1]
    assert res.metrics["turnover"] == 6.0
    long1 = (1 - c) * (121 / 100)
    short = long1 * (1 - 2 * c) * (1 - (99 / 121 - 1))  # static short from 121 to 99
    long2 = short * (1 - 2 * c) * (108.9 / 99) * (1 - c)
    assert res.equity.iloc[-1] == pytest.approx(long2, rel=1e-12)
    assert res.metrics["n_trades"] == 3 and res.metrics["hit_rate"] == 1.0
    # a zero-cost run of the same signals: only the price moves remain
    free = backtest(preds(kl, ["BUY", "NOOP", "SELL", "NOOP", "BUY", "NOOP"]), kl,
                    cfg.model_copy(update={"fee": 0.0, "slippage_bps": 0.0}))
    assert free.equity.iloc[-1] == pytest.approx(1.21 * (1 + 22 / 121) * 1.1, rel=1e-12)


def test_flat_mode_sells_to_cash():
    kl = klines_from_opens(PRICES)
    c = 0.001
    cfg = BacktestConfig(sell_mode="flat", hold="until-next-signal", horizon=1)
    res = backtest(preds(kl, ["BUY", "NOOP", "SELL", "NOOP", "BUY", "NOOP"]), kl, cfg)
    assert res.position.tolist() == [1, 1, 0, 0, 1, 1]
    assert res.metrics["turnover"] == 4.0
    expected = (1 - c) * 1.21 * (1 - c) * (1 - c) * 1.1 * (1 - c)
    assert res.equity.iloc[-1] == pytest.approx(expected, rel=1e-12)
    assert res.metrics["short_share"] == 0.0


def test_horizon_expiry_and_renewal():
    cfg = BacktestConfig(horizon=3)
    sig = np.array([1, np.nan, np.nan, np.nan, np.nan, -1, np.nan, 1, np.nan, np.nan, np.nan, np.nan])
    assert positions_from_signals(sig, cfg).tolist() == [1, 1, 1, 0, 0, -1, -1, 1, 1, 1, 0, 0]
    flat = cfg.model_copy(update={"sell_mode": "flat"})
    assert positions_from_signals(sig, flat).tolist() == [1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    until = cfg.model_copy(update={"hold": "until-next-signal"})
    assert positions_from_signals(sig, until).tolist() == [1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1, 1]
    assert positions_from_signals(np.full(4, np.nan), cfg).tolist() == [0, 0, 0, 0]


def test_vectorized_equals_loop_reference():
    rng = np.random.default_rng(1)
    prices = 100 * np.cumprod(1 + rng.normal(0, 2e-3, 3001))
    pos = rng.choice([-1.0, 0.0, 1.0], size=3000, p=[0.2, 0.5, 0.3])
    pos = np.repeat(pos[::10], 10)  # runs of 10 bars
    for close in (True, False):
        vec = simulate(pos, prices, 0.0013, close)["equity"]
        ref = _simulate_loop(pos, prices, 0.0013, close)
        assert np.allclose(vec, ref, rtol=1e-11, atol=0)


def test_lone_trade_matches_realized_returns():
    labels = pytest.importorskip("atm.market.labels")
    rng = np.random.default_rng(2)
    kl = klines_from_opens(100 * np.cumprod(1 + rng.normal(0, 1e-3, 60)))
    h, f = 7, 0.001
    rr = labels.realized_returns(kl, h, fee=f)
    for advice in ("BUY", "SELL"):
        res = backtest(preds(kl, ["NOOP"] * 5 + [advice]), kl, BacktestConfig(horizon=h, fee=f))
        # compounded costs vs subtracted costs: equal to first order (|difference| ~ c * r)
        assert res.metrics["total_return"] == pytest.approx(rr[advice].iloc[5], abs=5e-5)
        gross = backtest(preds(kl, ["NOOP"] * 5 + [advice]), kl, BacktestConfig(horizon=h, fee=0.0))
        assert gross.metrics["total_return"] == pytest.approx(rr[advice].iloc[5] + 2 * f, rel=1e-9)


def test_sharpe_sortino_drawdown_annualized_per_minute():
    rng = np.random.default_rng(3)
    kl = klines_from_opens(100 * np.cumprod(1 + rng.normal(1e-5, 1e-3, 2000)))
    res = backtest(preds(kl, ["BUY"] * 1990), kl, BacktestConfig(fee=0.0, hold="until-next-signal"))
    r = res.returns.to_numpy()
    assert res.metrics["periods_per_year"] == 525_600
    assert res.metrics["sharpe"] == pytest.approx(r.mean() / r.std(ddof=1) * math.sqrt(525_600))
    down = math.sqrt(np.mean(np.minimum(r, 0) ** 2))
    assert res.metrics["sortino"] == pytest.approx(r.mean() / down * math.sqrt(525_600))
    eq = np.concatenate([[1.0], res.equity.to_numpy()])
    assert res.metrics["max_drawdown"] == pytest.approx(np.max(1 - eq / np.maximum.accumulate(eq)))
    # always long without costs over the period is buy-and-hold without costs
    assert res.metrics["total_return"] == pytest.approx(kl["open"].iloc[-1] / kl["open"].iloc[0] - 1, rel=1e-9)
    assert res.metrics["exposure"] == 1.0


def test_hourly_bars_annualize_with_their_own_period():
    kl = klines_from_opens(100 + np.arange(50.0))
    kl["open_time"] = pd.date_range("2025-01-01", periods=50, freq="1h", tz="UTC")
    res = backtest(preds(kl, ["BUY"] * 40), kl, BacktestConfig())
    assert res.metrics["periods_per_year"] == pytest.approx(8760)


def test_predictions_from_jsonl_joined_by_id(tmp_path):
    kl = klines_from_opens(PRICES)
    items = pd.DataFrame({"id": [f"m{i}" for i in range(6)], "open_time": kl["open_time"].iloc[:6]})
    path = tmp_path / "results.jsonl"
    rows = [{"id": "m0", "advice": "BUY", "valid": True}, {"id": "m1", "advice": None, "valid": False},
            {"id": "m2", "advice": "SELL", "valid": False, "reason": "bad json"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    frame = load_predictions(path, items)
    assert frame["advice"].tolist()[0] == "BUY" and frame["advice"].isna().tolist()[1:] == [True, True]
    res = backtest(path, kl, BacktestConfig(horizon=2), items=items)
    assert res.position.tolist() == [1, 1, 0, 0]  # the invalid SELL is no action
    with pytest.raises(DataError, match="neither open_time nor row"):
        backtest(path, kl)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "m0", "advice": "BUY"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_predictions(bad, items)


def test_bad_inputs_are_named():
    kl = klines_from_opens(PRICES)
    with pytest.raises(DataError, match="not in the klines"):
        backtest(pd.DataFrame({"open_time": [pd.Timestamp("2030-01-01", tz="UTC")], "advice": ["BUY"]}), kl)
    with pytest.raises(DataError, match="unknown advice 'HODL'"):
        backtest(preds(kl, ["HODL"]), kl)
    twice = pd.concat([preds(kl, ["BUY"]), preds(kl, ["SELL"])])
    with pytest.raises(DataError, match="more than once"):
        backtest(twice, kl)
    with pytest.raises(DataError, match="no next open"):
        backtest(pd.DataFrame({"row": [6], "advice": ["BUY"]}), kl)


def test_many_models_share_one_period_and_report(tmp_path):
    rng = np.random.default_rng(4)
    kl = klines_from_opens(100 * np.cumprod(1 + rng.normal(0, 1e-3, 43_300)))
    n = 43_200
    models = {
        "majority": preds(kl, ["NOOP"] * n),
        "random": preds(kl, list(rng.choice(["BUY", "NOOP", "SELL"], size=n))),
    }
    results = backtest_many(models, kl, BacktestConfig())
    assert list(results) == ["majority", "random", BUY_AND_HOLD]
    assert len({len(r.equity) for r in results.values()}) == 1
    assert results["majority"].metrics["total_return"] == 0.0
    # a coin flip every minute pays fees on a large turnover: it must lose money
    assert results["random"].metrics["total_return"] < -0.5
    assert results["random"].metrics["turnover_per_day"] > 100
    table = summary_table(results)
    assert table.count("\n| ") >= 3 and "buy-and-hold" in table and "sqrt(525600)" in table
    for suffix in ("png", "svg"):
        out = plot_equity(results, tmp_path / f"equity.{suffix}")
        assert out.stat().st_size > 1000
    assert (tmp_path / "equity.svg").read_text().lstrip().startswith("<?xml")
    d = results["random"].to_dict(series=True)
    assert len(d["equity"]["value"]) == len(results["random"].equity)
    results["random"].save(tmp_path / "bt.json")
    assert json.loads((tmp_path / "bt.json").read_text())["metrics"]["n_signals"] > 0


def test_cli_backtest_of_a_predictions_file(cli, tmp_path):
    rng = np.random.default_rng(5)
    kl = klines_from_opens(100 * np.cumprod(1 + rng.normal(0, 1e-3, 400)))
    data = tmp_path / "ds"
    (data / "items" / "data").mkdir(parents=True)
    kl.to_parquet(data / "klines.parquet", index=False)
    items = pd.DataFrame({"id": [f"m{i}" for i in range(300)], "open_time": kl["open_time"].iloc[:300]})
    items.to_parquet(data / "items" / "data" / "verify-00000-of-00001.parquet", index=False)
    preds = tmp_path / "mymodel.jsonl"
    preds.write_text("".join(json.dumps({"id": f"m{i}", "advice": a, "valid": True}) + "\n"
                             for i, a in enumerate(rng.choice(["BUY", "NOOP", "SELL"], 300, p=[.05, .9, .05]))))
    p = cli("eval", "backtest", "--predictions", str(preds), "--data", str(data), "--out", str(tmp_path / "bt"),
            "--set", "sell_mode=flat", "--set", "horizon=5")
    assert "| mymodel |" in p.stdout and "| buy-and-hold |" in p.stdout and "SELL = flat" in p.stdout
    res = json.loads((tmp_path / "bt" / "backtest.json").read_text())
    assert res["config"]["horizon"] == 5 and res["results"]["mymodel"]["short_share"] == 0.0
    assert (tmp_path / "bt" / "equity.svg").stat().st_size > 1000
    bad = cli("eval", "backtest", "--predictions", str(preds), "--data", str(data), "--set", "sell_mode=long",
              check=False)
    assert bad.returncode == 2 and "sell_mode" in bad.stderr
