"""``atm chat``: a Gradio page over market state, a client of ``atm serve`` (no model in this process).

The page shows, for the current minute t of a klines file:
- a candlestick chart (plotly) of the bars before t, with the advice given so far marked on it;
- the market state exactly as the model sees it (the user message ``/v1/advice`` rendered with the
  model's own template and encoder);
- the model's JSON advice with class probabilities (``/v1/advice``);
- a chat grounded in that state: each question is sent with the current state and advice;
- a replay control stepping minute by minute: at each step the advice for the new minute is
  fetched as it would have come online, and the running PnL of following it is updated (net of
  fees, from ``atm.market.labels.realized_returns``: enter at open(t), exit at open(t+horizon)).

Element ids (for Playwright and custom CSS): ``chart``, ``market-state``, ``advice-json``,
``chatbot``, ``chat-input``, ``step-btn``, ``step10-btn``, ``back-btn``, ``replay-log``, ``pnl``,
``status``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atm.constants import ADVICES

KLINE_FIELDS = ("open_time", "open", "high", "low", "close", "volume", "quote_volume", "count",
                "taker_buy_volume", "taker_buy_quote_volume")
CHAT_SYSTEM = ("You are a trading assistant. You are shown the current market state and the "
               "advice you gave for the next minute. Answer the user's question about them briefly.")


class ApiClient:
    """The few calls the page makes to ``atm serve``."""

    def __init__(self, api: str, model: str, api_key: str | None = None, timeout: float = 120.0):
        import httpx

        self.api = api.rstrip("/")
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.api, headers=headers, timeout=timeout, trust_env=False)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(path, json=body)
        try:
            data = r.json()
        except ValueError:
            data = {"error": {"message": r.text[:300]}}
        if r.status_code != 200:
            err = data.get("error")
            msg = err.get("message") if isinstance(err, dict) else err
            raise RuntimeError(f"{path} answered {r.status_code}: {msg}")
        return data

    def models(self) -> list[str]:
        r = self.http.get("/v1/models")
        r.raise_for_status()
        return [m["id"] for m in r.json().get("data", [])]

    def advice(self, klines: list[dict[str, Any]]) -> dict[str, Any]:
        return self._post("/v1/advice", {"model": self.model, "klines": klines, "probs": True})

    def chat(self, messages: list[dict[str, str]], max_tokens: int = 128) -> str:
        data = self._post("/v1/chat/completions", {"model": self.model, "messages": messages,
                                                    "max_tokens": max_tokens, "temperature": 0.7})
        return data["choices"][0]["message"].get("content") or ""


def load_klines(path: str | Path):
    """A kline frame from an ``atm data build`` parquet or a Binance CSV (with or without header)."""
    import pandas as pd

    from atm.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError("klines file not found", str(p))
    if p.suffix == ".parquet":
        from atm.market.klines import read_klines_parquet

        return read_klines_parquet(p)
    cols = ["open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume",
            "count", "taker_buy_volume", "taker_buy_quote_volume", "ignore"]
    first = p.open().readline()
    df = pd.read_csv(p, header=0 if first[:1].isalpha() else None,
                     names=None if first[:1].isalpha() else cols)
    t = df["open_time"].astype("int64")
    unit = "us" if t.iloc[0] >= 1e14 else "ms"
    df["open_time"] = pd.to_datetime(t, unit=unit, utc=True)
    return df.drop(columns=[c for c in ("ignore",) if c in df.columns]).sort_values("open_time").reset_index(drop=True)


@dataclass
class ReplayConfig:
    send_bars: int = 64  # bars sent to /v1/advice (>= the model's encoder lookback)
    chart_bars: int = 60  # bars drawn
    horizon: int = 1  # minutes a position is held
    fee: float = 0.001  # per side


class Replay:
    """The klines and what can be computed without a model: windows, realized returns, PnL."""

    def __init__(self, df, cfg: ReplayConfig):
        from atm.market.labels import realized_returns

        self.df = df
        self.cfg = cfg
        self.ret = realized_returns(df, cfg.horizon, fee=cfg.fee)
        self.first = max(cfg.send_bars, cfg.chart_bars)
        self.last = len(df) - 1
        if self.last < self.first:
            raise ValueError(f"the klines file has {len(df)} bars; the page needs more than {self.first}")

    def clamp(self, t: int) -> int:
        return int(min(max(t, self.first), self.last))

    def window_rows(self, t: int) -> list[dict[str, Any]]:
        """The bars before minute t, as JSON rows for /v1/advice."""
        w = self.df.iloc[t - self.cfg.send_bars:t]
        out = []
        for rec in w[[c for c in KLINE_FIELDS if c in w.columns]].to_dict("records"):
            rec["open_time"] = rec["open_time"].isoformat()
            out.append({k: (int(v) if k == "count" else v) for k, v in rec.items()})
        return out

    def time_of(self, t: int) -> str:
        return self.df["open_time"].iloc[t].strftime("%Y-%m-%d %H:%M UTC")

    def realized(self, t: int, advice: str | None) -> float | None:
        if advice not in ADVICES:
            return None
        v = self.ret[advice].iloc[t]
        return None if v != v else float(v)  # NaN: horizon past the data

    def figure(self, t: int, log: list[dict[str, Any]]):
        import plotly.graph_objects as go

        w = self.df.iloc[t - self.cfg.chart_bars:t]
        fig = go.Figure(go.Candlestick(x=w["open_time"], open=w["open"], high=w["high"], low=w["low"],
                                       close=w["close"], name="1m klines"))
        lo_t = w["open_time"].iloc[0]
        for kind, symbol, color in (("BUY", "triangle-up", "#16a34a"), ("SELL", "triangle-down", "#dc2626")):
            pts = [e for e in log if e["advice"] == kind and e["t"] < t and self.df["open_time"].iloc[e["t"]] >= lo_t]
            if pts:
                xs = [self.df["open_time"].iloc[e["t"]] for e in pts]
                ys = [float(self.df["open"].iloc[e["t"]]) for e in pts]
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=f"advice {kind}",
                                         marker=dict(symbol=symbol, size=11, color=color)))
        fig.update_layout(height=380, margin=dict(l=10, r=10, t=30, b=10), xaxis_rangeslider_visible=False,
                          title=f"bars before {self.time_of(t)} (the minute being advised)",
                          legend=dict(orientation="h", y=1.02, x=0.6))
        return fig


def log_rows(replay: Replay, log: list[dict[str, Any]], now: int) -> tuple[list[list[Any]], str]:
    """Table rows (newest first) and the PnL line: trades whose horizon has passed by minute ``now``."""
    rows, total, n_done, n_trades = [], 0.0, 0, 0
    for e in log:
        closed = e["t"] + replay.cfg.horizon <= now
        r = replay.realized(e["t"], e["advice"]) if closed else None
        if r is not None:
            total += r
            n_done += 1
            n_trades += e["advice"] != "NOOP"
        p = e.get("probs") or {}
        rows.append([replay.time_of(e["t"]), e["advice"] or "invalid",
                     *(round(p[a], 3) if a in p else None for a in ADVICES),
                     None if r is None else round(r * 1e4, 2), round(total * 1e4, 2)])
    pnl = (f"**Running PnL of following the advice: {total * 1e4:+.2f} bps** over {n_done} closed "
           f"minutes ({n_trades} trades, horizon {replay.cfg.horizon} min, fee {replay.cfg.fee * 1e4:.0f} "
           "bps per side)")
    return rows[::-1], pnl


def build_page(client: ApiClient, replay: Replay, start: int | None = None):
    """The Gradio Blocks app."""
    import gradio as gr

    t_start = replay.clamp(start if start is not None else replay.first)
    headers = ["minute", "advice", "P(BUY)", "P(NOOP)", "P(SELL)", "return bps", "PnL bps"]

    def advise(state: dict[str, Any]) -> dict[str, Any]:
        t = state["t"]
        try:
            res = client.advice(replay.window_rows(t))
        except Exception as exc:  # noqa: BLE001 - shown on the page, the page stays up
            res = {"error": str(exc), "advice": None, "valid": False, "probs": None, "messages": []}
        entry = {"t": t, "advice": res.get("advice"), "probs": res.get("probs"),
                 "valid": res.get("valid", False)}
        state["log"] = [e for e in state["log"] if e["t"] != t] + [entry]
        state["last"] = res
        return res

    def render(state: dict[str, Any]):
        t, res = state["t"], state.get("last") or {}
        msgs = res.get("messages") or []
        seen = msgs[-1]["content"] if msgs else res.get("error", "")
        shown = {k: res.get(k) for k in ("model", "time", "advice", "predicted_open_change", "probs",
                                          "valid", "reason", "raw", "latency_ms")}
        if res.get("error"):
            shown["error"] = res["error"]
        rows, pnl = log_rows(replay, state["log"], t)
        status = f"minute {t} of {replay.last}: {replay.time_of(t)}; model {client.model} at {client.api}"
        return (replay.figure(t, state["log"]), seen, json.dumps(shown, indent=2), rows, pnl, status, state)

    def on_load(state):
        state = {"t": t_start, "log": [], "last": None}
        advise(state)
        return render(state)

    def step(state, n: int):
        state = dict(state or {"t": t_start, "log": [], "last": None})
        for _ in range(n):
            if state["t"] >= replay.last:
                break
            state["t"] += 1
            advise(state)
        return render(state)

    def back(state):
        state = dict(state or {"t": t_start, "log": [], "last": None})
        state["t"] = replay.clamp(state["t"] - 1)
        state["log"] = [e for e in state["log"] if e["t"] < state["t"]]
        advise(state)
        return render(state)

    def respond(message: str, history: list, state: dict[str, Any]):
        res = (state or {}).get("last") or {}
        msgs = res.get("messages") or []
        market = msgs[-1]["content"] if msgs else "(no market state)"
        advice_txt = json.dumps({k: res.get(k) for k in ("advice", "predicted_open_change", "probs")})
        grounded = (f"Market state for the minute {res.get('time')}:\n{market}\n\n"
                    f"Your advice: {advice_txt}\n\nQuestion: {message}")
        convo = [{"role": "system", "content": CHAT_SYSTEM}]
        for h in history or []:
            if isinstance(h, dict) and h.get("role") in ("user", "assistant"):
                content = h.get("content")
                if isinstance(content, list):  # gradio 6 message parts
                    content = " ".join(str(c.get("text", "")) if isinstance(c, dict) else str(c) for c in content)
                convo.append({"role": h["role"], "content": str(content or "")})
        convo.append({"role": "user", "content": grounded})
        try:
            reply = client.chat(convo).strip()
        except Exception as exc:  # noqa: BLE001
            return f"(error from {client.api}: {exc})"
        return reply or "(the model gave an empty answer)"

    with gr.Blocks(title="ATM: market advice") as demo:
        gr.Markdown("## ATM: market state, the model's advice, and a chat about it\n"
                    "A client of `atm serve`: the advice comes from `/v1/advice` (the model's own "
                    "template and schema), the chat from `/v1/chat/completions`.")
        status = gr.Markdown(elem_id="status")
        state = gr.State({"t": t_start, "log": [], "last": None})
        with gr.Row():
            with gr.Column(scale=3):
                chart = gr.Plot(label="klines", elem_id="chart")
                with gr.Row():
                    back_btn = gr.Button("◀ back 1 min", elem_id="back-btn")
                    step_btn = gr.Button("step ▶ +1 min", elem_id="step-btn", variant="primary")
                    step10_btn = gr.Button("▶▶ +10 min", elem_id="step10-btn")
                pnl = gr.Markdown(elem_id="pnl")
                log = gr.Dataframe(headers=headers, label="replay: advice as it came online",
                                   elem_id="replay-log", interactive=False, wrap=True)
            with gr.Column(scale=2):
                advice_box = gr.Code(label="the model's advice (JSON, /v1/advice)", language="json",
                                     elem_id="advice-json", interactive=False)
                seen = gr.Textbox(label="market state as the model sees it", lines=8, max_lines=14,
                                  elem_id="market-state", interactive=False)
        gr.ChatInterface(respond, chatbot=gr.Chatbot(elem_id="chatbot", height=300, label="chat"),
                         textbox=gr.Textbox(elem_id="chat-input", placeholder="Ask about this market state",
                                            show_label=False),
                         additional_inputs=[state], api_name="chat")
        outs = [chart, seen, advice_box, log, pnl, status, state]
        demo.load(on_load, inputs=[state], outputs=outs)
        step_btn.click(lambda s: step(s, 1), inputs=[state], outputs=outs)
        step10_btn.click(lambda s: step(s, 10), inputs=[state], outputs=outs)
        back_btn.click(back, inputs=[state], outputs=outs)
    return demo
