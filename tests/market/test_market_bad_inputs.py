"""The bad-input corpus (tests/data/bad_klines/, made by tests/data/make_bad_klines.py).

Every case gives either a clear DataError naming the file and the line, or a build that succeeds
with the repair counted and reported in the sidecar. Nothing is dropped silently: for each repair
case the rows written plus the rows the repair removed equal the rows in the files.
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import re
import zipfile
from pathlib import Path

import pytest

from atm.errors import DataError
from atm.market.klines import build_klines, meta_path

CORPUS = Path(__file__).parents[1] / "data" / "bad_klines"
F1 = "BADUSDT-1m-2024-05-01.zip"
F2 = "BADUSDT-1m-2024-05-02.zip"

# case -> (file the error names, line or None, message regex)
ERRORS = {
    "truncated_zip": (F1, None, r"not a readable zip .*corrupt or truncated"),
    "zip_with_two_csvs": (F1, None, r"zip holds 2 files \(BADUSDT-1m-2024-05-01.csv, extra.csv\)"),
    "empty_file": (F1, None, r"empty file: no kline rows$"),
    "header_only_file": (F1, None, r"empty file: no kline rows \(only a header\)"),
    "wrong_checksum": (F1, None, r"checksum mismatch: file sha256 [0-9a-f]{64}, .*CHECKSUM says (ab){32}"),
    "malformed_checksum_file": (F1 + ".CHECKSUM", None, r"checksum file is not 'SHA256  NAME'"),
    "wrong_column_count": (F1, 5, r"expected 12 comma-separated columns, found 11"),
    "text_in_price": (F1, 8, r"column close: '12O.5' is not a number"),
    "nan_in_volume": (F1, 3, r"column volume: 'NaN' is not a finite number"),
    "empty_field": (F1, 10, r"column open: '' is not a number"),
    "float_in_trade_count": (F1, 6, r"column count: '12.5' is not an integer"),
    "negative_volume": (F1, 12, r"column volume: negative volume -3.5"),
    "high_below_low": (F1, 4, r"high [\d.]+ < low [\d.]+"),
    "open_above_high": (F1, 7, r"open [\d.]+ outside \[low [\d.]+, high [\d.]+\]"),
    "zero_price": (F1, 1, r"column low: price 0.0 is not positive"),
    "taker_volume_above_volume": (F1, 14, r"taker_buy_volume [\d.]+ > volume [\d.]+"),
    "timestamp_in_seconds": (F1, 9, r"column open_time: 1714522080 is neither epoch milliseconds nor microseconds"),
    "open_time_off_grid": (F1, 11, r"open_time \d+ is not on the interval grid"),
    "non_monotonic_close_time": (F1, 16, r"close_time \d+ is not inside the bar opening at \d+"),
    "conflicting_duplicate_minutes": (F2, 1, rf"conflicting duplicate minute 2024-05-01 23:59:00 UTC: \S+/{F1}:1440 "
                                             rf"and \S+/{F2}:1 differ in close"),
    "not_text": (F1, 2, r"bytes that are not UTF-8 text"),
    "unknown_symbol_dir": ("unknown_symbol_dir", None, r"no BADUSDT/1m klines under .*symbols there: OTHERUSDT"),
}

# case -> (repair counts, rows written, rows read, extra checks on the report)
REPAIRS = {
    "duplicate_minutes": ({"exact_duplicates_dropped": 2}, 20, 22, {}),
    "gaps": ({}, 33, 33, {"gaps": (2, 7, "2024-05-01 00:29:00 UTC", 5)}),
    "mixed_units_in_file": ({"mixed_units": 1}, 20, 20, {"units": {"ms": 10, "us": 10}}),
    "header_in_spot_file": ({"header_skipped": 1}, 20, 20, {"where": f"{F1}:1"}),
    "blank_line": ({"blank_lines_skipped": 1}, 20, 20, {"where": f"{F1}:9"}),
    "rows_out_of_order": ({"rows_reordered": 1}, 20, 20, {"where": f"{F1}:6"}),
    "crlf_line_endings": ({}, 20, 20, {}),
    "missing_checksum": ({}, 20, 20, {"checksums": {"verified": 0, "absent": 1}}),
    "unexpected_file_in_folder": ({"ignored_files": 1}, 20, 20, {"where": "notes.txt"}),
}


def test_corpus_is_complete_and_reproducible(tmp_path):
    cases = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())
    assert len(cases) >= 15
    assert sorted({*ERRORS, *REPAIRS}) == cases, "every case has exactly one expectation"
    spec = importlib.util.spec_from_file_location("make_bad_klines", CORPUS.parent / "make_bad_klines.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.make(tmp_path)
    for case in cases:  # regenerating gives the committed bytes
        a, b = CORPUS / case, tmp_path / case
        files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        assert files_a == files_b, case
        for f in files_a:
            if f.suffix == ".CHECKSUM":
                continue  # the hash of a zip depends on the zlib build; zip contents are compared instead
            if f.suffix == ".zip" and zipfile.is_zipfile(a / f):
                assert _members(a / f) == _members(b / f), (case, f)
            else:
                assert filecmp.cmp(a / f, b / f, shallow=False), (case, f)


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_is_an_error_naming_file_and_line(case, tmp_path):
    name, line, pattern = ERRORS[case]
    out = tmp_path / "out.parquet"
    with pytest.raises(DataError) as err:
        build_klines(CORPUS / case, "BADUSDT", out=out, progress=False)
    e = err.value
    assert Path(e.path).name == name and e.line == line
    where = f"{e.path}:{line}: " if line else f"{e.path}: "
    assert str(e).startswith(where) and case in e.path
    assert re.search(pattern, str(e)), str(e)
    assert not list(tmp_path.iterdir()), "no output, no temp files after an error"


@pytest.mark.parametrize("case", sorted(REPAIRS))
def test_bad_input_is_a_counted_reported_repair(case, tmp_path):
    counts, rows, rows_read, extra = REPAIRS[case]
    out = tmp_path / "out.parquet"
    rep = build_klines(CORPUS / case, "BADUSDT", out=out, progress=False)
    side = json.loads(meta_path(out).read_text())
    assert rep["repair_counts"] == counts == side["repair_counts"]
    assert (rep["rows"], rep["rows_read"], sum(f["rows"] for f in rep["files"])) == (rows, rows_read, rows_read)
    assert rows == rows_read - counts.get("exact_duplicates_dropped", 0), "no row vanishes unaccounted"
    for item in side["repairs"]:
        assert item["count"] == counts[item["kind"]] and item["where"] and item["what"]
    if "where" in extra:
        assert any(extra["where"] in w for item in side["repairs"] for w in item["where"]), side["repairs"]
    if "gaps" in extra:
        n, missing, after, longest = extra["gaps"]
        g = side["gaps"]
        assert (g["count"], g["missing"], g["longest"]["after"], g["longest"]["missing"]) == (n, missing, after, longest)
        assert len(g["where"]) == n
    if "units" in extra:
        assert side["files"][0]["units"] == extra["units"]
    if "checksums" in extra:
        assert side["checksums"] == extra["checksums"]


def test_cli_prints_the_corpus_error_without_traceback(cli, tmp_path):
    proc = cli("data", "build", "--raw", str(CORPUS / "high_below_low"), "--symbol", "BADUSDT",
               "--out", str(tmp_path / "o.parquet"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(rf"error: \S+/high_below_low/\S+/{F1}:4: high [\d.]+ < low", proc.stderr), proc.stderr
    proc = cli("data", "build", "--raw", str(CORPUS / "gaps"), "--symbol", "BADUSDT",
               "--out", str(tmp_path / "g.parquet"))
    assert "gaps: 2 (7 missing bars; longest 5 after 2024-05-01 00:29:00 UTC); not filled" in proc.stdout
    proc = cli("data", "build", "--raw", str(CORPUS / "gaps"), "--symbol", "BADUSDT",
               "--out", str(tmp_path / "f.parquet"), "--fill-gaps")
    assert "40 rows" in proc.stdout and "; filled" in proc.stdout and "repairs: gaps_filled 7" in proc.stdout
    assert "gaps: 0, filled bars: 7" in cli("data", "info", str(tmp_path / "f.parquet")).stdout
