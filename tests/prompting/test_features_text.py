"""The ``features-text`` encoder (issue 23's positive control): hand-checked values, the exact
line, no leakage, and its token count with SmolLM2's tokenizer against seed-json's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from leakage import perturb_from, raw_sample_frame

from atm.market.features import WINDOW_FEATURES, window_features
from atm.prompting.encoders import get_encoder

ZIPS = sorted((Path(__file__).resolve().parents[2] / "datasets/samples/binance/data/spot/daily/klines/BTCUSDT/1m")
              .glob("*.zip"))


@pytest.fixture(scope="module")
def df():
    return raw_sample_frame(ZIPS[:1])


def _bars(n: int = 14) -> pd.DataFrame:
    i = np.arange(n, dtype=np.float64)
    return pd.DataFrame({"open": 100 + i, "high": 101 + i, "low": 99 + i, "close": 100.5 + i,
                         "volume": 10 + i, "count": 5 + i, "taker_buy_volume": 5 + i})


def test_window_features_by_hand():
    d = _bars()
    f = window_features(d, lag=10)
    assert list(f.columns) == list(WINDOW_FEATURES)
    assert f.iloc[:10].isna().all().all()  # t-lag must exist
    t = 12  # reference bar t-10 = 2, last bar t-1 = 11
    assert f.at[t, "win_high"] == pytest.approx(112 / 103 - 1)
    assert f.at[t, "win_low"] == pytest.approx(110 / 101 - 1)
    assert f.at[t, "win_close_high"] == pytest.approx(111.5 / 103 - 1)
    assert f.at[t, "win_close_low"] == pytest.approx(111.5 / 101 - 1)
    assert f.at[t, "last_ret"] == pytest.approx(111.5 / 110.5 - 1)
    assert f.at[t, "vol_ratio"] == pytest.approx(21 / np.mean(np.arange(12, 22)))


def test_line_is_exact():
    d = _bars()
    enc = get_encoder("features-text")
    assert enc.lookback == 10
    (line,) = enc.encode(d, [12])
    assert line == ("vs 10m ago: high +8.74%, low +8.91%, close-high +8.25%, close-low +10.40%, "
                    "last min +0.90%, vol 1.3x")
    d2 = d.copy()
    d2.loc[11, ["high", "close"]] = [103.0, 102.999]  # flat high; close 0.001% under it
    d2.loc[10, "close"] = 102.999
    (line2,) = enc.encode(d2, [12])
    assert "high +0.00%" in line2 and "last min +0.00%" in line2 and "close-high -0.00%" not in line2


def test_no_leakage_and_rows(df):
    enc = get_encoder("features-text")
    rows = np.arange(200, 260)
    base = enc.encode(df, rows)
    for t in (200, 230, 259):
        moved = enc.encode(perturb_from(df, t), rows)
        assert moved[: t - 200 + 1] == base[: t - 200 + 1]  # minute t's text uses bars < t
    with pytest.raises(Exception, match="lookback"):
        enc.encode(df, [5])


def test_tokens_per_item_under_a_fifth_of_seed_json(df):
    from atm.prompting import tokens as tk
    from atm.prompting.template import Template

    if tk.missing_packages():
        pytest.skip("tokenizers/jinja2 not installed")
    try:
        counter = tk.load_counter("smollm2")
    except Exception as exc:  # the family tokenizer is built by `atm doctor --build`
        pytest.skip(f"no SmolLM2 tokenizer here: {exc}")
    root = Path(__file__).resolve().parents[2] / "prompts"
    rows = np.linspace(200, len(df) - 1, 40).astype(int)
    ft = tk.count_items(Template.load(root / "features-text.yaml"), counter,
                        get_encoder("features-text").encode(df, rows))
    seed = tk.count_items(Template.load(root / "seed.yaml"), counter, get_encoder("seed-json").encode(df, rows))
    assert ft.per_item.mean() <= 0.2 * seed.per_item.mean(), (ft.per_item.mean(), seed.per_item.mean())
