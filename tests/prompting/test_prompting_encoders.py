"""Encoders on real rows of the shipped BTCUSDT sample: golden contexts, the original's bytes, no leakage."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from leakage import perturb_from, raw_sample_frame, raw_sample_rows

from atm.errors import ConfigError
from atm.prompting.encoders import ENCODERS, get_encoder
from atm.prompting.template import Template

ZIPS = sorted((Path(__file__).resolve().parents[2] / "datasets/samples/binance/data/spot/daily/klines/BTCUSDT/1m")
              .glob("*.zip"))


@pytest.fixture(scope="module")
def df():
    return raw_sample_frame(ZIPS)


@pytest.fixture(scope="module")
def raw():
    """The CSV rows as strings (zipfile only): the hand-computation source."""
    rows = []
    for z in ZIPS:
        rows += raw_sample_rows(z)
    return rows


def _d8(x: Decimal) -> str:
    s = f"{x.quantize(Decimal('0.00000001')):f}"
    return "0.00000000" if s == "-0.00000000" else s


# Hand-computed from the first CSV lines of BTCUSDT-1m-2025-08-01.zip: opens 115764.07, 115729.0,
# 115738.75, ... ; minute t=11's context covers minutes 1..10 (t-10 .. t-1), changes newer - older.
GOLDEN_SEED_JSON_11 = (
    '{"open_changes": ["-35.07000000", "9.75000000", "-32.74000000", "83.03000000", "-13.11000000", '
    '"12.08000000", "-48.40000000", "23.88000000", "24.10000000", "-87.58000000"], '
    '"prev_volumes": ["7.52711000", "16.23540000", "14.89803000", "8.48300000", "14.87260000", '
    '"18.66757000", "12.05106000", "10.22505000", "13.03971000", "15.90081000"], '
    '"prev_trade_counts": ["1184.00000000", "1957.00000000", "1667.00000000", "1414.00000000", '
    '"2329.00000000", "1468.00000000", "1189.00000000", "1501.00000000", "2138.00000000", "2138.00000000"]}')


def test_seed_json_golden_row(df, raw):
    enc = get_encoder("seed-json")
    assert enc.lookback == 11
    (ctx,) = enc.encode(df, np.array([11]))
    assert ctx == GOLDEN_SEED_JSON_11
    assert json.loads(ctx)["open_changes"][0] == _d8(Decimal(raw[1][1]) - Decimal(raw[0][1]))
    # answer: the next minute's change open(t+1) - open(t)
    assert enc.answer_changes(df, np.array([11])) == [_d8(Decimal(raw[12][1]) - Decimal(raw[11][1]))]


@pytest.mark.parametrize("t", [11, 12, 1439, 1440, 1441, 7000, 14400])
def test_seed_json_matches_decimal_hand_computation(df, raw, t):
    (ctx,) = get_encoder("seed-json").encode(df, np.array([t]))
    obj = json.loads(ctx)
    assert obj["open_changes"] == [_d8(Decimal(raw[i][1]) - Decimal(raw[i - 1][1])) for i in range(t - 10, t)]
    assert obj["prev_volumes"] == [_d8(Decimal(raw[i][5])) for i in range(t - 10, t)]
    assert obj["prev_trade_counts"] == [_d8(Decimal(raw[i][8])) for i in range(t - 10, t)]
    assert ctx == json.dumps(obj)  # laid out exactly as json.dumps would


def test_seed_json_config_window_columns_precision(df, raw):
    enc = get_encoder("seed-json", window=3, columns=["close_changes", "prev_quote_volumes"], precision=2,
                      newest_first=True)
    (ctx,) = enc.encode(df, np.array([100]))
    obj = json.loads(ctx)
    assert list(obj) == ["close_changes", "prev_quote_volumes"]
    assert obj["close_changes"] == [f"{Decimal(raw[i][4]) - Decimal(raw[i - 1][4]):.2f}" for i in (99, 98, 97)]
    assert obj["prev_quote_volumes"] == ["%.2f" % float(raw[i][7]) for i in (99, 98, 97)]
    with pytest.raises(ConfigError):
        get_encoder("seed-json", columns=["nope"])
    with pytest.raises(ConfigError):
        get_encoder("seed-json", windwo=3)
    with pytest.raises(ConfigError, match="unknown encoder"):
        get_encoder("json-seed")


def original_context(rows: list[list[str]], t: int) -> tuple[str, str]:
    """The original experiment's algorithm, written independently: the previous 10 rows newest
    first; 9 open changes older minus newer; volumes and trade counts of the 9 older rows (t-1 is
    left out); '%.8f' strings; json.dumps. Its answer change: open(t) - open(t-10)."""
    prev = rows[t - 10:t][::-1]  # t-1, t-2, ..., t-10
    opens = [float(r[1]) for r in prev]
    ctx = {"open_changes": ["%.8f" % (opens[i + 1] - opens[i]) for i in range(9)],
           "prev_volumes": ["%.8f" % float(r[5]) for r in prev[1:]],
           "prev_trade_counts": ["%.8f" % float(r[8]) for r in prev[1:]]}
    return json.dumps(ctx), "%.8f" % (float(rows[t][1]) - float(rows[t - 10][1]))


def test_compat_reproduces_the_original_bytes(df, raw):
    enc = get_encoder("seed-json-compat")
    rows = np.array([10, 11, 12, 500, 1439, 1440, 1450, 9999, 14400] + list(range(20, 14401, 997)))
    ctxs = enc.encode(df, rows)
    changes = enc.answer_changes(df, rows)
    for t, ctx, ch in zip(rows.tolist(), ctxs, changes):
        want_ctx, want_ch = original_context(raw, t)
        assert ctx == want_ctx, t
        assert ch == want_ch, t
    assert enc.rejected_changes(changes) == ["0.00000000"] * len(changes)
    # and the hand-checked first value of row 10: open(8) - open(9), older minus newer
    assert json.loads(ctxs[0])["open_changes"][0] == _d8(Decimal(raw[8][1]) - Decimal(raw[9][1]))


def test_digits_golden(df):
    enc = get_encoder("digits", window=4, columns=["prev_volumes"], precision=2, quantile=0.9)
    (ctx,) = enc.encode(df, np.array([5]))
    # volumes of minutes 1..4: 7.52711, 16.2354, 14.89803, 8.483; the 0.9 quantile (linear) of them is
    # 14.89803 + 0.7 * (16.2354 - 14.89803) = 15.834189; x / q * 100 rounded: 48, 103, 94, 54.
    assert ctx == "prev_volumes (x 15.834189): 4 8 , 1 0 3 , 9 4 , 5 4"
    (ctx,) = get_encoder("digits", window=2, columns=["open_changes"], precision=1).encode(df, np.array([3]))
    # changes at minutes 1, 2: -35.07, 9.75; q0.9 = 9.75 + 0.9 * (35.07 - 9.75) = 32.538;
    # -35.07 / 32.538 * 10 = -10.78 -> -11, 9.75 / 32.538 * 10 = 3.0 -> 3
    assert ctx == "open_changes (x 32.538000): - 1 1 , 3"


def test_natural_golden(df, raw):
    enc = get_encoder("natural")
    t = 500
    (ctx,) = enc.encode(df, np.array([t]))
    lines = ctx.split("\n")
    assert len(lines) == 16
    r1 = math.log(float(raw[t - 1][4]) / float(raw[t - 2][4])) * 100
    r5 = math.log(float(raw[t - 1][4]) / float(raw[t - 6][4])) * 100
    word = lambda x: "up" if x > 0 else "down"  # noqa: E731
    assert lines[0] == f"return over the last 1 minute: {word(r1)} {r1:+.3f}%"
    assert lines[1] == f"return over the last 5 minutes: {word(r5)} {r5:+.3f}%"
    tb = float(raw[t - 1][9]) / float(raw[t - 1][5]) * 100
    side = "buyers dominate" if tb >= 55 else "sellers dominate" if tb <= 45 else "balanced"
    assert f"taker-buy pressure: {side} ({tb:.3f}% of volume bought by takers)" in lines
    assert any(line.startswith("RSI(14): ") for line in lines)
    with pytest.raises(Exception, match="lookback"):
        enc.encode(df, np.array([enc.lookback - 1]))


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_no_leakage_into_prompts(df, name):
    """Change every bar from t on: contexts and rendered prompts of minutes <= t do not move."""
    enc = get_encoder(name)
    template = Template.load("seed")
    for t in (enc.lookback + 5, 3000, 14000):
        changed = perturb_from(df, t, seed=t)
        rows = np.arange(max(enc.lookback, t - 40), t + 1)
        a = enc.encode(df, rows)
        b = enc.encode(changed, rows)
        assert a == b, (name, t)
        assert [template.render(x) for x in a] == [template.render(x) for x in b]
        # and the future is really in play: the minute after t sees the change
        assert enc.encode(df, [t + 1]) != enc.encode(changed, [t + 1])


def test_encoders_are_vectorized_over_rows(df):
    """Many rows at once give exactly what one row at a time gives."""
    for name in sorted(ENCODERS):
        enc = get_encoder(name)
        rows = np.array([enc.lookback, enc.lookback + 1, 5000, 14399])
        assert enc.encode(df, rows) == [enc.encode(df, [r])[0] for r in rows]


# ------------------------------------------------------------------------------- compact
# The same minute as GOLDEN_SEED_JSON_11, written by hand from those values: BTCUSDT opens move in
# cents, volumes have 5 decimals, trade counts are whole.
GOLDEN_COMPACT_11 = (
    "open_changes (x0.01): -3507 975 -3274 8303 -1311 1208 -4840 2388 2410 -8758\n"
    "prev_volumes (x0.00001): 752711 1623540 1489803 848300 1487260 1866757 1205106 1022505 1303971 1590081\n"
    "prev_trade_counts: 1184 1957 1667 1414 2329 1468 1189 1501 2138 2138")

BNB_ZIPS = sorted((ZIPS[0].parents[2] / "BNBBTC" / "1m").glob("*.zip"))


def test_compact_golden_row_and_deterministic(df):
    from atm.prompting.encoders import decode_compact

    enc = get_encoder("compact")
    assert enc.lookback == 11
    (ctx,) = enc.encode(df, np.array([11]))
    assert ctx == GOLDEN_COMPACT_11
    assert json.dumps(decode_compact(ctx)) == GOLDEN_SEED_JSON_11
    rows = np.arange(11, 2000, 7)
    assert enc.encode(df, rows) == get_encoder("compact").encode(df, rows)  # same text every time
    # the answer is seed-json's (the schema's 8-decimal change)
    assert enc.answer_changes(df, rows) == get_encoder("seed-json").answer_changes(df, rows)


@pytest.mark.parametrize("cfg", [
    {},
    {"window": 3, "columns": ["close_changes", "prev_quote_volumes"], "precision": 2, "newest_first": True},
    {"window": 20, "columns": ["high_changes", "low_changes", "prev_opens", "prev_taker_buy_volumes"]},
    {"precision": 0},
])
@pytest.mark.parametrize("symbol", ["BTCUSDT", "BNBBTC"])
def test_compact_carries_exactly_the_seed_json_information(df, symbol, cfg):
    """Every minute of both shipped samples (prices in cents / in 1e-6 BTC): the seed-json context
    with the same settings is rebuilt from the compact one, byte for byte."""
    from atm.prompting.encoders import decode_compact

    frame = df if symbol == "BTCUSDT" else raw_sample_frame(BNB_ZIPS)
    compact, seed = get_encoder("compact", **cfg), get_encoder("seed-json", **cfg)
    rows = np.arange(seed.lookback, len(frame))
    a, b = compact.encode(frame, rows), seed.encode(frame, rows)
    bad = [i for i, (x, y) in enumerate(zip(a, b)) if json.dumps(decode_compact(x, compact.cfg.precision)) != y]
    assert not bad, (a[bad[0]], b[bad[0]])
    if not cfg:  # the default: '%.8f' pads every value; characters alone drop by half
        assert sum(map(len, a)) < 0.55 * sum(map(len, b))


def test_compact_lossy_digits_stays_within_half_a_unit(df):
    from atm.prompting.encoders import decode_compact

    enc = get_encoder("compact", digits=3)
    (ctx,) = enc.encode(df, np.array([11]))
    # 3 significant digits of each column's largest |value| (87.58, 18.66757, 2329)
    assert ctx == ("open_changes (x0.1): -351 98 -327 830 -131 121 -484 239 241 -876\n"
                   "prev_volumes (x0.1): 75 162 149 85 149 187 121 102 130 159\n"
                   "prev_trade_counts (x10): 118 196 167 141 233 147 119 150 214 214")
    rows = np.arange(11, len(df), 13)
    seed = get_encoder("seed-json").encode(df, rows)
    for c, s in zip(enc.encode(df, rows), seed):
        exact = json.loads(s)
        for line, (name, vals) in zip(c.split("\n"), decode_compact(c).items()):
            unit = Decimal(line.split(" (x")[1].split(")")[0]) if " (x" in line else Decimal(1)
            ints = [int(v) for v in line.split(": ")[1].split()]
            assert max(len(str(abs(i))) for i in ints) <= 3 or unit == Decimal("1e-8")
            for v, w in zip(vals, exact[name]):
                assert abs(Decimal(v) - Decimal(w)) <= unit / 2, (name, v, w, unit)


def test_compact_nan_negative_zero_and_too_large():
    import pandas as pd

    from atm.errors import AtmError
    from atm.prompting.encoders import decode_compact

    frame = pd.DataFrame({"open": [1.0, 1.5, 1.5, 1.25], "volume": [2.0, np.nan, -0.0, 3.0],
                          "count": [1.0, 2.0, 3.0, 4.0]})
    enc = get_encoder("compact", window=2, columns=["open_changes", "prev_volumes"])
    seed = get_encoder("seed-json", window=2, columns=["open_changes", "prev_volumes"])
    (ctx,) = enc.encode(frame, np.array([3]))
    assert ctx == "open_changes (x0.1): 5 0\nprev_volumes: nan -0"
    assert json.dumps(decode_compact(ctx)) == seed.encode(frame, np.array([3]))[0]
    huge = frame.assign(volume=[1e12, 2e12, 3e12, 4e12])
    with pytest.raises(AtmError, match="too large"):
        enc.encode(huge, np.array([3]))
    assert get_encoder("compact", window=2, columns=["prev_volumes"], precision=2).encode(huge, [3]) == [
        "prev_volumes (x1000000000000): 2 3"]
