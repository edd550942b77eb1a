"""Generate the bad-input corpus under tests/data/bad_klines/ (committed beside this script).

    python tests/data/make_bad_klines.py [OUT_DIR]      (default: tests/data/bad_klines)

Each case is a folder laid out like Binance's public data (``data/spot/daily/klines/BADUSDT/1m``)
holding small synthetic random-walk files with exactly one fault planted. The expectation of each
case (an error naming file and line, or a counted repair) lives in tests/market/test_market_bad_inputs.py.
The output is byte-for-byte reproducible (fixed seeds, fixed zip dates); the test regenerates it
into a temp folder and compares, so the corpus and this script cannot drift apart.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sys
import zipfile
from pathlib import Path

from atm.market.klines import RAW_COLUMNS, layout_dir, synthetic_rows, write_binance_file

SYMBOL = "BADUSDT"
DAY = "2024-05-01"
DAY2 = "2024-05-02"
N = 20  # rows per file: enough for the faults, small enough to read in a diff


def _rows(day: str = DAY, n: int = N, seed: int = 7, unit: str = "auto"):
    return synthetic_rows(f"{day} 00:00", n, seed=seed, unit=unit)


def _csv(rows) -> str:
    return "".join(",".join(r) + "\n" for r in rows)


def _folder(root: Path) -> Path:
    return layout_dir(root, SYMBOL)


def _zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2025, 1, 1, 0, 0, 0)), data, compress_type=compression)
    return buf.getvalue()


def _write_raw_zip(folder: Path, label: str, blob: bytes, checksum_of: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{SYMBOL}-1m-{label}.zip"
    path.write_bytes(blob)
    if checksum_of is not None:
        path.with_name(path.name + ".CHECKSUM").write_text(
            f"{hashlib.sha256(checksum_of).hexdigest()}  {path.name}\n")
    return path


def _one(root: Path, rows, **kw) -> Path:
    return write_binance_file(_folder(root), SYMBOL, DAY, rows, **kw)


# ---- the cases: name -> function(root) that writes the case under root -------------------------

def truncated_zip(root):
    # stored, not deflated: the cut bytes then do not depend on the zlib build (reproducible)
    good = _zip_bytes({f"{SYMBOL}-1m-{DAY}.csv": _csv(_rows()).encode()}, zipfile.ZIP_STORED)
    _write_raw_zip(_folder(root), DAY, good[: len(good) // 2])  # cut mid-file, no CHECKSUM


def zip_with_two_csvs(root):
    blob = _zip_bytes({f"{SYMBOL}-1m-{DAY}.csv": _csv(_rows()).encode(), "extra.csv": b"1,2,3\n"})
    _write_raw_zip(_folder(root), DAY, blob, checksum_of=blob)


def empty_file(root):
    _one(root, "")


def header_only_file(root):
    _one(root, ",".join(RAW_COLUMNS) + "\n")


def wrong_checksum(root):
    path = _one(root, _rows())
    path.with_name(path.name + ".CHECKSUM").write_text("ab" * 32 + f"  {path.name}\n")


def malformed_checksum_file(root):
    path = _one(root, _rows())
    path.with_name(path.name + ".CHECKSUM").write_text("not a checksum\n")


def wrong_column_count(root):
    rows = _rows()
    rows[4] = rows[4][:11]  # line 5 lost its last column
    _one(root, rows)


def text_in_price(root):
    rows = _rows()
    rows[7][4] = "12O.5"  # letter O for zero, line 8, close
    _one(root, rows)


def nan_in_volume(root):
    rows = _rows()
    rows[2][5] = "NaN"  # line 3
    _one(root, rows)


def empty_field(root):
    rows = _rows()
    rows[9][1] = ""  # line 10, open
    _one(root, rows)


def float_in_trade_count(root):
    rows = _rows()
    rows[5][8] = "12.5"  # line 6
    _one(root, rows)


def negative_volume(root):
    rows = _rows()
    rows[11][5] = "-3.5"  # line 12
    _one(root, rows)


def high_below_low(root):
    rows = _rows()
    rows[3][2], rows[3][3] = rows[3][3], rows[3][2]  # swap high and low on line 4
    _one(root, rows)


def open_above_high(root):
    rows = _rows()
    rows[6][1] = f"{float(rows[6][2]) * 1.01:.8f}"  # line 7
    _one(root, rows)


def zero_price(root):
    rows = _rows()
    rows[0][3] = "0.00000000"  # line 1, low
    _one(root, rows)


def taker_volume_above_volume(root):
    rows = _rows()
    rows[13][9] = f"{float(rows[13][5]) * 2:.8f}"  # line 14
    _one(root, rows)


def timestamp_in_seconds(root):
    rows = _rows()
    rows[8][0] = str(int(rows[8][0]) // 1000)  # line 9: epoch seconds
    _one(root, rows)


def open_time_off_grid(root):
    rows = _rows()
    rows[10][0] = str(int(rows[10][0]) + 30_000)  # line 11: 30 s past the minute
    _one(root, rows)


def non_monotonic_close_time(root):
    rows = _rows()
    rows[15][6] = rows[14][6]  # line 16 repeats line 15's close_time
    _one(root, rows)


def conflicting_duplicate_minutes(root):
    write_binance_file(_folder(root), SYMBOL, DAY, _rows(n=1440))
    other = _rows(DAY2, n=10)
    # the next day's file starts with a copy of day 1's last minute, with another close
    dup = list(_rows(n=1440)[-1])
    dup[4] = f"{float(dup[4]) * 1.0001:.8f}"
    dup[2] = f"{max(float(dup[2]), float(dup[4])):.8f}"
    write_binance_file(_folder(root), SYMBOL, DAY2, [dup] + other)


def duplicate_minutes(root):
    rows = _rows()
    rows = rows[:6] + [rows[5]] + rows[6:12] + [rows[11]] + rows[12:]  # lines 7 and 14 repeat 6 and 13
    _one(root, rows)


def gaps(root):
    rows = _rows(n=40)
    del rows[30:35]  # 5 minutes missing after 00:29
    del rows[10:12]  # 2 minutes missing after 00:09
    _one(root, rows)


def mixed_units_in_file(root):
    ms = _rows(unit="ms")
    us = _rows(unit="us")
    _one(root, ms[:10] + us[10:])  # a file switching from ms to µs at line 11


def header_in_spot_file(root):
    _one(root, _rows(), header=True)


def blank_line(root):
    rows = _rows()
    _one(root, _csv(rows[:8]) + "\n" + _csv(rows[8:]))  # line 9 blank


def rows_out_of_order(root):
    rows = _rows()
    rows[4], rows[5] = rows[5], rows[4]
    _one(root, rows)


def crlf_line_endings(root):
    _one(root, _csv(_rows()).replace("\n", "\r\n"))


def missing_checksum(root):
    _one(root, _rows(), checksum=False)


def unexpected_file_in_folder(root):
    _one(root, _rows())
    (_folder(root) / "notes.txt").write_text("downloaded by hand\n")


def unknown_symbol_dir(root):
    write_binance_file(layout_dir(root, "OTHERUSDT"), "OTHERUSDT", DAY, _rows())


def not_text(root):
    _one(root, bytes(range(256)) * 4)


CASES = {f.__name__: f for f in (
    truncated_zip, zip_with_two_csvs, empty_file, header_only_file, wrong_checksum, malformed_checksum_file,
    wrong_column_count, text_in_price, nan_in_volume, empty_field, float_in_trade_count, negative_volume,
    high_below_low, open_above_high, zero_price, taker_volume_above_volume, timestamp_in_seconds,
    open_time_off_grid, non_monotonic_close_time, conflicting_duplicate_minutes, duplicate_minutes, gaps,
    mixed_units_in_file, header_in_spot_file, blank_line, rows_out_of_order, crlf_line_endings,
    missing_checksum, unexpected_file_in_folder, unknown_symbol_dir, not_text,
)}


def make(out: Path) -> list[str]:
    out = Path(out)
    for name, fn in CASES.items():
        case = out / name
        if case.exists():
            shutil.rmtree(case)
        case.mkdir(parents=True)
        fn(case)
    return list(CASES)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "bad_klines"
    names = make(target)
    print(f"wrote {len(names)} cases under {target}")
