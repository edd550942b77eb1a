"""Building and reading klines: the shipped real sample, units, headers, duplicates, gaps, atomicity."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from atm.errors import DataError
from atm.market import klines as K
from atm.market.klines import (build_klines, layout_dir, meta_path, read_klines_parquet, synthetic_rows,
                               write_binance_file)

CONTRACT = {
    "open_time": "datetime64[ns, UTC]", "open": "float64", "high": "float64", "low": "float64",
    "close": "float64", "volume": "float64", "close_time": "datetime64[ns, UTC]", "quote_volume": "float64",
    "count": "int64", "taker_buy_volume": "float64", "taker_buy_quote_volume": "float64",
}


def test_cli_build_btcusdt_sample(cli, sample_raw, tmp_path):
    out = tmp_path / "btc.parquet"
    proc = cli("data", "build", "--raw", "datasets/samples/binance", "--symbol", "BTCUSDT", "--out", str(out))
    assert "14,401 rows of BTCUSDT 1m" in proc.stdout
    assert "first 2025-08-01 00:00:00 UTC, last 2025-08-11 00:00:00 UTC" in proc.stdout
    assert "gaps: none" in proc.stdout and "repairs: none" in proc.stdout
    df = read_klines_parquet(out)
    assert len(df) == 14_401 and isinstance(df.index, pd.RangeIndex)
    assert {c: str(t) for c, t in df.dtypes.items()} == CONTRACT
    assert df["open_time"].iloc[0] == pd.Timestamp("2025-08-01 00:00", tz="UTC")
    assert df["open_time"].diff().dropna().eq(pd.Timedelta(minutes=1)).all()
    # the first CSV row, typed (µs in the file)
    first = df.iloc[0]
    assert (first["open"], first["high"], first["low"], first["close"]) == (115764.07, 115764.08, 115704.78, 115729.0)
    assert first["count"] == 1421 and first["volume"] == 11.87539
    assert first["close_time"] == pd.Timestamp("2025-08-01 00:00:59.999999", tz="UTC")

    meta = json.loads(meta_path(out).read_text())
    assert meta["rows"] == 14_401 and meta["symbol"] == "BTCUSDT" and meta["repairs"] == []
    assert len(meta["files"]) == 11 and sum(f["rows"] for f in meta["files"]) == 14_401
    for f in meta["files"]:
        assert f["sha256"] == hashlib.sha256(open(f["path"], "rb").read()).hexdigest()
        assert f["checksum"] == "verified" and f["units"]["ms"] == 0 and f["parser"] == "c"
    assert meta["provenance"]["versions"]["pandas"] and meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()

    info = cli("data", "info", str(out)).stdout
    assert "14,401 rows of BTCUSDT 1m spot" in info and "gaps: 0" in info


def test_bnbbtc_ms_files(sample_raw, tmp_path):
    rep = build_klines(sample_raw, "BNBBTC", out=tmp_path / "bnb.parquet", progress=False)
    assert rep["rows"] == 1000 and rep["first_open_time"] == "2022-11-08 22:31:00 UTC"
    assert rep["last_open_time"] == "2022-11-09 15:10:00 UTC"
    assert all(f["units"]["us"] == 0 for f in rep["files"])
    df = read_klines_parquet(tmp_path / "bnb.parquet")
    assert df["open_time"].iloc[0] == pd.Timestamp("2022-11-08 22:31", tz="UTC")
    assert df["close_time"].iloc[0] == pd.Timestamp("2022-11-08 22:31:59.999", tz="UTC")
    assert df["open"].iloc[0] == 0.01711 and df["count"].iloc[0] == 153


def test_raw_may_be_the_folder_of_zips_or_one_file(sample_raw, tmp_path):
    folder = layout_dir(sample_raw, "BNBBTC")
    a = build_klines(folder, "BNBBTC", out=tmp_path / "a.parquet", progress=False)
    b = build_klines(folder / "BNBBTC-1m-2022-11-08.zip", "BNBBTC", out=tmp_path / "b.parquet", progress=False)
    assert a["rows"] == 1000 and b["rows"] == b["files"][0]["rows"] < 1000
    with pytest.raises(DataError, match=r"no ETHUSDT/1m klines .*symbols there: BNBBTC, BTCUSDT"):
        build_klines(sample_raw, "ETHUSDT", out=tmp_path / "c.parquet", progress=False)
    with pytest.raises(DataError, match=r"intervals there for BTCUSDT: 1m"):
        build_klines(sample_raw, "BTCUSDT", interval="5m", out=tmp_path / "c.parquet", progress=False)
    with pytest.raises(DataError, match=r"no futures/um data .*markets there: spot; pass --market"):
        build_klines(sample_raw, "BTCUSDT", market="futures/um", out=tmp_path / "c.parquet", progress=False)
    with pytest.raises(DataError, match=r"interval '1mo' is not supported"):
        build_klines(sample_raw, "BTCUSDT", interval="1mo", out=tmp_path / "c.parquet", progress=False)
    assert not (tmp_path / "c.parquet").exists()


def test_fast_parsers_match_line_scan(sample_raw):
    datas = [K._read_source(p)[1] for p in sorted(layout_dir(sample_raw, "BTCUSDT").glob("*.zip"))[:3]]
    datas.append(b"open_time,x\n" + datas[0])  # a header, as futures files have
    many = K._parse_many(datas)
    assert many is not None and [m.header for m in many] == [False, False, False, True]
    for data, joint in zip(datas, many):
        fast, slow = K._parse_fast(data), K._parse_scan(data, "x.csv")
        assert fast is not None
        for parsed in (fast, joint):
            np.testing.assert_array_equal(parsed.lines, slow.lines)
            for c in slow.cols:
                np.testing.assert_array_equal(parsed.cols[c], slow.cols[c])
    assert K._parse_many(datas + [b"1,2\n"]) is None  # any fault anywhere: file by file instead


def test_range_crossing_2025_mixes_ms_and_us(tmp_path):
    d = layout_dir(tmp_path, "XYZUSDT")
    rows = synthetic_rows("2024-12-31", 2 * 1440, seed=1)
    write_binance_file(d, "XYZUSDT", "2024-12-31", rows[:1440])
    write_binance_file(d, "XYZUSDT", "2025-01-01", rows[1440:])
    rep = build_klines(tmp_path, "XYZUSDT", out=tmp_path / "x.parquet", progress=False)
    assert rep["rows"] == 2880 and rep["gaps"]["count"] == 0 and rep["repair_counts"] == {}
    assert [f["units"] for f in rep["files"]] == [{"ms": 1440, "us": 0}, {"ms": 0, "us": 1440}]
    df = read_klines_parquet(tmp_path / "x.parquet")
    assert df["open_time"].iloc[1439] == pd.Timestamp("2024-12-31 23:59", tz="UTC")
    assert df["open_time"].iloc[1440] == pd.Timestamp("2025-01-01 00:00", tz="UTC")
    assert df["close_time"].iloc[1440] == pd.Timestamp("2025-01-01 00:00:59.999999", tz="UTC")


def test_gaps_reported_and_filled_only_on_request(sample_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(sample_raw, raw)
    d = layout_dir(raw, "BTCUSDT")
    (d / "BTCUSDT-1m-2025-08-05.zip").unlink()
    (d / "BTCUSDT-1m-2025-08-05.zip.CHECKSUM").unlink()
    rep = build_klines(raw, "BTCUSDT", out=tmp_path / "g.parquet", progress=False)
    assert rep["rows"] == 14_401 - 1440 and "filled" not in read_klines_parquet(tmp_path / "g.parquet")
    g = rep["gaps"]
    assert (g["count"], g["missing"], g["filled"]) == (1, 1440, False)
    assert g["longest"] == {"after": "2025-08-04 23:59:00 UTC", "before": "2025-08-06 00:00:00 UTC", "missing": 1440}

    rep = build_klines(raw, "BTCUSDT", out=tmp_path / "f.parquet", fill_gaps=True, progress=False)
    assert rep["rows"] == 14_401 and rep["repair_counts"] == {"gaps_filled": 1440}
    df = read_klines_parquet(tmp_path / "f.parquet")
    assert df["filled"].dtype == bool and df["filled"].sum() == 1440
    assert df["open_time"].diff().dropna().eq(pd.Timedelta(minutes=1)).all()
    hole = df[df["filled"]]
    last_close = df.loc[hole.index[0] - 1, "close"]
    assert (hole[["open", "high", "low", "close"]] == last_close).all().all()
    assert (hole["volume"] == 0).all() and (hole["count"] == 0).all()
    assert not df.loc[~df["filled"]].isna().any().any()


def test_futures_header_and_monthly_daily_overlap(tmp_path):
    rows = synthetic_rows("2024-03-01", 3 * 1440, seed=2)
    write_binance_file(layout_dir(tmp_path, "BTCUSDT", market="futures/um", granularity="monthly"),
                       "BTCUSDT", "2024-03", rows, header=True)
    daily = layout_dir(tmp_path, "BTCUSDT", market="futures/um")
    write_binance_file(daily, "BTCUSDT", "2024-03-02", rows[1440:2880], header=True)
    rep = build_klines(tmp_path, "BTCUSDT", out=tmp_path / "f.parquet", market="futures/um", progress=False)
    assert rep["rows"] == 3 * 1440
    # futures headers are normal (no repair); the daily file repeats the monthly's minutes exactly
    assert rep["repair_counts"] == {"exact_duplicates_dropped": 1440}
    assert all(f["header"] for f in rep["files"])
    where = rep["repairs"][0]["where"][0]
    assert "BTCUSDT-1m-2024-03-02.zip:2" in where and "BTCUSDT-1m-2024-03.zip:1442" in where


def test_failed_build_leaves_previous_output_intact(sample_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(sample_raw, raw)
    out = tmp_path / "k.parquet"
    build_klines(raw, "BNBBTC", out=out, progress=False)
    before = out.read_bytes(), meta_path(out).read_bytes()
    d = layout_dir(raw, "BNBBTC")
    write_binance_file(d, "BNBBTC", "2022-11-10", "1668038400000,1,2,3\n")
    with pytest.raises(DataError, match=r"BNBBTC-1m-2022-11-10.zip:1: expected 12 comma-separated columns, found 4"):
        build_klines(raw, "BNBBTC", out=out, progress=False)
    assert (out.read_bytes(), meta_path(out).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.parquet", "k.parquet.meta.json", "raw"]


def test_read_klines_parquet_rejects_other_files(tmp_path):
    p = tmp_path / "x.parquet"
    pd.DataFrame({"a": [1]}).to_parquet(p)
    with pytest.raises(DataError, match="missing columns open_time"):
        read_klines_parquet(p)
    (tmp_path / "y.parquet").write_text("nope")
    with pytest.raises(DataError, match="not a readable parquet"):
        read_klines_parquet(tmp_path / "y.parquet")
    with pytest.raises(DataError, match="not found"):
        read_klines_parquet(tmp_path / "z.parquet")


def test_cli_errors_name_file_and_line(cli, tmp_path):
    d = layout_dir(tmp_path, "ABCUSDT")
    rows = synthetic_rows("2024-05-01", 10, seed=3)
    rows[6][2] = "12x.5"
    write_binance_file(d, "ABCUSDT", "2024-05-01", rows)
    proc = cli("data", "build", "--raw", str(tmp_path), "--symbol", "ABCUSDT", "--out", str(tmp_path / "o.parquet"),
               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ABCUSDT-1m-2024-05-01.zip:7: column high: '12x.5' is not a number" in proc.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_build_help_has_examples(cli):
    out = cli("data", "build", "--help").stdout
    assert "examples:" in out and "--fill-gaps" in out
    assert "examples:" in cli("data", "info", "--help").stdout
