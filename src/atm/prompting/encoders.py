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
* ``features-text``: one line of derived features in words and a few numbers (``atm.market.features.
  window_features``: the high, low and close against ``lag`` minutes ago, the last minute's change,
  a volume ratio), e.g. ``vs 10m ago: high -0.27%, low -0.14%, close-high -0.27%, close-low -0.11%,
  last min +0.00%, vol 1.0x``: ~57 tokens with SmolLM2's tokenizer, under 15% of seed-json's.
* ``compact``: ``seed-json``'s information in under half its tokens: one line per column, each
  value a fixed-point integer in a unit shared by the column's window (``open_changes (x0.01):
  -3507 975 ...``). Exact by default: ``decode_compact`` gives back the ``seed-json`` context
  byte for byte (see ``CompactEncoder``).

Speed: nothing here loops over pandas rows. The JSON encoders format each bar's value once
(``format_fixed``: integer arithmetic + pyarrow string kernels, byte-identical to ``'%.8f'``), then
gather each window position with ``take`` and glue the pieces with
``pyarrow.compute.binary_join_element_wise``: no Python object per minute at all.
"""

from __future__ import annotations

import json
from typing import Any, Callable, ClassVar

import numpy as np
from pydantic import Field, field_validator

from atm.config import AtmConfig, validate
from atm.errors import AtmError, ConfigError


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
    return format_fixed(values, precision).to_pylist()


def format_fixed(values: np.ndarray, precision: int):
    """``'%.{precision}f' % v`` for every value, as a pyarrow string array, vectorized.

    Values are scaled to integers (x * 10**p, rounded) and written with pyarrow's C kernels. The
    result is byte-identical to Python's formatting (which rounds the exact binary value half to
    even): values whose scaled fraction lies within a few ulps of .5, values too large for exact
    integers (|x| * 10**p >= 2**52) and non-finite values are formatted by Python instead.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    x = np.asarray(values, dtype=np.float64)
    fmt = f"%.{precision}f"
    if x.size == 0:
        return pa.array([], pa.string())
    scale = 10.0 ** precision
    with np.errstate(invalid="ignore", over="ignore"):
        y = np.abs(x) * scale
        frac = y - np.floor(y)
        risky = ~np.isfinite(y) | (y >= 2.0 ** 52) | (np.abs(frac - 0.5) <= 4 * np.spacing(y))
    ysafe = np.where(risky, 0.0, y)
    r = np.rint(ysafe).astype(np.int64)
    p10 = 10 ** precision
    ip = pc.cast(pa.array(r // p10), pa.string())
    neg = np.signbit(x)
    sign = pa.array(np.where(neg, "-", ""))
    if precision > 0:
        fp = pc.utf8_lpad(pc.cast(pa.array(r % p10), pa.string()), width=precision, padding="0")
        out = pc.binary_join_element_wise(sign, ip, ".", fp, "")
    else:
        out = pc.binary_join_element_wise(sign, ip, "")
    if risky.any():
        idx = np.flatnonzero(risky)
        fixed = pa.array([fmt % v for v in x[idx].tolist()], pa.string())
        out = pc.replace_with_mask(out, pa.array(risky), fixed)
    return out


def _take(arr, idx: np.ndarray):
    import pyarrow as pa

    return arr.take(pa.array(idx, pa.int64()))


def _join_json(columns: list[tuple[str, list]]) -> "object":
    """``{"name": ["v", "v", ...], ...}`` for every row from per-position string arrays, in C.

    ``columns`` is ``[(name, [array_of_value_at_position_0, array_at_position_1, ...]), ...]``;
    the layout is exactly ``json.dumps`` of a dict of string lists.
    """
    import pyarrow.compute as pc

    args: list = []
    for ci, (name, cols) in enumerate(columns):
        args.append(("{" if ci == 0 else "], ") + json.dumps(name) + ": [" + ('"' if cols else ""))
        for k, col in enumerate(cols):
            if k:
                args.append('", "')
            args.append(col)
        if cols:
            args.append('"')
    args.append("]}")
    if not any(not isinstance(x, str) for x in args):  # no values at all
        raise AtmError("a context needs at least one value")
    return pc.binary_join_element_wise(*args, "")


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
def _check_columns(v: list[str]) -> list[str]:
    """Config validator shared by the encoders that take a ``columns`` list."""
    bad = [c for c in v if c not in SERIES]
    if bad or not v:
        raise ValueError(f"unknown columns {bad}; known: {', '.join(SERIES)}")
    return v


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
        """Context text of each minute in ``rows`` (only bars before it)."""
        return self.encode_arrow(df, rows, features).to_pylist()

    def encode_arrow(self, df, rows, features=None):
        """``encode`` as a pyarrow string array (the builder's fast path)."""
        import pyarrow as pa

        return pa.array(self._encode_list(df, rows, features), pa.string())

    def _encode_list(self, df, rows, features=None) -> list[str]:
        raise NotImplementedError

    def compute_features(self, df):
        return None

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
        return self.answer_changes_arrow(df, rows).to_pylist()

    def answer_changes_arrow(self, df, rows):
        vals = self.target_changes(df, rows)
        if self.cfg.target != "compat":  # the schema's pattern has no "-0.00000000"
            vals = np.where(np.abs(vals) < 0.5e-8, 0.0, vals)
        return format_fixed(vals, 8)

    def rejected_changes(self, chosen: list[str]) -> list[str]:
        if self.cfg.rejected_change == "zero":
            return ["0.00000000"] * len(chosen)
        return list(chosen)

    def rejected_changes_arrow(self, chosen):
        import pyarrow as pa

        if self.cfg.rejected_change == "zero":
            return pa.repeat(pa.scalar("0.00000000", pa.string()), len(chosen))
        return chosen


# ------------------------------------------------------------------------------- seed-json
class SeedJsonConfig(EncoderConfig):
    window: int = Field(default=10, ge=1, le=512, description="bars before t in the context (t-window .. t-1)")
    columns: list[str] = Field(default_factory=lambda: ["open_changes", "prev_volumes", "prev_trade_counts"],
                               description=f"context columns, from: {', '.join(SERIES)}")
    precision: int = Field(default=8, ge=0, le=12, description="decimals of every value ('%.Nf')")
    newest_first: bool = Field(default=False, description="order values newest first (the original did)")

    _cols = field_validator("columns")(classmethod(lambda cls, v: _check_columns(v)))


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

    def encode_arrow(self, df, rows, features=None):
        rows = _rows(rows, len(df), self.lookback)
        w = self.cfg.window
        if rows.size == 0:
            import pyarrow as pa

            return pa.array([], pa.string())
        lo = max(0, int(rows.min()) - w)
        hi = int(rows.max())
        r = rows - lo
        order = range(1, w + 1) if self.cfg.newest_first else range(w, 0, -1)
        columns = []
        for c in self.cfg.columns:
            f = format_fixed(_series(df, c)[lo:hi], self.cfg.precision)
            columns.append((c, [_take(f, r - k) for k in order]))
        return _join_json(columns)


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

    def encode_arrow(self, df, rows, features=None):
        rows = _rows(rows, len(df), self.lookback)
        if rows.size == 0:
            import pyarrow as pa

            return pa.array([], pa.string())
        lo = int(rows.min()) - 10
        hi = int(rows.max())
        o = df["open"].to_numpy(dtype=np.float64)[lo:hi]
        # e[j] = open(j-1) - open(j): older minus newer, at bar j (relative to lo); e[0] unused.
        e = np.empty_like(o)
        e[0] = np.nan
        np.subtract(o[:-1], o[1:], out=e[1:])
        p = self.cfg.precision
        ch = format_fixed(e, p)
        vol = format_fixed(df["volume"].to_numpy(dtype=np.float64)[lo:hi], p)
        cnt = format_fixed(df["count"].to_numpy(dtype=np.float64)[lo:hi], p)
        r = rows - lo
        return _join_json([
            ("open_changes", [_take(ch, r - k) for k in range(1, 10)]),        # e[t-1] .. e[t-9]
            ("prev_volumes", [_take(vol, r - k) for k in range(2, 11)]),       # t-2 .. t-10
            ("prev_trade_counts", [_take(cnt, r - k) for k in range(2, 11)]),  # t-2 .. t-10
        ])


# ------------------------------------------------------------------------------- compact
def fixed_point(values: np.ndarray, precision: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The integers ``'%.{precision}f' % v`` writes without its dot, exactly, as int64.

    Returns ``(q, negzero, finite)``: ``q[i]`` is the value in units of ``10**-precision`` rounded
    as Python's ``%`` formatting rounds it (the exact binary value, half to even; the few values
    within ulps of a tie or too large for exact float integers are formatted by Python itself, as
    ``format_fixed`` does); ``negzero`` marks values Python writes ``-0.000..``; ``finite`` is False
    where the value is NaN or infinite (``q`` is 0 there).
    """
    x = np.asarray(values, dtype=np.float64)
    scale = 10.0 ** precision
    finite = np.isfinite(x)
    with np.errstate(invalid="ignore", over="ignore"):
        y = np.abs(x) * scale
        frac = y - np.floor(y)
        risky = finite & ((y >= 2.0 ** 52) | (np.abs(frac - 0.5) <= 4 * np.spacing(y)))
    ok = finite & ~risky
    q = np.zeros(x.shape, dtype=np.int64)
    q[ok] = np.rint(y[ok]).astype(np.int64)
    q = np.where(np.signbit(x), -q, q)
    if risky.any():
        fmt = f"%.{precision}f"
        idx = np.flatnonzero(risky)
        big = [int((fmt % v).replace(".", "")) for v in x.flat[idx].tolist()]
        if max(abs(b) for b in big) >= 2 ** 62:
            raise AtmError(f"a value ({x.flat[idx][np.argmax(np.abs(big))]!r}) is too large for fixed-point "
                           f"integers at {precision} decimals: lower the encoder's precision")
        q.flat[idx] = big
    negzero = finite & np.signbit(x) & (q == 0)
    return q, negzero, finite


def _round_to_unit(Q: np.ndarray, A: np.ndarray, e: np.ndarray) -> np.ndarray:
    """``Q`` (n, w) in units of ``10**e[row]``, rounded half away from zero (``A = |Q|``)."""
    div = (10 ** e)[:, None]
    r = (A + div // 2) // div
    return np.where(Q < 0, -r, r)


def _unit_label(exp: int) -> str:
    """The header of a value line whose integers are in units of 10**exp: '' (units of 1),
    ' (x0.01)', ' (x100)'."""
    if exp == 0:
        return ""
    if exp < 0:
        return f" (x0.{'0' * (-exp - 1)}1)"
    return f" (x1{'0' * exp})"


class CompactConfig(SeedJsonConfig):
    """seed-json's settings (the information carried), plus an optional lossy rounding."""

    digits: int | None = Field(default=None, ge=1, le=12, description="None: exact (seed-json's values to "
                               "`precision` decimals). N: lossy, each column's window rounded to N significant "
                               "digits of its largest |value| (half away from zero)")


class CompactEncoder(SeedJsonEncoder):
    """``seed-json``'s information as fixed-point integers: one short line per column, oldest first::

        open_changes (x0.01): -3507 975 -3274 8303 -1311 1208 -4840 2388 2410 -8758
        prev_volumes (x0.00001): 752711 1623540 1489803 848300 1487260 ...
        prev_trade_counts: 1184 1957 1667 1414 2329 1468 1189 1501 2138 2138

    Same information, exactly: the values are those of ``seed-json`` with the same window, columns,
    order and ``precision`` (``'%.8f'``: every value to 8 decimals). Each column's window is written
    as integers in one unit, the largest power of ten that divides all of its values at that
    precision (BTCUSDT opens move in cents: x0.01; trade counts are whole: no unit; a window of
    round thousands: x1000), so no digit is
    dropped: ``decode_compact(text)`` rebuilds the ``seed-json`` context byte for byte (NaN is
    written ``nan`` and -0 ``-0``, as seed-json writes them). The saving is the padding: seed-json
    spends ~30 digits per minute on trailing zeros, quotes and commas (SmolLM2, Qwen2.5 and Phi-3
    split every digit into its own token).

    Lossy on request: ``digits=N`` writes each column's window in the unit that leaves at most N
    significant digits on its largest |value| (values rounded half away from zero to that unit, so
    every value is within half a unit of seed-json's; where the exact unit is already coarser,
    nothing is rounded). Like seed-json, the text uses only bars before t.
    """

    name = "compact"
    Config = CompactConfig

    def _column_lines(self, df, name: str, lo: int, hi: int, r: np.ndarray):
        import pyarrow as pa
        import pyarrow.compute as pc

        w, p = self.cfg.window, self.cfg.precision
        q, negzero, finite = fixed_point(_series(df, name)[lo:hi], p)
        order = np.arange(1, w + 1) if self.cfg.newest_first else np.arange(w, 0, -1)
        idx = r[:, None] - order[None, :]                                     # (n, w) bars t-k
        Q, NZ, FIN = q[idx], negzero[idx], finite[idx]
        n = len(r)
        # exact unit: the largest 10**e dividing every value of the window (the fewest trailing
        # zeros among them; zeros and NaN do not count; an all-zero window is in units of 1)
        top = 18  # 10**18 is the largest power of ten in int64
        tz = np.full(q.shape, top, dtype=np.int64)
        for k in range(top, 0, -1):
            tz[(q % (10 ** k)) != 0] = k - 1
        tz[q == 0] = top + 1
        e = tz[idx].min(axis=1)
        e = np.where(e > top, p, e)
        if self.cfg.digits is not None:
            mag = np.abs(Q).max(axis=1)
            ndig = np.maximum((mag[:, None] >= 10 ** np.arange(19)[None, :]).sum(axis=1), 1)  # digits of mag
            e = np.maximum(e, ndig - self.cfg.digits)
        A = np.abs(Q)
        ints = _round_to_unit(Q, A, e)
        if self.cfg.digits is not None:  # 99.96 at 0.1 rounds to 1000: one unit coarser there
            up = np.abs(ints).max(axis=1) >= 10 ** self.cfg.digits
            if up.any():
                e = np.where(up, e + 1, e)
                ints = _round_to_unit(Q, A, e)
        # one cast for the whole window; position j is the j-th slice of n (column-major)
        text = pc.cast(pa.array(ints.T.ravel()), pa.string())
        bad = (~FIN | NZ).T.ravel()
        if bad.any():
            fix = np.where(FIN.T.ravel(), "-0", "nan")[bad]
            text = pc.replace_with_mask(text, pa.array(bad), pa.array(fix, pa.string()))
        labels = pa.array([name + _unit_label(k - p) + ":" for k in range(0, 20)], pa.string())  # by e
        line: list = [_take(labels, e)]
        for j in range(w):
            line += [" ", text.slice(j * n, n)]
        return pc.binary_join_element_wise(*line, "")

    def encode_arrow(self, df, rows, features=None):
        import pyarrow as pa
        import pyarrow.compute as pc

        rows = _rows(rows, len(df), self.lookback)
        if rows.size == 0:
            return pa.array([], pa.string())
        lo = max(0, int(rows.min()) - self.cfg.window)
        hi = int(rows.max())
        r = rows - lo
        lines = [self._column_lines(df, c, lo, hi, r) for c in self.cfg.columns]
        if len(lines) == 1:
            return lines[0]
        return pc.binary_join_element_wise(*lines, "\n")


def decode_compact(text: str, precision: int = 8) -> dict[str, list[str]]:
    """The values of a ``compact`` context as ``'%.{precision}f'`` strings, column by column (what
    ``seed-json`` writes: ``json.dumps(decode_compact(c))`` is its context when ``c`` is exact)."""
    from decimal import Decimal

    out: dict[str, list[str]] = {}
    for line in text.split("\n"):
        head, sep, body = line.partition(": ")
        if not sep:
            raise AtmError(f"not a compact context line: {line!r}")
        name, unit = head, Decimal(1)
        if head.endswith(")") and " (x" in head:
            name, u = head[:-1].split(" (x", 1)
            unit = Decimal(u)
        vals = []
        for v in body.split(" "):
            if v == "nan":
                vals.append("nan")
                continue
            vals.append(f"{(Decimal(v) * unit).quantize(Decimal(1).scaleb(-precision)):f}")
        out[name] = vals
    return out


# ------------------------------------------------------------------------------- digits
class DigitsConfig(EncoderConfig):
    window: int = Field(default=16, ge=2, le=512, description="time steps (minutes t-window .. t-1)")
    columns: list[str] = Field(default_factory=lambda: ["close_changes", "prev_volumes", "prev_trade_counts"],
                               description=f"series to encode, from: {', '.join(SERIES)}")
    precision: int = Field(default=2, ge=0, le=4, description="digits kept after scaling")
    quantile: float = Field(default=0.9, gt=0, le=1, description="robust scale: this quantile of |x| in the window maps to 1")
    max_digits: int = Field(default=4, ge=1, le=6, description="scaled values are clipped to this many digits")

    _cols = field_validator("columns")(classmethod(lambda cls, v: _check_columns(v)))


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

    def _encode_list(self, df, rows, features=None) -> list[str]:
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

    def _encode_list(self, df, rows, features=None) -> list[str]:
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


# ------------------------------------------------------------------------------- features-text
class FeaturesTextConfig(EncoderConfig):
    lag: int = Field(default=10, ge=2, le=240, description="minutes back of the reference bar t-lag "
                     "(the seed label's horizon)")
    precision: int = Field(default=2, ge=0, le=6, description="decimals of the percentages")


def _pct(values: np.ndarray, precision: int):
    """``+0.27%`` / ``-0.14%`` strings (a value that rounds to zero is ``+0.00%``), vectorized."""
    import pyarrow as pa
    import pyarrow.compute as pc

    v = np.round(np.asarray(values, dtype=np.float64) * 100.0, precision)
    v = np.where(v == 0, 0.0, v)  # no "-0.00"
    sign = pa.array(np.where(np.signbit(v), "", "+"))
    return pc.binary_join_element_wise(sign, format_fixed(v, precision), "%", "")


class FeaturesTextEncoder(Encoder):
    """The last ``lag`` minutes as one line of derived features, words and a few numbers::

        vs 10m ago: high -0.27%, low -0.14%, close-high -0.27%, close-low -0.11%, last min +0.00%, vol 1.0x

    ``high`` = high(t-1) / high(t-lag) - 1, ``low`` = low(t-1) / low(t-lag) - 1, ``close-high`` /
    ``close-low`` = close(t-1) against high(t-lag) / low(t-lag), ``last min`` = close(t-1) /
    close(t-2) - 1, ``vol`` = volume(t-1) over the window's mean volume. The values come from
    ``atm.market.features.window_features`` (the classic models can be given exactly these numbers:
    ``compute_features``). Only bars before t are used. About 57 tokens with SmolLM2's tokenizer
    (digits split), against seed-json's 421.
    """

    name = "features-text"
    Config = FeaturesTextConfig
    needs_features = True

    @property
    def lookback(self) -> int:
        return self.cfg.lag

    def compute_features(self, df):
        from atm.market.features import window_features

        return window_features(df, lag=self.cfg.lag)

    def columns(self, features=None) -> list[str]:
        from atm.market.features import WINDOW_FEATURES

        return list(WINDOW_FEATURES)

    def encode_arrow(self, df, rows, features=None):
        import pyarrow as pa
        import pyarrow.compute as pc

        rows = _rows(rows, len(df), self.lookback)
        if rows.size == 0:
            return pa.array([], pa.string())
        if features is None:
            features = self.compute_features(df)
        missing = [c for c in self.columns() if c not in features.columns]
        if missing:
            raise AtmError(f"features frame lacks {missing}; it has {list(features.columns)}")
        p = self.cfg.precision

        def col(name):
            return features[name].to_numpy(dtype=np.float64)[rows]

        vol = np.round(col("vol_ratio"), 1)
        return pc.binary_join_element_wise(
            f"vs {self.cfg.lag}m ago: high ", _pct(col("win_high"), p),
            ", low ", _pct(col("win_low"), p),
            ", close-high ", _pct(col("win_close_high"), p),
            ", close-low ", _pct(col("win_close_low"), p),
            ", last min ", _pct(col("last_ret"), p),
            ", vol ", format_fixed(vol, 1), "x", "")


# ------------------------------------------------------------------------------- registry
ENCODERS: dict[str, type[Encoder]] = {}


def register_encoder(cls: type[Encoder]) -> type[Encoder]:
    ENCODERS[cls.name] = cls
    return cls


for _cls in (SeedJsonEncoder, SeedJsonCompatEncoder, CompactEncoder, NaturalEncoder, DigitsEncoder,
             FeaturesTextEncoder):
    register_encoder(_cls)


def get_encoder(name: str, **cfg: Any) -> Encoder:
    """An encoder by name with its settings (unknown settings are rejected)."""
    cls = ENCODERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown encoder {name!r}; available: {', '.join(sorted(ENCODERS))}")
    return cls(**cfg)
