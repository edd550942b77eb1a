"""Backtest any model's advice on the klines it was asked about: positions, fees, equity, risk.

Accounting (one convention, stated once; ``docs/architecture.md`` names ``backtest``):

* The advice for minute ``t`` is known at the open of ``t`` (the prompt uses bars before ``t``), so a
  trade happens at ``open(t)`` and the position is held over ``[open(t), open(t+1))``: the same entry
  and exit prices as ``atm.market.labels.realized_returns`` (enter at ``open(t)``, exit at
  ``open(t+horizon)``).
* ``BUY`` sets the position to +1 (long, all equity). ``SELL`` sets it to -1 (``sell_mode=short``) or 0
  (``sell_mode=flat``: sell what is held, stay out). ``NOOP``, an invalid answer and a minute without a
  prediction set nothing: the current position continues.
* ``hold=horizon``: a position lasts ``horizon`` minutes after the latest BUY/SELL, then goes flat (a
  repeated signal renews it without trading). ``hold=until-next-signal``: it lasts until the next
  BUY/SELL. A lone BUY at ``t`` therefore ends with equity ``(1-c)^2 * open(t+h)/open(t)``, ``c`` the
  cost per side: the compounded form of ``realized_returns``' ``r - 2c`` (equal to first order).
* Positions are static between trades (a short's value is ``1 - (P/P_entry - 1)``, not a short
  rebalanced each minute), so a trade's result equals the entry/exit price ratio exactly.
* Costs: ``fee + slippage_bps/1e4`` per unit of notional traded, charged on every position change
  (a long-to-short flip trades 2 units) and on the final close-out at the end of the period.
* Sharpe and Sortino are annualized from the per-bar returns with ``sqrt(periods_per_year)``
  (525,600 for minute bars; inferred from the bar spacing when not given). Risk-free rate 0.

Everything is numpy over the whole period (no per-minute Python loop); ``_simulate_loop`` is the
plain reference kept for the tests and ``benchmarks/bench_backtest.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from pydantic import Field

from atm.config import AtmConfig
from atm.errors import DataError

MINUTES_PER_YEAR = 525_600  # 365 * 24 * 60
BUY_AND_HOLD = "buy-and-hold"


class BacktestConfig(AtmConfig):
    """How advice becomes positions and how they are charged."""

    sell_mode: Literal["short", "flat"] = Field(
        "short", description="what SELL means: go short (-1) or sell to flat (0, spot-only trader)")
    hold: Literal["horizon", "until-next-signal"] = Field(
        "horizon", description="a position lasts `horizon` bars after the latest BUY/SELL, or until the next one")
    horizon: int = Field(10, ge=1, description="holding period in bars (use the label horizon)")
    fee: float = Field(0.001, ge=0, lt=1, description="fee per side, as a fraction of notional traded (0.001 = 0.1%)")
    slippage_bps: float = Field(0.0, ge=0, description="slippage per side in basis points of notional traded")
    periods_per_year: float | None = Field(
        None, gt=0, description="bars per year for annualizing (525600 for 1m); None infers it from the bar spacing")
    close_at_end: bool = Field(True, description="charge the exit cost of a position still open at the period's end")

    @property
    def cost_rate(self) -> float:
        return self.fee + self.slippage_bps / 1e4


@dataclass
class BacktestResult:
    """One strategy's backtest: summary metrics plus the per-bar series behind them."""

    name: str
    metrics: dict[str, Any]
    equity: pd.Series  # equity after each bar (marked at the next bar's open), starts from 1.0
    position: pd.Series  # position held over each bar (-1, 0, +1)
    returns: pd.Series  # net return of each bar
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, series: bool = False) -> dict[str, Any]:
        out = {"name": self.name, "metrics": self.metrics, "config": self.config}
        if series:
            out["equity"] = {"open_time": [str(t) for t in self.equity.index],
                             "value": self.equity.to_numpy().tolist()}
        return out

    def save(self, path: str | Path) -> None:
        from atm.utils import write_json_atomic

        write_json_atomic(path, self.to_dict())


# --------------------------------------------------------------------------------------------
# inputs


def _as_klines(klines: pd.DataFrame | str | Path) -> pd.DataFrame:
    if isinstance(klines, (str, Path)):
        path = Path(klines)
        if not path.exists():
            raise DataError("klines file not found", str(path))
        klines = pd.read_parquet(path)
    for col in ("open_time", "open"):
        if col not in klines.columns:
            raise DataError(f"klines frame has no {col!r} column (columns: {list(klines.columns)})")
    if len(klines) < 2:
        raise DataError(f"klines frame has {len(klines)} rows; a backtest needs at least 2")
    times = _ns(klines["open_time"])
    if len(times) > 1 and not (np.diff(times) > 0).all():
        raise DataError("klines open_time must be sorted and unique")
    return klines


def load_predictions(source: Any, items: pd.DataFrame | Sequence[Mapping] | None = None) -> pd.DataFrame:
    """Predictions as a frame with ``open_time`` and ``advice`` (None for invalid answers).

    ``source`` is a frame, a list of ``Prediction``/dicts, or a file (``.jsonl``, ``.json``, ``.csv``,
    ``.parquet``). Rows need ``open_time`` (or ``row``, a position in the klines); if they only carry
    ``id`` (the harness's per-item results), ``items`` (the dataset's items view) maps id -> open_time.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise DataError("predictions file not found", str(path))
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif path.suffix == ".csv":
            frame = pd.read_csv(path)
        elif path.suffix in (".jsonl", ".json"):
            rows = []
            with open(path) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"not valid JSON ({exc.msg})", str(path), lineno) from None
            frame = pd.DataFrame(rows)
        else:
            raise DataError("unknown predictions format (want .jsonl, .csv or .parquet)", str(path))
    elif isinstance(source, pd.DataFrame):
        frame = source.copy()
    else:
        frame = pd.DataFrame([p.to_dict() if hasattr(p, "to_dict") else dict(p) for p in source])
    if "advice" not in frame.columns:
        raise DataError(f"predictions have no 'advice' column (columns: {list(frame.columns)})")
    if "open_time" not in frame.columns and "row" not in frame.columns:
        if items is None or "id" not in frame.columns:
            raise DataError("predictions carry neither open_time nor row; pass the items (id -> open_time)")
        items_df = items if isinstance(items, pd.DataFrame) else pd.DataFrame(list(items))
        key = items_df[["id", "open_time"]].drop_duplicates("id")
        frame = frame.merge(key, on="id", how="left")
        missing = frame["open_time"].isna()
        if missing.any():
            raise DataError(f"{int(missing.sum())} predictions have ids not in the items "
                            f"(first: {frame.loc[missing, 'id'].iloc[0]!r})")
    if "valid" in frame.columns:  # an invalid answer is no advice (it cannot be acted on)
        frame.loc[~frame["valid"].fillna(False).astype(bool), "advice"] = None
    return frame


def _ns(times: Any) -> np.ndarray:
    """UTC open times as int64 nanoseconds (tz-aware ``to_numpy()`` would build Python objects)."""
    return pd.to_datetime(times, utc=True).to_numpy(dtype="datetime64[ns]").astype(np.int64)


def _signal_positions(frame: pd.DataFrame, klines: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Kline row of each prediction, and its advice as +1 / -1 / nan (no action)."""
    n = len(klines)
    if "row" in frame.columns and "open_time" not in frame.columns:
        rows = frame["row"].to_numpy(dtype=np.int64)
        if (rows < 0).any() or (rows >= n).any():
            raise DataError(f"prediction rows outside the klines (0..{n - 1})")
    else:
        ktimes = _ns(klines["open_time"])
        ptimes = _ns(frame["open_time"])
        # fast path for minute grids: row = (t - t0) / step, verified below; else a binary search
        step = int(np.median(np.diff(ktimes[:1001])))
        rows = (ptimes - ktimes[0]) // step if step > 0 else np.zeros(len(ptimes), dtype=np.int64)
        ok = (rows >= 0) & (rows < n)
        if not (ok.all() and (ktimes[rows] == ptimes).all()):
            rows = np.searchsorted(ktimes, ptimes)
        found = (rows < n) & (ktimes[np.minimum(rows, n - 1)] == ptimes)
        if not found.all():
            first = pd.Timestamp(int(ptimes[~found][0]), tz="UTC")
            raise DataError(f"{int((~found).sum())} predictions are at minutes not in the klines (first: {first})")
    if not (np.diff(rows) > 0).all() and len(np.unique(rows)) != len(rows):
        raise DataError("predictions contain the same minute more than once")
    # factorize: a hash pass over the column, then a Python look at each distinct value only
    codes, uniques = pd.factorize(frame["advice"], use_na_sentinel=True)  # None/NaN -> -1
    value = {"BUY": 1.0, "SELL": -1.0, "NOOP": np.nan}  # NOOP and no advice set nothing
    per_unique = np.empty(len(uniques) + 1)
    for k, u in enumerate(uniques):
        key = u.strip().upper() if isinstance(u, str) else u  # tolerate "buy " before calling it unknown
        if key not in value:
            raise DataError(f"unknown advice {u!r} (want BUY, NOOP or SELL)")
        per_unique[k] = value[key]
    per_unique[-1] = np.nan
    sig = per_unique[codes]  # code -1 picks the trailing nan
    return rows, sig


# --------------------------------------------------------------------------------------------
# the engine


def positions_from_signals(signal: np.ndarray, cfg: BacktestConfig) -> np.ndarray:
    """Per-bar position from a per-bar signal (+1 BUY, -1 SELL, nan nothing), vectorized.

    The latest BUY/SELL sets the position; with ``hold=horizon`` it expires ``horizon`` bars later.
    """
    m = len(signal)
    has = ~np.isnan(signal)
    idx = np.where(has, np.arange(m), -1)
    last = np.maximum.accumulate(idx) if m else idx  # index of the latest signal (-1: none yet)
    value = np.where(last >= 0, signal[np.maximum(last, 0)], 0.0)
    if cfg.sell_mode == "flat":
        value = np.where(value < 0, 0.0, value)
    if cfg.hold == "horizon":
        value = np.where(np.arange(m) - last < cfg.horizon, value, 0.0)
    return np.where(last >= 0, value, 0.0)


def simulate(position: np.ndarray, prices: np.ndarray, cost_rate: float,
             close_at_end: bool = True) -> dict[str, np.ndarray]:
    """Equity of holding ``position[t]`` over ``[prices[t], prices[t+1])``; len(prices) = len(position)+1.

    Static positions between trades: within a run of constant position ``p`` entered at price
    ``P_e`` the value is ``1 + p*(P/P_e - 1)``; runs compound, each change costs ``|dp| * cost_rate``.
    """
    m = len(position)
    pos = np.asarray(position, dtype=np.float64)
    prev = np.concatenate(([0.0], pos[:-1]))
    change = pos != prev
    change[0] = True  # every bar starts a run at the first bar
    seg = np.cumsum(change) - 1  # run id of each bar
    starts = np.flatnonzero(change)
    entry = prices[:-1][starts][seg]
    growth = 1.0 + pos * (prices[1:] / entry - 1.0)  # run value after each bar, relative to its entry
    traded = np.abs(pos - prev)  # notional traded at the open of each bar
    cost_factor = 1.0 - traded[starts] * cost_rate  # one per run (its entry)
    ends = np.concatenate((starts[1:] - 1, [m - 1]))
    run_growth = growth[ends]
    # equity at the start of run k (after its entry cost) = prod_{j<k} run_growth_j * prod_{j<=k} cost_j
    before = np.concatenate(([1.0], np.cumprod(run_growth)[:-1]))
    start_equity = before * np.cumprod(cost_factor)
    equity = start_equity[seg] * growth
    final_cost = abs(pos[-1]) * cost_rate if (close_at_end and m) else 0.0
    if m:
        equity[-1] *= 1.0 - final_cost
    prev_eq = np.concatenate(([1.0], equity[:-1]))
    returns = equity / prev_eq - 1.0
    return {"equity": equity, "returns": returns, "traded": traded, "final_traded": abs(pos[-1]) if (close_at_end and m) else 0.0,
            "seg": seg, "starts": starts, "ends": ends, "run_growth": run_growth}


def _simulate_loop(position: Sequence[float], prices: Sequence[float], cost_rate: float,
                   close_at_end: bool = True) -> list[float]:
    """The same accounting as ``simulate`` written as a plain per-bar loop (test oracle, benchmark)."""
    equity = 1.0
    held = 0.0
    entry_price = 0.0
    run_start_equity = 1.0
    out = []
    for t in range(len(position)):
        p = float(position[t])
        if t == 0 or p != held:
            if t > 0:
                equity = run_start_equity * (1.0 + held * (prices[t] / entry_price - 1.0))
            equity *= 1.0 - abs(p - held) * cost_rate
            held, entry_price, run_start_equity = p, prices[t], equity
        value = run_start_equity * (1.0 + held * (prices[t + 1] / entry_price - 1.0))
        out.append(value)
    if close_at_end and out:
        out[-1] *= 1.0 - abs(held) * cost_rate
    return out


def _infer_periods_per_year(times: pd.Series) -> float:
    t = _ns(times)
    if len(t) < 2:
        return float(MINUTES_PER_YEAR)
    step = float(np.median(np.diff(t[:10_001]))) / 1e9  # seconds per bar
    return MINUTES_PER_YEAR * 60.0 / step if step > 0 else float(MINUTES_PER_YEAR)


def _metrics(sim: dict[str, np.ndarray], pos: np.ndarray, prices: np.ndarray, ppy: float,
             n_signals: int, n_predictions: int) -> dict[str, Any]:
    r = sim["returns"]
    eq = sim["equity"]
    m = len(r)
    mean = float(r.mean()) if m else 0.0
    sd = float(r.std(ddof=1)) if m > 1 else 0.0
    downside = float(np.sqrt(np.mean(np.minimum(r, 0.0) ** 2))) if m else 0.0
    sharpe = mean / sd * math.sqrt(ppy) if sd > 0 else 0.0
    sortino = mean / downside * math.sqrt(ppy) if downside > 0 else (0.0 if mean == 0 else math.inf)
    peak = np.maximum.accumulate(np.concatenate(([1.0], eq)))
    drawdown = 1.0 - np.concatenate(([1.0], eq)) / peak
    starts, ends = sim["starts"], sim["ends"]
    in_market = pos[starts] != 0
    trade_moves = pos[starts] * (prices[ends + 1] / prices[starts] - 1.0)
    n_trades = int(in_market.sum())
    hits = int((trade_moves[in_market] > 0).sum())
    turnover = float(sim["traded"].sum() + sim["final_traded"])
    return {
        "total_return": float(eq[-1] - 1.0) if m else 0.0,
        "sharpe": float(sharpe),
        "sortino": float(sortino),
        "max_drawdown": float(drawdown.max()),
        "hit_rate": hits / n_trades if n_trades else None,
        "n_trades": n_trades,
        "turnover": turnover,
        "turnover_per_day": turnover / (m / (ppy / 365.0)) if m else 0.0,
        "exposure": float(np.abs(pos).mean()) if m else 0.0,
        "long_share": float((pos > 0).mean()) if m else 0.0,
        "short_share": float((pos < 0).mean()) if m else 0.0,
        "bars": m,
        "days": m / (ppy / 365.0),
        "periods_per_year": ppy,
        "n_predictions": n_predictions,
        "n_signals": n_signals,
    }


# --------------------------------------------------------------------------------------------
# public API


def _period(rows: np.ndarray, n: int, cfg: BacktestConfig) -> tuple[int, int]:
    start = int(rows.min())
    end = min(int(rows.max()) + cfg.horizon, n - 1)  # bars start..end-1; prices start..end
    if end <= start:
        raise DataError("predictions end at the last kline: there is no next open to trade against")
    return start, end


def backtest(predictions: Any, klines: pd.DataFrame | str | Path, cfg: BacktestConfig | None = None,
             *, items: Any = None, name: str = "model", period: tuple[int, int] | None = None) -> BacktestResult:
    """Backtest one model's advice (see the module docstring for the accounting).

    The period runs from the first predicted minute to ``horizon`` bars after the last one (or
    ``period=(start_row, end_row)`` to align several models). The result's metrics include the
    buy-and-hold benchmark over the same bars (``buy_and_hold_return``, ``excess_return``).
    """
    cfg = cfg or BacktestConfig()
    kl = _as_klines(klines)
    frame = load_predictions(predictions, items)
    if frame.empty:
        raise DataError("no predictions to backtest")
    rows, sig = _signal_positions(frame, kl)
    start, end = period if period is not None else _period(rows, len(kl), cfg)
    if rows.min() < start or rows.max() >= end:
        raise DataError(f"predictions fall outside the backtest period rows {start}..{end - 1}")
    prices = kl["open"].to_numpy(dtype=np.float64)[start:end + 1]
    if not np.all(np.isfinite(prices)) or (prices <= 0).any():
        raise DataError("klines 'open' has non-positive or missing prices in the backtest period")
    signal = np.full(end - start, np.nan)
    signal[rows - start] = sig
    pos = positions_from_signals(signal, cfg)
    sim = simulate(pos, prices, cfg.cost_rate, cfg.close_at_end)
    times = pd.DatetimeIndex(pd.to_datetime(kl["open_time"], utc=True).iloc[start:end], name="open_time")
    ppy = cfg.periods_per_year or _infer_periods_per_year(kl["open_time"])
    metrics = _metrics(sim, pos, prices, ppy, int((~np.isnan(sig)).sum()), len(frame))
    c = cfg.cost_rate  # long from prices[0] to prices[-1], entry (and exit) charged
    bh_final = (1.0 - c) * prices[-1] / prices[0] * ((1.0 - c) if cfg.close_at_end else 1.0)
    metrics["buy_and_hold_return"] = float(bh_final - 1.0)
    metrics["excess_return"] = metrics["total_return"] - metrics["buy_and_hold_return"]
    metrics["start"] = str(times[0])
    metrics["end"] = str(pd.to_datetime(kl["open_time"], utc=True).iloc[end])
    return BacktestResult(name=name, metrics=metrics,
                          equity=pd.Series(sim["equity"], index=times, name=name),
                          position=pd.Series(pos, index=times, name=name),
                          returns=pd.Series(sim["returns"], index=times, name=name),
                          config={**cfg.to_dict(), "period_rows": [start, end]})


def buy_and_hold(klines: pd.DataFrame | str | Path, period: tuple[int, int],
                 cfg: BacktestConfig | None = None) -> BacktestResult:
    """Long from the open of ``period[0]`` to the open of ``period[1]``, entry and exit charged."""
    cfg = cfg or BacktestConfig()
    kl = _as_klines(klines)
    start, end = period
    frame = pd.DataFrame({"row": np.arange(start, end), "advice": "BUY"})
    res = backtest(frame, kl, cfg.model_copy(update={"hold": "until-next-signal", "sell_mode": "short"}),
                   name=BUY_AND_HOLD, period=period)
    return res


def backtest_many(predictions: Mapping[str, Any], klines: pd.DataFrame | str | Path,
                  cfg: BacktestConfig | None = None, *, items: Any = None,
                  include_buy_and_hold: bool = True) -> dict[str, BacktestResult]:
    """Backtest several models over one common period (the union of their minutes), plus buy-and-hold."""
    cfg = cfg or BacktestConfig()
    kl = _as_klines(klines)
    frames = {name: load_predictions(p, items) for name, p in predictions.items()}
    all_rows = np.concatenate([_signal_positions(f, kl)[0] for f in frames.values() if len(f)])
    if not len(all_rows):
        raise DataError("no predictions to backtest")
    period = _period(all_rows, len(kl), cfg)
    out = {name: backtest(f, kl, cfg, name=name, period=period) for name, f in frames.items()}
    if include_buy_and_hold and BUY_AND_HOLD not in out:
        out[BUY_AND_HOLD] = buy_and_hold(kl, period, cfg)
    return out


# --------------------------------------------------------------------------------------------
# report helpers


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.2f}%"


SUMMARY_HEAD = ("strategy", "total return", "vs buy&hold", "Sharpe", "Sortino", "max drawdown", "hit rate",
                "trades", "turnover/day", "exposure")


def summary(results: Mapping[str, BacktestResult] | Iterable[BacktestResult]) -> dict[str, Any]:
    """The summary as data: ``{"head": [...], "rows": [[cell, ...], ...], "note": str}`` (one row per
    strategy, cells formatted; the note states costs, rules and period). ``summary_table`` renders
    it as markdown; ``atm.eval.report`` renders it as a table block in markdown and HTML."""
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    rows = []
    for r in items:
        m = r.metrics
        hit = "n/a" if m.get("hit_rate") is None else f"{100 * m['hit_rate']:.1f}%"
        sortino = m["sortino"]
        sortino_s = "inf" if math.isinf(sortino) else f"{sortino:.2f}"
        rows.append([r.name, _pct(m["total_return"]), _pct(m["excess_return"]), f"{m['sharpe']:.2f}", sortino_s,
                     f"{100 * m['max_drawdown']:.2f}%", hit, str(m["n_trades"]), f"{m['turnover_per_day']:.1f}",
                     f"{100 * m['exposure']:.1f}%"])
    note = ""
    if items:
        c, m0 = items[0].config, items[0].metrics
        note = (f"Costs {100 * c['fee']:.2f}% fee + {c['slippage_bps']:g} bps slippage per side; "
                f"SELL = {c['sell_mode']}; hold = {c['hold']} ({c['horizon']} bars); "
                f"{m0['days']:.1f} days ({m0['start']} to {m0['end']}); "
                f"Sharpe/Sortino annualized with sqrt({m0['periods_per_year']:g}); "
                "hit rate: trades whose price moved the advised way (before costs); turnover: notional "
                "traded per day in units of equity.")
    return {"head": list(SUMMARY_HEAD), "rows": rows, "note": note}


def summary_table(results: Mapping[str, BacktestResult] | Iterable[BacktestResult]) -> str:
    """A markdown table (one row per strategy) for report.md and `atm eval backtest`."""
    s = summary(results)
    lines = ["| " + " | ".join(s["head"]) + " |", "|---|" + "---:|" * (len(s["head"]) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in s["rows"]]
    if s["note"]:
        lines += ["", s["note"]]
    return "\n".join(lines)


def plot_equity(results: Mapping[str, BacktestResult] | Iterable[BacktestResult], path: str | Path,
                title: str = "Equity (net of costs)", max_points: int = 2000) -> Path:
    """Equity curves of several strategies in one figure (PNG or SVG, by the file's suffix).

    Curves longer than ``max_points`` are drawn from every k-th bar (plus the last), which keeps an
    SVG of a 43,200-minute month small enough to embed in a self-contained HTML report.
    """
    from atm.errors import require

    matplotlib = require("matplotlib", "eval")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from atm.utils import atomic_path

    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    try:
        for r in items:
            style = {"color": "black", "linestyle": "--", "linewidth": 1.0} if r.name == BUY_AND_HOLD else {"linewidth": 1.2}
            eq = r.equity
            if len(eq) > max_points:
                keep = np.unique(np.concatenate((np.arange(0, len(eq), -(-len(eq) // max_points)), [len(eq) - 1])))
                eq = eq.iloc[keep]
            ax.plot(eq.index, eq.to_numpy(), label=f"{r.name} ({_pct(r.metrics['total_return'])})", **style)
        ax.axhline(1.0, color="grey", linewidth=0.6)
        ax.set_title(title)
        ax.set_ylabel("equity (start = 1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.autofmt_xdate()
        fig.tight_layout()
        target = Path(path)
        fmt = target.suffix.lstrip(".").lower() or "png"
        with atomic_path(target, suffix="." + fmt) as tmp:
            fig.savefig(tmp, format=fmt)
    finally:
        plt.close(fig)
    return target
