"""Market context encoders: the text a model sees for minute t, built only from bars before t.

Pluggable by name (``get_encoder("seed-json", window=10)``; ``register_encoder`` adds one):

* ``seed-json``: the original experiment's JSON context, corrected: oldest to newest, changes are
  newer minus older, minute t-1 included; every column has ``window`` values for the same minutes.
* ``seed-json-compat``: the original byte for byte (for replication): 9 values each, newest first,
  ``open_changes[i] = open(t-i-2) - open(t-i-1)``, volumes and trade counts of t-2..t-10 (t-1 is
  left out), ``'%.8f'`` strings; its answer's change is open(t) - open(t-10) and its rejected
  answer's change is always ``"0.00000000"``.
* ``natural``: about 15 features from ``atm.market.features`` as short phrases with numbers.
* ``digits``: LLMTime style: each column scaled by a robust quantile of its window, fixed
  precision, digits separated by spaces, time steps separated by commas.

Speed: nothing here loops over pandas rows. Each per-bar value is formatted once; a window's text
is then a slice of one long string in which the formatted bars sit back to back (a window is a
contiguous run of bars), so building a context costs a few string slices per minute.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import numpy as np
from pydantic import Field, field_validator

from atm.config import AtmConfig, validate
from atm.errors import AtmError, ConfigError

ADVICES = ("BUY", "NOOP", "SELL")

# Context column name -> (kline column, transform). "diff": x[i] - x[i-1] (newer minus older).
SERIES: dict[str, tuple[str, str]] = {
    "open_changes": ("open", "diff"),
    "high_changes": ("high", "diff"),
    "low_changes": ("low", "diff"),
    "close_changes": ("close", "diff"),
    "prev_opens": ("open", "level"),
    "prev_closes": ("close", "level"),
    "prev_volumes": ("volume", "level"),
    "prev_quote_volumes": ("quote_volume", "level"),
    "prev_trade_counts": ("count", "level"),
    "prev_taker_buy_volumes": ("taker_buy_volume", "level"),
}


# ------------------------------------------------------------------------------- helpers
def format_values(values: np.ndarray, precision: int) -> list[str]:
    """``'%.{precision}f'`` of every value (NaN -> 'nan'), exactly as Python formats it."""
    fmt = f"%.{precision}f"
    return [fmt % v for v in np.asarray(values, dtype=np.float64).tolist()]


class _Strip:
    """Per-bar strings laid back to back in one string; ``window(t, w)`` slices ``w`` of them.

    Oldest-first: pieces are ``'"s_i", '`` for i = 0..n-1 and the window of bars [a, b) is
    ``text[off[a] : off[b] - len(sep)]``. Newest-first uses the pieces in reverse order.
    """

    def __init__(self, strings: list[str], quote: str = '"', sep: str = ", ", newest_first: bool = False):
        self.n = len(strings)
        self.sep = sep
        self.newest_first = newest_first
        pieces = [f"{quote}{s}{quote}{sep}" for s in (reversed(strings) if newest_first else strings)]
        lens = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=self.n)
        self.off = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(lens, out=self.off[1:])
        self.text = "".join(pieces)

    def bounds(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slice bounds (start, stop) of bars [a, b) for arrays a, b (in bar order given)."""
        if self.newest_first:  # bar i sits at reversed position n-1-i; window [a,b) -> [n-b, n-a)
            a, b = self.n - b, self.n - a
        return self.off[a], self.off[b] - len(self.sep)

    def windows(self, a: np.ndarray, b: np.ndarray) -> list[str]:
        start, stop = self.bounds(a, b)
        text = self.text
        return [text[s:e] for s, e in zip(start.tolist(), stop.tolist())]


def _series(df, name: str) -> np.ndarray:
    if name not in SERIES:
        raise ConfigError(f"unknown context column {name!r}; known: {', '.join(SERIES)}")
    col, transform = SERIES[name]
    if col not in df.columns:
        raise AtmError(f"klines frame has no column {col!r} (needed for {name!r})")
    x = df[col].to_numpy(dtype=np.float64)
    if transform == "diff":
        d = np.empty_like(x)
        d[0] = np.nan
        np.subtract(x[1:], x[:-1], out=d[1:])
        return d
    return x


def _rows(rows, n: int, lookback: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and (rows.min() < lookback or rows.max() >= n):
        bad = rows[(rows < lookback) | (rows >= n)][0]
        raise AtmError(f"row {bad} has no full lookback of {lookback} bars (or is past the data; {n} rows)")
    return rows


# ------------------------------------------------------------------------------- base class
class EncoderConfig(AtmConfig):
    """Settings shared by every encoder."""

    target: str = Field(default="next", description="predicted change in the answer: 'next' = open(t+1) - open(t), "
                        "'horizon' = open(t+horizon) - open(t), 'compat' = open(t) - open(t-10) (the original)")
    horizon: int = Field(default=10, ge=1, description="minutes for target='horizon'")
    rejected_change: str = Field(default="same", description="change in a rejected answer: 'same' as the chosen "
                                 "one (pairs differ only in advice) or 'zero' (the original's '0.00000000')")

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if v not in ("next", "horizon", "compat"):
            raise ValueError("target must be next, horizon or compat")
        return v

    @field_validator("rejected_change")
    @classmethod
    def _rej(cls, v: str) -> str:
        if v not in ("same", "zero"):
            raise ValueError("rejected_change must be same or zero")
        return v


class Encoder:
    """Base: ``encode(df, rows, features) -> list[str]``, answers' changes, config."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[EncoderConfig]] = EncoderConfig
    needs_features: ClassVar[bool] = False

    def __init__(self, **cfg: Any):
        self.cfg = validate(self.Config, cfg, source=f"encoder {self.name!r}")

    @property
    def lookback(self) -> int:
        """Bars needed before t (the first encodable row)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.cfg.to_dict()}

    def encode(self, df, rows, features=None) -> list[str]:
        raise NotImplementedError

    # -- the answer's predicted change (label side: may look ahead, never part of the context)
    def target_changes(self, df, rows) -> np.ndarray:
        """Float predicted change for each row (NaN where it runs past the data)."""
        o = df["open"].to_numpy(dtype=np.float64)
        rows = np.asarray(rows, dtype=np.int64)
        n = len(o)
        out = np.full(rows.shape, np.nan)
        if self.cfg.target == "compat":
            ok = rows >= 10
            out[ok] = o[rows[ok]] - o[rows[ok] - 10]
        else:
            h = 1 if self.cfg.target == "next" else self.cfg.horizon
            ok = rows + h < n
            out[ok] = o[rows[ok] + h] - o[rows[ok]]
        return out

    def answer_changes(self, df, rows) -> list[str]:
        """The chosen answer's ``predicted_open_change`` strings ('%.8f'; -0 -> 0 except compat)."""
        vals = self.target_changes(df, rows)
        out = format_values(vals, 8)
        if self.cfg.target != "compat":
            out = ["0.00000000" if s == "-0.00000000" else s for s in out]
        return out

    def rejected_changes(self, chosen: list[str]) -> list[str]:
        if self.cfg.rejected_change == "zero":
            return ["0.00000000"] * len(chosen)
        return list(chosen)


# ------------------------------------------------------------------------------- seed-json
class SeedJsonConfig(EncoderConfig):
    window: int = Field(default=10, ge=1, le=512, description="bars before t in the context (t-window .. t-1)")
    columns: list[str] = Field(default_factory=lambda: ["open_changes", "prev_volumes", "prev_trade_counts"],
                               description=f"context columns, from: {', '.join(SERIES)}")
    precision: int = Field(default=8, ge=0, le=12, description="decimals of every value ('%.Nf')")
    newest_first: bool = Field(default=False, description="order values newest first (the original did)")

    @field_validator("columns")
    @classmethod
    def _cols(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in SERIES]
        if bad or not v:
            raise ValueError(f"unknown columns {bad}; known: {', '.join(SERIES)}")
        return v


class SeedJsonEncoder(Encoder):
    """``{"open_changes": [...], "prev_volumes": [...], "prev_trade_counts": [...]}``, oldest first.

    Every column holds ``window`` values for minutes t-window .. t-1 (a change at minute i is
    x(i) - x(i-1)), as ``'%.8f'`` strings, laid out like ``json.dumps`` would.
    """

    name = "seed-json"
    Config = SeedJsonConfig

    @property
    def lookback(self) -> int:
        diff = any(SERIES[c][1] == "diff" for c in self.cfg.columns)
        return self.cfg.window + (1 if diff else 0)

    def encode(self, df, rows, features=None) -> list[str]:
        rows = _rows(rows, len(df), self.lookback)
        if rows.size == 0:
            return []
        w = self.cfg.window
        lo = max(0, int(rows.min()) - w)
        hi = int(rows.max())
        cols = []
        for c in self.cfg.columns:
            vals = _series(df, c)[lo:hi]
            strip = _Strip(format_values(vals, self.cfg.precision), newest_first=self.cfg.newest_first)
            cols.append(strip.windows(rows - w - lo, rows - lo))
        keys = [f'"{c}": [' for c in self.cfg.columns]
        if len(cols) == 3:  # the common case, without the generic join
            k0, k1, k2 = keys
            return ["{" + k0 + a + "], " + k1 + b + "], " + k2 + c + "]}" for a, b, c in zip(*cols)]
        return ["{" + ", ".join(k + v + "]" for k, v in zip(keys, vals)) + "}" for vals in zip(*cols)]


class SeedJsonCompatConfig(EncoderConfig):
    target: str = Field(default="compat", description="the original's answer change: open(t) - open(t-10)")
    rejected_change: str = Field(default="zero", description="the original's rejected change: always '0.00000000'")
    precision: int = Field(default=8, ge=0, le=12, description="decimals ('%.8f' in the original)")


class SeedJsonCompatEncoder(Encoder):
    """The original experiment's context, byte for byte (see the module docstring)."""

    name = "seed-json-compat"
    Config = SeedJsonCompatConfig

    @property
    def lookback(self) -> int:
        return 10

    def encode(self, df, rows, features=None) -> list[str]:
        rows = _rows(rows, len(df), self.lookback)
        if rows.size == 0:
            return []
        lo = int(rows.min()) - 10
        hi = int(rows.max())
        o = df["open"].to_numpy(dtype=np.float64)[lo:hi]
        # e[j] = open(j-1) - open(j): older minus newer, at bar j (rel. to lo); e[0] unused.
        e = np.empty_like(o)
        e[0] = np.nan
        np.subtract(o[:-1], o[1:], out=e[1:])
        p = self.cfg.precision
        ch = _Strip(format_values(e, p), newest_first=True)
        vol = _Strip(format_values(df["volume"].to_numpy(dtype=np.float64)[lo:hi], p), newest_first=True)
        cnt = _Strip(format_values(df["count"].to_numpy(dtype=np.float64)[lo:hi], p), newest_first=True)
        r = rows - lo
        a = ch.windows(r - 9, r)          # e[t-9] .. e[t-1], newest first
        b = vol.windows(r - 10, r - 1)    # volume t-10 .. t-2, newest first
        c = cnt.windows(r - 10, r - 1)
        return ['{"open_changes": [' + x + '], "prev_volumes": [' + y + '], "prev_trade_counts": [' + z + "]}"
                for x, y, z in zip(a, b, c)]


# ------------------------------------------------------------------------------- digits
class DigitsConfig(EncoderConfig):
    window: int = Field(default=16, ge=2, le=512, description="time steps (minutes t-window .. t-1)")
    columns: list[str] = Field(default_factory=lambda: ["close_changes", "prev_volumes", "prev_trade_counts"],
                               description=f"series to encode, from: {', '.join(SERIES)}")
    precision: int = Field(default=2, ge=0, le=4, description="digits kept after scaling")
    quantile: float = Field(default=0.9, gt=0, le=1, description="robust scale: this quantile of |x| in the window maps to 1")
    max_digits: int = Field(default=4, ge=1, le=6, description="scaled values are clipped to this many digits")

    @field_validator("columns")
    @classmethod
    def _cols(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in SERIES]
        if bad or not v:
            raise ValueError(f"unknown columns {bad}; known: {', '.join(SERIES)}")
        return v


class DigitsEncoder(Encoder):
    """LLMTime-style digits: one line per series, ``name (x SCALE): 1 2 , - 4 , 0 , ...``.

    Each series is divided by the ``quantile`` of its absolute values over the window itself (so
    only bars before t are used), rounded to ``precision`` decimals, written without the decimal
    point with its digits separated by spaces; time steps (oldest first) are separated by " , ".
    """

    name = "digits"
    Config = DigitsConfig

    @property
    def lookback(self) -> int:
        diff = any(SERIES[c][1] == "diff" for c in self.cfg.columns)
        return self.cfg.window + (1 if diff else 0)

    def _table(self) -> tuple[list[str], int]:
        m = 10 ** self.cfg.max_digits - 1
        table = []
        for v in range(-m, m + 1):
            s = " ".join(str(abs(v)))
            table.append(("- " + s) if v < 0 else s)
        return table, m

    def encode(self, df, rows, features=None) -> list[str]:
        rows = _rows(rows, len(df), self.lookback)
        if rows.size == 0:
            return []
        from numpy.lib.stride_tricks import sliding_window_view

        w, p = self.cfg.window, self.cfg.precision
        table, m = self._table()
        table_arr = np.asarray(table, dtype=object)
        lines_per_col = []
        for c in self.cfg.columns:
            x = _series(df, c)
            win = sliding_window_view(x, w)[rows - w]                  # (n, w): bars t-w .. t-1
            scale = np.quantile(np.abs(win), self.cfg.quantile, axis=1)
            scale = np.where((scale > 0) & np.isfinite(scale), scale, 1.0)
            ints = np.clip(np.rint(win / scale[:, None] * 10**p), -m, m).astype(np.int64)
            toks = table_arr[ints + m]                                     # (n, w) of digit strings
            sc = format_values(scale, 6)
            head = f"{c} (x "
            lines_per_col.append([head + s + "): " + " , ".join(t) for s, t in zip(sc, toks.tolist())])
        return ["\n".join(parts) for parts in zip(*lines_per_col)]


# ------------------------------------------------------------------------------- natural
class NaturalConfig(EncoderConfig):
    features: list[str] | None = Field(default=None, description="feature columns to describe, in order "
                                       "(None = the default 16: returns, volatility, volume, RSI, MACD, ...)")
    precision: int = Field(default=3, ge=0, le=8, description="decimals of the numbers in the phrases")
    feature_config: dict[str, Any] = Field(default_factory=dict,
                                           description="atm.market.features.FeatureConfig settings (windows)")


class NaturalEncoder(Encoder):
    """Market state in words: ~15 features (``atm.market.features``), each a phrase with its number.

    One line per feature, e.g. ``return over the last 5 minutes: down -0.041%`` or
    ``RSI(14): overbought (72.412)``. The phrase rules live in ``PHRASES`` (feature column ->
    describer); a column not in it is written ``name: value``. Features of minute t only use bars
    before t (``compute_features`` shifts them), so neither does this text.
    """

    name = "natural"
    Config = NaturalConfig
    needs_features = True

    def feature_config(self):
        from atm.market.features import FeatureConfig

        return validate(FeatureConfig, dict(self.cfg.feature_config), source="natural.feature_config")

    @property
    def lookback(self) -> int:
        return int(self.feature_config().warmup())

    def compute_features(self, df):
        from atm.market.features import compute_features

        return compute_features(df, self.feature_config())

    def columns(self, features=None) -> list[str]:
        if self.cfg.features:
            return list(self.cfg.features)
        return [c for c in DEFAULT_NATURAL if features is None or c in features.columns]

    def encode(self, df, rows, features=None) -> list[str]:
        rows = _rows(rows, len(df), self.lookback)
        if features is None:
            features = self.compute_features(df)
        cols = self.columns(features)
        missing = [c for c in cols if c not in features.columns]
        if missing:
            raise AtmError(f"features frame lacks {missing}; it has {list(features.columns)}")
        parts = []
        for c in cols:
            vals = features[c].to_numpy(dtype=np.float64)[rows]
            describe = PHRASES.get(c, _generic(c))
            parts.append(describe(vals, self.cfg.precision))
        return ["\n".join(p) for p in zip(*parts)]


def _signed(strings: list[str]) -> list[str]:
    return [s if s.startswith("-") else "+" + s for s in strings]


def _generic(name: str) -> Callable[[np.ndarray, int], list[str]]:
    label = name.replace("_", " ")

    def f(v: np.ndarray, p: int) -> list[str]:
        return [f"{label}: {s}" for s in format_values(v, p)]
    return f


def _ret(label: str) -> Callable[[np.ndarray, int], list[str]]:
    def f(v: np.ndarray, p: int) -> list[str]:
        word = np.where(v > 0, "up", np.where(v < 0, "down", "flat")).tolist()
        return [f"{label}: {w} {s}%" for w, s in zip(word, _signed(format_values(v * 100, p)))]
    return f


def _bands(label: str, lo: float, hi: float, low_word: str, mid_word: str, high_word: str,
           scale: float = 1.0, fmt: str = "({s})", signed: bool = False) -> Callable[[np.ndarray, int], list[str]]:
    """``label: word (number)`` with word by thresholds (<= lo, between, >= hi) on the raw value."""
    def f(v: np.ndarray, p: int) -> list[str]:
        word = np.where(v >= hi, high_word, np.where(v <= lo, low_word, mid_word)).tolist()
        nums = format_values(v * scale, p)
        if signed:
            nums = _signed(nums)
        return [f"{label}: {w} " + fmt.format(s=s) for w, s in zip(word, nums)]
    return f


# Phrase rules for atm.market.features columns (see FeatureConfig.names()). Thresholds are the
# textbook ones (RSI 30/70, CCI +-100, %B 0.2/0.8) or plain round numbers (z-scores +-1).
PHRASES: dict[str, Callable[[np.ndarray, int], list[str]]] = {
    "ret_1": _ret("return over the last 1 minute"),
    "ret_5": _ret("return over the last 5 minutes"),
    "ret_15": _ret("return over the last 15 minutes"),
    "ret_60": _ret("return over the last 60 minutes"),
    "vol": _bands("volatility (std of 1-minute returns)", 0.0003, 0.001, "low", "moderate", "high",
                  scale=100.0, fmt="({s}% per minute)"),
    "vol_regime": _bands("volatility regime (short vs long window)", -0.25, 0.25, "calmer than usual",
                         "normal", "more volatile than usual", fmt="(log ratio {s})", signed=True),
    "volume_z": _bands("volume vs its norm", -1.0, 1.0, "below normal", "normal", "above normal",
                       fmt="(z-score {s})", signed=True),
    "count_z": _bands("trade count vs its norm", -1.0, 1.0, "below normal", "normal", "above normal",
                      fmt="(z-score {s})", signed=True),
    "taker_buy_ratio": _bands("taker-buy pressure", 0.45, 0.55, "sellers dominate", "balanced",
                              "buyers dominate", scale=100.0, fmt="({s}% of volume bought by takers)"),
    "rsi": _bands("RSI(14)", 30.0, 70.0, "oversold", "neutral", "overbought"),
    "macd_hist": _bands("MACD histogram", -1e-12, 1e-12, "bearish", "flat", "bullish", scale=100.0,
                        fmt="({s}% of price)", signed=True),
    "bb_pos": _bands("Bollinger position", 0.2, 0.8, "near the lower band", "mid-band", "near the upper band"),
    "cci": _bands("CCI(20)", -100.0, 100.0, "strongly below average", "neutral", "strongly above average"),
    "range_pos": _bands("position in the 60-minute range", 0.2, 0.8, "near the low", "mid-range", "near the high"),
    "ema_gap": _bands("price vs its 30-minute EMA", -1e-12, 1e-12, "below", "at", "above", scale=100.0,
                      fmt="({s}%)", signed=True),
    "ema_slope": _bands("30-minute EMA trend", -1e-12, 1e-12, "falling", "flat", "rising", scale=100.0,
                        fmt="({s}% over 5 minutes)", signed=True),
}
DEFAULT_NATURAL: list[str] = list(PHRASES)


# ------------------------------------------------------------------------------- registry
ENCODERS: dict[str, type[Encoder]] = {}


def register_encoder(cls: type[Encoder]) -> type[Encoder]:
    ENCODERS[cls.name] = cls
    return cls


for _cls in (SeedJsonEncoder, SeedJsonCompatEncoder, NaturalEncoder, DigitsEncoder):
    register_encoder(_cls)


def get_encoder(name: str, **cfg: Any) -> Encoder:
    """An encoder by name with its settings (unknown settings are rejected)."""
    cls = ENCODERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown encoder {name!r}; available: {', '.join(sorted(ENCODERS))}")
    return cls(**cfg)
