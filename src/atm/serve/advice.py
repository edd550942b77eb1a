"""``POST /v1/advice``: klines in, the model's advice out, prompted exactly as the model was trained.

The window is encoded with the encoder and template saved with the model (registry manifest),
decoded under the model's answer schema, parsed by the one strict parser
(``atm.prompting.advice.parse_advice``) and, when the engine returns token log-probabilities,
given class probabilities read at the token where the advice value starts.

The advised minute t is the one after the last kline given (or the ``time`` asked for, with a
dataset's klines): only bars before t are encoded, as at the open of t. Klines sent in the request
are checked by the rules ``atm data build`` applies to files (``atm.market.validate``): a bad bar
is a 400 naming ``klines[i]``, rows out of order are sorted and reported in the answer's
``repairs``, as the build reports them. Nothing is filled in silently: a field the model's encoder
reads that a bar lacks, a ``time`` outside the served data and a gap in its window are 400s naming
them; bars the build filled (``--fill-gaps``) are used and listed in ``repairs``. The answer names
its two measurements: ``advice`` is the generated answer, ``probs`` the scored options
(``scored_advice`` their most likely).
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

from atm.constants import ADVICES, MINUTE_NS
from atm.market.klines import COLUMNS, FLOAT_COLUMNS
from atm.market.validate import MAX_LISTED, PRICE_COLUMNS, Repairs, first_bad_bar, out_of_order
from atm.prompting.answer import ADVICE_KEY, probs_from_top_logprobs



class AdviceInputError(Exception):
    def __init__(self, message: str, param: str | None = "klines"):
        super().__init__(message)
        self.param = param


def _to_ts(value: Any, where: str):
    import pandas as pd

    if isinstance(value, bool) or value is None:
        raise AdviceInputError(f"{where}: open_time is missing or not a time ({value!r})")
    try:
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ValueError("not finite")
            # Binance: milliseconds (spot) or microseconds (spot since 2025)
            unit = "us" if abs(value) >= 1e14 else "ms"
            return pd.Timestamp(int(value), unit=unit, tz="UTC")
        ts = pd.Timestamp(str(value))
        return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    except (ValueError, TypeError, OverflowError) as exc:
        raise AdviceInputError(f"{where}: open_time {value!r} is not a time ({exc})") from None


def klines_frame(rows: list[Any], repairs: Repairs | None = None):
    """A kline frame (docs/architecture.md layout) from JSON rows: objects with the column names,
    or arrays in Binance's column order. Checked as ``atm data build`` checks a file
    (``atm.market.validate``): numbers finite, prices > 0, volumes >= 0, low <= open, close <= high
    (a 400 naming ``klines[i]``); rows out of order are sorted, counted in ``repairs``. A repeated
    minute or a gap is a 400 (the build drops exact copies, which Binance's overlapping daily and
    monthly files produce; a request has no such source)."""
    import pandas as pd

    if not rows:
        raise AdviceInputError("klines is empty")
    repairs = repairs if repairs is not None else Repairs()
    recs: dict[str, list] = {c: [] for c in COLUMNS}
    missing: dict[str, list[int]] = {}  # optional column -> rows that did not give it
    for i, row in enumerate(rows):
        where = f"klines[{i}]"
        if isinstance(row, list):
            if len(row) < 6:
                raise AdviceInputError(f"{where}: an array row needs at least open_time, open, high, "
                                       f"low, close, volume (got {len(row)} values)")
            row = dict(zip(COLUMNS, row))
        if not isinstance(row, dict):
            raise AdviceInputError(f"{where}: expected an object or an array")
        recs["open_time"].append(_to_ts(row.get("open_time"), where))
        for c in FLOAT_COLUMNS + ("count",):
            v = row.get(c)
            if v is None:
                if c in PRICE_COLUMNS or c == "volume":
                    raise AdviceInputError(f"{where}: {c} is missing")
                # a placeholder only: encode_window answers 400 if the model's encoder reads it
                missing.setdefault(c, []).append(i)
                v = 0
            try:
                if isinstance(v, bool):
                    raise ValueError
                f = float(v)  # Binance sends numbers as strings; both are fine
            except (TypeError, ValueError):
                raise AdviceInputError(f"{where}: {c} is not a number ({v!r})") from None
            if not math.isfinite(f):
                raise AdviceInputError(f"{where}: {c} is not finite ({v!r})")
            recs[c].append(f)
        recs["close_time"].append(None)
    values = {c: np.asarray(recs[c], dtype=np.float64) for c in FLOAT_COLUMNS + ("count",)}
    bad = first_bad_bar(values)
    if bad is not None:
        raise AdviceInputError(f"klines[{bad[0]}]: {bad[1]}")
    df = pd.DataFrame({c: recs[c] for c in COLUMNS if c != "close_time"})
    df["open_time"] = pd.to_datetime(df["open_time"], utc=True).astype("datetime64[ns, UTC]")
    ns = df["open_time"].astype("int64").to_numpy()
    if (ns % MINUTE_NS).any():
        raise AdviceInputError("klines: open_time values must fall on whole minutes (1m klines)")
    back = out_of_order(ns)
    if back.size:
        repairs.add("rows_reordered", "rows out of time order (sorted)", int(back.size),
                    [f"klines[{int(k)}]" for k in back[:MAX_LISTED]])
    order = np.argsort(ns, kind="stable")
    df = df.iloc[order].reset_index(drop=True)
    ns = ns[order]
    dup = np.flatnonzero(ns[1:] == ns[:-1]) + 1
    if dup.size:  # a request is one window its client assembled: a repeated minute is its bug
        k = int(dup[0])
        raise AdviceInputError(f"klines: minute {df['open_time'][k].isoformat()} appears twice "
                               f"(klines[{int(order[k - 1])}] and klines[{int(order[k])}])")
    d = np.diff(ns)
    if (d != MINUTE_NS).any():
        i = int(np.argmax(d != MINUTE_NS))
        raise AdviceInputError(f"klines: gap after {df['open_time'][i].isoformat()}: 1m klines must be "
                               "consecutive minutes")
    df["count"] = df["count"].astype("int64")
    df["close_time"] = df["open_time"] + pd.Timedelta(milliseconds=59_999)
    out = df[list(COLUMNS)]
    # column -> (first request row without it, positions of the rows without it after sorting)
    out.attrs["missing"] = {c: (rows_[0], np.flatnonzero(np.isin(order, rows_)).tolist())
                            for c, rows_ in missing.items()}
    return out


_DATASETS: dict[str, Any] = {}


def dataset_window(settings, symbol: str, when: Any, need: int, repairs: Repairs | None = None):
    """The ``need`` bars before minute ``when`` from the configured klines of ``symbol``: the
    consecutive minutes t-need .. t-1. A time outside what the data can answer is a 400 giving the
    range; a window with a gap is a 400 naming it; bars the build filled in (``--fill-gaps``) are
    used and reported in ``repairs``."""
    import pandas as pd

    path = settings.klines.get(symbol) or settings.klines.get(symbol.upper())
    if path is None:
        known = ", ".join(settings.klines) or "none (set `klines:` in the serve config)"
        raise AdviceInputError(f"no klines configured for symbol {symbol!r}; configured: {known}", "symbol")
    df = load_klines(path)
    if when is None:
        raise AdviceInputError("give `time` (the minute to advise) with `symbol`", "time")
    t = _to_ts(when, "time").floor("min")
    ns = df["open_time"].astype("int64").to_numpy()
    if not len(ns):
        raise AdviceInputError(f"{symbol}: the configured klines have no bars", "symbol")
    first, last = df["open_time"].iloc[0], df["open_time"].iloc[-1]
    lo = first + pd.Timedelta(minutes=need)  # the earliest minute with `need` bars before it
    hi = last + pd.Timedelta(minutes=1)  # the minute after the last bar
    span = (f"{symbol} klines cover {first.isoformat()} .. {last.isoformat()}; with {need} bars of "
            f"context, `time` can be {lo.isoformat()} .. {hi.isoformat()}")
    if t > hi or t < lo:
        raise AdviceInputError(f"time {t.isoformat()} is outside the data: {span}", "time")
    end = int(np.searchsorted(ns, t.value))  # rows before t
    win = df.iloc[end - need:end].reset_index(drop=True)
    wns = ns[end - need:end]
    expect = t.value - MINUTE_NS * np.arange(need, 0, -1)
    if len(wns) < need or (wns != expect).any():
        have = set(int(x) for x in wns)
        gap = next(int(x) for x in expect if int(x) not in have)
        raise AdviceInputError(f"time {t.isoformat()}: {symbol} klines have a gap at "
                               f"{_iso(gap)} inside the {need} minutes before it (no bar; rebuild with "
                               "`atm data build --fill-gaps` to fill gaps, reported as repairs)", "time")
    if repairs is not None and "filled" in win.columns and win["filled"].any():
        idx = np.flatnonzero(win["filled"].to_numpy(bool))
        repairs.add("filled_bars", "bars missing upstream, filled by `atm data build --fill-gaps` "
                    "(OHLC = previous close, volumes 0)", int(idx.size),
                    [_iso(int(wns[k])) for k in idx[:MAX_LISTED]])
    return win


def _iso(ns: int) -> str:
    import pandas as pd

    return pd.Timestamp(ns, tz="UTC").isoformat()


def load_klines(path: str):
    """The klines parquet at ``path``, read once per server (``atm serve`` checks every configured
    path at start, so a bad one is refused before the port is bound)."""
    df = _DATASETS.get(path)
    if df is None:
        from atm.market.klines import read_klines_parquet

        df = read_klines_parquet(path)
        _DATASETS[path] = df
    return df


def _with_target_row(df):
    """Append minute t (after the last bar) so encoders can address it; its values are never read
    by an encoder (contexts use bars before t), so it repeats the last close with no volume."""
    import pandas as pd

    last = df.iloc[-1]
    row = {c: last[c] for c in df.columns}
    row["open_time"] = last["open_time"] + pd.Timedelta(minutes=1)
    row["close_time"] = row["open_time"] + pd.Timedelta(milliseconds=59_999)
    for c in PRICE_COLUMNS:
        row[c] = float(last["close"])
    for c in ("volume", "quote_volume", "taker_buy_volume", "taker_buy_quote_volume"):
        if c in row:
            row[c] = 0.0
    if "count" in row:
        row["count"] = 0
    if "filled" in df.columns:
        row["filled"] = True
    return pd.concat([df, pd.DataFrame([row]).astype(df.dtypes.to_dict())], ignore_index=True)


def request_window(req, settings, enc, repairs: Repairs):
    """The bars a request asks about: its ``klines``, or ``symbol`` + ``time`` from the served data.
    Both forms at once, or half of the second, is a 400 (nothing given is silently ignored)."""
    if req.klines is not None:
        extra = [f for f in ("symbol", "time") if getattr(req, f) is not None]
        if extra:
            raise AdviceInputError(f"give either `klines` or `symbol` + `time`, not both (got klines and "
                                   f"{' and '.join(extra)})", extra[0])
        return klines_frame(req.klines, repairs)
    if req.symbol:
        return dataset_window(settings, req.symbol, req.time, window_bars(enc), repairs)
    if req.time is not None:
        raise AdviceInputError("`time` needs `symbol` (a symbol the server has klines for)", "symbol")
    raise AdviceInputError("give `klines` (a window of 1m klines) or `symbol` and `time`")


def window_bars(enc) -> int:
    """Bars taken from a dataset before the advised minute (the ``symbol``/``time`` path): the
    encoder's lookback + 1, at least 64 (features such as the natural encoder's warm up on them)."""
    return max(enc.lookback + 1, 64)


def encode_window(m, df) -> tuple[str, str]:
    """(context text, ISO time of the advised minute) for the minute after ``df``'s last bar."""
    enc = m.get_encoder()
    if len(df) < enc.lookback:
        raise AdviceInputError(f"klines: {len(df)} bars given, the model's encoder "
                               f"({enc.name}) needs at least {enc.lookback}")
    full = _with_target_row(df)
    t = len(full) - 1
    context = _encode(enc, full, t)
    missing = df.attrs.get("missing") or {}
    if missing:  # columns the request left out: refuse the ones this encoder reads
        read = []
        for col, (first, where) in missing.items():
            probe = full.copy()
            probe.loc[where, col] = 7  # any other value: the placeholder was 0
            if _encode(enc, probe, t) != context:
                n = len(where)
                read.append(f"{col} (missing from klines[{first}]"
                            f"{f' and {n - 1} more bars' if n > 1 else ''})")
        if read:
            raise AdviceInputError(f"klines: the model's encoder ({enc.name}) reads "
                                   f"{', '.join(read)}: send it for every bar")
    return context, full["open_time"].iloc[t].isoformat()


def _encode(enc, full, t: int) -> str:
    features = enc.compute_features(full) if getattr(enc, "needs_features", False) else None
    return enc.encode(full, np.array([t], dtype=np.int64), features)[0]


def class_probs(resp: dict[str, Any], text: str) -> dict[str, float] | None:
    """P(BUY/NOOP/SELL) from the top log-probs at the token where the advice value starts
    (``atm.prompting.answer.probs_from_top_logprobs``: the one rule eval uses too), rounded for
    the answer; None when the engine gave no log-probs or the position cannot be found."""
    try:
        content = resp["choices"][0]["logprobs"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    probs = probs_from_top_logprobs(content or [], ADVICES)
    return {a: round(v, 6) for a, v in probs.items()} if probs else None


async def advise(request, m, req, settings, call_cancellable) -> dict[str, Any]:
    """Answer one /v1/advice request (see the module docstring)."""
    from atm.prompting.advice import parse_advice
    from atm.serve.engines import EngineError, EngineRequest

    try:
        template = m.template()
        enc = m.get_encoder()
        schema = m.advice_schema()
    except Exception as exc:  # noqa: BLE001 - a model without its metadata is a client-visible 400
        raise AdviceInputError(f"model {m.name!r} cannot give advice: {exc}", "model") from None
    repairs = Repairs()
    df = request_window(req, settings, enc, repairs)
    context, for_time = encode_window(m, df)
    messages = template.render(context)
    ereq = EngineRequest(model=m.name, messages=messages, max_tokens=req.max_tokens, temperature=req.temperature,
                         json_schema=schema, seed=req.seed)
    caps = m.engine.capabilities
    probe = caps.class_probs  # llama-server: exact, after the grammar
    want_logprobs = req.probs and not probe and caps.logprobs and settings.top_logprobs > 0
    if want_logprobs:
        ereq.logprobs = True
        ereq.top_logprobs = settings.top_logprobs
    t0 = time.perf_counter()
    probs = None
    async with m.engine.admit():
        resp = await call_cancellable(request, m.engine.chat(ereq))
        choice = (resp.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") or ""
        key = ADVICE_KEY.search(text)
        if req.probs and probe and key is not None:
            probs = await call_cancellable(request, m.engine.class_probs(messages, text[: key.end()], ADVICES))
    gen_ms = (time.perf_counter() - t0) * 1000
    parsed = parse_advice(text)
    if want_logprobs:
        probs = class_probs(resp, text)
    if not isinstance(resp, dict):  # pragma: no cover - engines return dicts
        raise EngineError("engine returned no response", 502)
    last_open = df["open_time"].iloc[-1]
    return {
        "model": m.name, "time": for_time,
        "last_kline": last_open.isoformat(),
        "advice": parsed.advice, "advice_source": "generated",
        "scored_advice": max(probs, key=probs.get) if probs else None,
        "predicted_open_change": json.loads(text)["predicted_open_change"] if parsed.valid else None,
        "valid": parsed.valid, "reason": parsed.reason, "probs": probs, "raw": text,
        "context": context, "messages": messages,
        "template": template.name, "encoder": enc.config(),
        "finish_reason": choice.get("finish_reason"),
        "usage": resp.get("usage"), "engine_ms": round(gen_ms, 2),
        "repairs": repairs.as_list(),  # what was repaired in the klines sent (as `atm data build` reports it)
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
