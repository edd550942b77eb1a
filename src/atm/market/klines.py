"""Binance klines in and out: raw zips/CSVs in Binance's layout -> one checked parquet.

``build_klines`` reads every file of one symbol/interval, checks every row, and writes a typed,
sorted, unique-minute parquet plus a JSON sidecar (``<out>.meta.json``) that records the input
files (sha256, rows, timestamp units), every repair it made, the gaps it found, and provenance.

What is a repair (done, counted and reported) and what is an error (stop, name file and line):

* repairs: a header line (futures files have one; in a spot file it is unusual and counted),
  blank lines, rows out of order inside a file (sorted), exact duplicate minutes (dropped),
  a file mixing ms and µs timestamps (each row converted by its own unit), gaps (reported; filled
  only with ``fill_gaps``: OHLC = previous close, volumes/count = 0, ``filled`` = True).
* errors: unreadable/empty file, zip with other than one member, checksum mismatch, wrong column
  count, text or NaN in a number, negative volume or count, high < low, open/close outside
  [low, high], timestamps that are neither ms nor µs or not on the interval grid, close_time not
  inside its bar, and two different rows for the same minute (both file:line named).

Speed: the fast path parses each file with pandas' C parser and validates with numpy; if that
parse fails, a plain line scan of that file finds the exact line and says what is wrong there.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atm.errors import DataError
from atm.market.validate import (MAX_LISTED, PRICE_COLUMNS, VOLUME_COLUMNS, Repairs, duplicates, first_bad_bar,
                                 num, out_of_order)

# Binance's 12 kline columns, in file order.
RAW_COLUMNS = (
    "open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume", "count",
    "taker_buy_volume", "taker_buy_quote_volume", "ignore",
)
INT_COLUMNS = ("open_time", "close_time", "count")
FLOAT_COLUMNS = ("open", "high", "low", "close", "volume", "quote_volume", "taker_buy_volume",
                 "taker_buy_quote_volume")
# The output frame (docs/architecture.md), in order; ``filled`` is appended with fill_gaps.
COLUMNS = ("open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume",
           "count", "taker_buy_volume", "taker_buy_quote_volume")
MARKETS = ("spot", "futures/um", "futures/cm")
GRANULARITIES = ("daily", "monthly")

_NS = {"s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000,
       "w": 7 * 86_400_000_000_000}
# Binance's intervals; "1mo" has no fixed length, so gaps cannot be checked for it.
INTERVALS = ("1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w")

# Epoch timestamps: ms values of 1973..5138 lie in [1e11, 1e14), µs values of the same years in
# [1e14, 1e17). Binance spot files switched from ms to µs on 2025-01-01; futures stay in ms.
_MS_LO, _US_LO, _US_HI = 10**11, 10**14, 10**17


def interval_ns(interval: str) -> int:
    """Length of a Binance interval in nanoseconds (``1m`` -> 60e9)."""
    m = re.fullmatch(r"(\d+)([smhdw])", interval)
    if interval not in INTERVALS or not m:
        raise DataError(f"interval {interval!r} is not supported for build; use one of {', '.join(INTERVALS)}")
    return int(m.group(1)) * _NS[m.group(2)]


def meta_path(out: str | Path) -> Path:
    """The JSON sidecar of a klines parquet: ``<out>.meta.json``."""
    out = Path(out)
    return out.with_name(out.name + ".meta.json")


# --------------------------------------------------------------------------------------------
# Finding the input files
# --------------------------------------------------------------------------------------------

def find_kline_files(raw: str | Path, symbol: str, interval: str = "1m", market: str = "spot"
                     ) -> tuple[list[Path], list[Path]]:
    """The data files (zips/CSVs) for ``symbol``/``interval`` under ``raw``, and files ignored there.

    ``raw`` may be the root of Binance's layout (the folder holding ``data/``), the ``data``
    folder itself, a folder of ``SYMBOL-INTERVAL-*.zip|csv`` files, or one such file.
    """
    raw = Path(raw)
    if market not in MARKETS:
        raise DataError(f"market {market!r} is not one of {', '.join(MARKETS)}")
    if not raw.exists():
        raise DataError("raw data path does not exist", str(raw))
    pattern = re.compile(rf"{re.escape(symbol)}-{re.escape(interval)}-\d{{4}}-\d{{2}}(-\d{{2}})?\.(zip|csv)")
    if raw.is_file():
        if not pattern.fullmatch(raw.name):
            raise DataError(f"file name does not match {symbol}-{interval}-DATE.zip|csv", str(raw))
        return [raw], []

    root = raw / "data" if (raw / "data").is_dir() else raw
    market_dir = root / market
    if root is not raw and not market_dir.is_dir():
        have = sorted(m for m in MARKETS if (root / m).is_dir())
        raise DataError(f"no {market} data under {root} (markets there: {', '.join(have) or 'none'}; "
                        f"pass --market)", str(raw))
    if market_dir.is_dir():  # Binance's layout
        dirs = [market_dir / g / "klines" / symbol / interval for g in GRANULARITIES]
        dirs = [d for d in dirs if d.is_dir()]
        if not dirs:
            known = sorted({p.name for g in GRANULARITIES for p in (market_dir / g / "klines").glob("*")
                            if p.is_dir()})
            intervals = sorted({p.name for g in GRANULARITIES
                                for p in (market_dir / g / "klines" / symbol).glob("*") if p.is_dir()})
            hint = f"; intervals there for {symbol}: {', '.join(intervals)}" if intervals else ""
            raise DataError(f"no {symbol}/{interval} klines under {market_dir}/{{daily,monthly}}/klines "
                            f"(symbols there: {', '.join(known) or 'none'}{hint})", str(raw))
    else:
        dirs = [raw]
    files, ignored = [], []
    for d in dirs:
        for p in sorted(d.iterdir()):
            if not p.is_file() or p.name.endswith(".CHECKSUM"):
                continue
            (files if pattern.fullmatch(p.name) else ignored).append(p)
    if not files:
        raise DataError(f"no {symbol}-{interval}-*.zip or .csv files found (looked in "
                        f"{', '.join(str(d) for d in dirs)})", str(raw))
    # monthly files first, then daily, each by date: overlaps then show up as duplicates in order
    files.sort(key=lambda p: (p.parent.parent.parent.parent.name != "monthly", p.name))
    return files, ignored


def _read_source(path: Path) -> tuple[bytes, bytes, str | None]:
    """(bytes of the file on disk, bytes of the CSV, zip member name or None) of one input file."""
    blob = path.read_bytes()
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(io.BytesIO(blob)) as zf:
                members = [i for i in zf.infolist() if not i.is_dir()]
                if len(members) != 1:
                    names = ", ".join(i.filename for i in members) or "nothing"
                    raise DataError(f"zip holds {len(members)} files ({names}); expected exactly one CSV",
                                    str(path))
                data = zf.read(members[0])
                return blob, data, members[0].filename
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
            raise DataError(f"not a readable zip ({exc}); the file is corrupt or truncated, "
                            f"download it again", str(path)) from exc
    return blob, blob, None


def _verify_checksum(path: Path, digest: str) -> str:
    """'verified' or 'absent'; DataError when a ``.CHECKSUM`` beside the file disagrees."""
    ck = path.with_name(path.name + ".CHECKSUM")
    if not ck.exists():
        return "absent"
    text = ck.read_text(errors="replace").strip()
    expected = text.split()[0].lower() if text else ""
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise DataError(f"checksum file is not 'SHA256  NAME' (got {text[:80]!r})", str(ck))
    if expected != digest:
        raise DataError(f"checksum mismatch: file sha256 {digest}, {ck.name} says {expected}; "
                        f"the file is corrupt, download it again", str(path))
    return "verified"


# --------------------------------------------------------------------------------------------
# Parsing one file
# --------------------------------------------------------------------------------------------

@dataclass
class _Parsed:
    """One file's rows as numpy arrays plus the physical line number of each row."""

    cols: dict[str, np.ndarray]
    lines: np.ndarray
    header: bool = False
    blank_lines: list[int] = field(default_factory=list)


def _is_header(first_line: bytes) -> bool:
    first = first_line.split(b",", 1)[0].strip().strip(b'"').lower()
    if not first:
        return False
    try:
        float(first)
        return False
    except ValueError:
        return first in (b"open_time", b"opentime", b"open time", b"timestamp", b"time")


def _parse_fast(data: bytes) -> _Parsed | None:
    """pandas' C parser; None when anything is off (the line scan then says exactly what)."""
    import pandas as pd

    nl = data.find(b"\n")
    first = data[: nl if nl >= 0 else len(data)]
    header = _is_header(first)
    body_start = nl + 1 if header else 0
    # Expected rows: one per newline (+1 if the last line has none); blank lines break this
    # accounting and send the file to the line scan, which knows their line numbers.
    n_lines = data.count(b"\n", body_start) + (0 if data.endswith(b"\n") else 1)
    if header and nl < 0:
        n_lines = 0
    try:
        df = pd.read_csv(
            io.BytesIO(data), header=None, names=list(RAW_COLUMNS), skiprows=1 if header else 0,
            index_col=False, engine="c", skip_blank_lines=False, na_filter=True,
            dtype={**{c: "int64" for c in INT_COLUMNS}, **{c: "float64" for c in FLOAT_COLUMNS},
                   "ignore": "float64"})
    except Exception:  # noqa: BLE001 - any parse problem: let the line scan locate it
        return None
    if len(df) != n_lines or len(df) == 0:
        return None
    if df["ignore"].isna().any():  # a short row: its last field(s) came back empty
        return None
    cols = {c: df[c].to_numpy() for c in INT_COLUMNS + FLOAT_COLUMNS}
    if not all(np.isfinite(cols[c]).all() for c in FLOAT_COLUMNS):
        return None
    lines = np.arange(1, len(df) + 1, dtype=np.int64) + (1 if header else 0)
    return _Parsed(cols, lines, header)


def _split_header(data: bytes) -> tuple[bool, bytes, int]:
    """(has header, body without it, expected rows: one per line; blank lines break this count)."""
    nl = data.find(b"\n")
    header = _is_header(data[: nl if nl >= 0 else len(data)])
    body = (data[nl + 1:] if nl >= 0 else b"") if header else data
    n = body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)
    return header, body, n


def _parse_many(datas: list[bytes]) -> list[_Parsed] | None:
    """All files in one C-parser call (per-call overhead dominates small daily files).

    None when anything is off anywhere; the caller then parses file by file to find it.
    """
    import pandas as pd

    parts = [_split_header(d) for d in datas]
    if any(n == 0 for _, _, n in parts):
        return None
    joined = b"".join(body if body.endswith(b"\n") else body + b"\n" for _, body, _ in parts)
    try:
        df = pd.read_csv(
            io.BytesIO(joined), header=None, names=list(RAW_COLUMNS), index_col=False, engine="c",
            skip_blank_lines=False, na_filter=True,
            dtype={**{c: "int64" for c in INT_COLUMNS}, **{c: "float64" for c in FLOAT_COLUMNS},
                   "ignore": "float64"})
    except Exception:  # noqa: BLE001 - any parse problem: the per-file path locates it
        return None
    if len(df) != sum(n for _, _, n in parts) or df["ignore"].isna().any():
        return None
    cols = {c: df[c].to_numpy() for c in INT_COLUMNS + FLOAT_COLUMNS}
    if not all(np.isfinite(cols[c]).all() for c in FLOAT_COLUMNS):
        return None
    out, start = [], 0
    for header, _, n in parts:
        lines = np.arange(1, n + 1, dtype=np.int64) + (1 if header else 0)
        out.append(_Parsed({c: v[start:start + n] for c, v in cols.items()}, lines, header))
        start += n
    return out


def _parse_scan(data: bytes, where: str) -> _Parsed:
    """The reference parser: one line at a time, raising DataError(file, line) on the first fault."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"bytes that are not UTF-8 text ({exc.reason}); not a kline CSV", where, line) from exc
    raw_lines = text.splitlines()
    out: dict[str, list] = {c: [] for c in INT_COLUMNS + FLOAT_COLUMNS}
    lines: list[int] = []
    blank: list[int] = []
    header = False
    for i, line in enumerate(raw_lines, start=1):
        if not line.strip():
            blank.append(i)
            continue
        if i == 1 and _is_header(line.encode()):
            header = True
            continue
        fields = line.split(",")
        if len(fields) != len(RAW_COLUMNS):
            hint = " (a header line not at the top?)" if not _looks_numeric(fields[0]) else ""
            raise DataError(f"expected {len(RAW_COLUMNS)} comma-separated columns, found {len(fields)}{hint}: "
                            f"{line[:120]!r}", where, i)
        for name, value in zip(RAW_COLUMNS, fields):
            if name == "ignore":
                continue
            v = value.strip()
            if name in INT_COLUMNS:
                try:
                    out[name].append(int(v))
                except ValueError:
                    raise DataError(f"column {name}: {value!r} is not an integer", where, i) from None
            else:
                try:
                    x = float(v)
                except ValueError:
                    raise DataError(f"column {name}: {value!r} is not a number", where, i) from None
                if not np.isfinite(x):
                    raise DataError(f"column {name}: {value!r} is not a finite number", where, i)
                out[name].append(x)
        lines.append(i)
    if not lines:
        raise DataError("empty file: no kline rows" + (" (only a header)" if header else ""), where)
    cols = {c: np.asarray(out[c], dtype=np.int64 if c in INT_COLUMNS else np.float64) for c in out}
    return _Parsed(cols, np.asarray(lines, dtype=np.int64), header, blank)


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _to_ns(values: np.ndarray, name: str, lines: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Epoch ms or µs (decided per row) -> ns; also the per-row 'is µs' mask."""
    bad = (values < _MS_LO) | (values >= _US_HI)
    if bad.any():
        k = int(np.argmax(bad))
        raise DataError(f"column {name}: {values[k]} is neither epoch milliseconds nor microseconds",
                        where, int(lines[k]))
    is_us = values >= _US_LO
    return np.where(is_us, values * 1_000, values * 1_000_000), is_us


def _check_rows(p: _Parsed, where: str, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised row checks; DataError naming the first bad line. Returns open_ns, close_ns, is_us."""
    c, lines = p.cols, p.lines

    def fail(mask: np.ndarray, message) -> None:
        if mask.any():
            k = int(np.argmax(mask))
            raise DataError(message(k), where, int(lines[k]))

    bad = first_bad_bar(c)  # the value rules, shared with the API (atm.market.validate)
    if bad is not None:
        raise DataError(bad[1], where, int(lines[bad[0]]))

    open_ns, is_us = _to_ns(c["open_time"], "open_time", lines, where)
    close_ns, _ = _to_ns(c["close_time"], "close_time", lines, where)
    fail(open_ns % step != 0, lambda k: f"open_time {c['open_time'][k]} is not on the interval grid")
    fail((close_ns <= open_ns) | (close_ns >= open_ns + step),
         lambda k: f"close_time {c['close_time'][k]} is not inside the bar opening at "
                   f"{c['open_time'][k]} (close_time must rise with open_time)")
    return open_ns, close_ns, is_us


def _iso(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 1_000_000_000)) + " UTC"


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------

def build_klines(raw: str | Path, symbol: str, interval: str = "1m", out: str | Path | None = None,
                 market: str = "spot", fill_gaps: bool = False, progress: bool = True) -> dict[str, Any]:
    """Read Binance klines for one symbol under ``raw`` and write a checked parquet to ``out``.

    Returns the report (also written to ``<out>.meta.json``): input files with sha256 and rows,
    repairs, gaps, first/last minute, provenance. Raises DataError (file:line) on bad input.
    Stages: find the files, read and verify them (``_read_files``), parse and check each
    (``_check_files``), merge them into one sorted series of unique minutes (``_merge``), find the
    gaps (``_gaps``, filled with ``fill_gaps``), write the parquet and the report.
    """
    from atm.utils import provenance, write_json_atomic

    t0 = time.perf_counter()
    symbol = symbol.upper()
    step = interval_ns(interval)
    if out is None:
        out = Path("runs") / "data" / f"{symbol.lower()}-{interval}.parquet"
    out = Path(out)
    files, ignored = find_kline_files(raw, symbol, interval, market)
    repairs = Repairs()
    if ignored:
        repairs.add("ignored_files", "files in the klines folder whose names are not "
                    f"{symbol}-{interval}-DATE.zip|csv (not read)", len(ignored), [str(p) for p in ignored])
    loaded = _read_files(files, f"reading {symbol} {interval}", progress)
    file_reports, parts = _check_files(files, loaded, step, market, repairs)
    open_ns, close_ns, cols, rows_read = _merge(files, parts, repairs)
    gaps = _gaps(open_ns, step, fill_gaps)

    frame = {"open_time": open_ns, **{c: cols[c] for c in PRICE_COLUMNS}, "volume": cols["volume"],
             "close_time": close_ns, "quote_volume": cols["quote_volume"], "count": cols["count"],
             "taker_buy_volume": cols["taker_buy_volume"],
             "taker_buy_quote_volume": cols["taker_buy_quote_volume"]}
    if fill_gaps:
        frame = _fill(frame, step)
        n_filled = int(frame["filled"].sum())
        if n_filled:
            repairs.add("gaps_filled", "missing bars forward-filled (open=high=low=close=previous close, "
                        "volumes and count 0, filled=True)", n_filled,
                        [f"{g['after']} .. {g['before']} ({g['missing']})" for g in gaps["where"]])

    import pyarrow as pa

    # numpy -> arrow directly (a pandas frame in between would copy every column once more)
    table = pa.table({name: pa.array(v, type=pa.timestamp("ns", tz="UTC")) if name.endswith("_time") else v
                      for name, v in frame.items()})

    report: dict[str, Any] = {
        "kind": "atm.klines",
        "symbol": symbol, "interval": interval, "market": market, "out": str(out),
        "rows": int(table.num_rows), "rows_read": int(rows_read),
        "first_open_time": _iso(int(open_ns[0])), "last_open_time": _iso(int(open_ns[-1])),
        "columns": {c: ("datetime64[ns, UTC]" if c.endswith("_time") else str(frame[c].dtype)) for c in frame},
        "files": file_reports,
        "checksums": {"verified": sum(f["checksum"] == "verified" for f in file_reports),
                      "absent": sum(f["checksum"] == "absent" for f in file_reports)},
        "gaps": gaps,
        "fill_gaps": bool(fill_gaps),
        "repair_counts": repairs.counts(),
        "repairs": repairs.as_list(),
    }
    _write(table, out, report)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["provenance"] = provenance({"raw": str(raw), "symbol": symbol, "interval": interval,
                                       "market": market, "out": str(out), "fill_gaps": fill_gaps})
    write_json_atomic(meta_path(out), report)
    return report


def _read_files(files: list[Path], desc: str, progress: bool) -> list[tuple[bytes, str | None, str, str]]:
    """(data, zip member, sha256, checksum state) of each file, in order: read, unzipped, hashed and
    verified in two threads (zlib and hashlib release the GIL); map() keeps file order, so the
    first bad file in order is the one reported."""
    from concurrent.futures import ThreadPoolExecutor

    from atm.utils import progress as progress_bar

    def load(path: Path) -> tuple[bytes, str | None, str, str]:
        blob, data, member = _read_source(path)
        digest = hashlib.sha256(blob).hexdigest()
        checksum = _verify_checksum(path, digest)
        if not data.strip():
            raise DataError("empty file: no kline rows", str(path))
        return data, member, digest, checksum

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(progress_bar(pool.map(load, files), total=len(files), desc=desc, unit="file")
                    if progress else pool.map(load, files))


def _check_files(files: list[Path], loaded: list[tuple[bytes, str | None, str, str]], step: int, market: str,
                 repairs: Repairs) -> tuple[list[dict[str, Any]], list[tuple[np.ndarray, np.ndarray, _Parsed]]]:
    """Parse and check every file (the C parser for all at once, a line scan where it fails);
    returns the per-file reports and (open_ns, close_ns, parsed rows) per file."""
    file_reports: list[dict[str, Any]] = []
    parts: list[tuple[np.ndarray, np.ndarray, _Parsed]] = []
    sizes = [p.stat().st_size for p in files]
    many = _parse_many([d for d, *_ in loaded])
    for i, path in enumerate(files):
        where = str(path)
        data, member, digest, checksum = loaded[i]
        parsed = many[i] if many is not None else _parse_fast(data)
        fast = parsed is not None
        if parsed is None:
            parsed = _parse_scan(data, where)
        open_ns, close_ns, is_us = _check_rows(parsed, where, step)
        n = len(parsed.lines)
        n_us = int(is_us.sum())
        if parsed.header and market == "spot":
            repairs.add("header_skipped", "a header line in a spot file (Binance spot files have none) "
                        "was recognised and skipped", 1, [f"{where}:1"])
        if parsed.blank_lines:
            repairs.add("blank_lines_skipped", "blank lines skipped", len(parsed.blank_lines),
                        [f"{where}:{i}" for i in parsed.blank_lines])
        if 0 < n_us < n:
            k = int(np.argmax(is_us != is_us[0]))
            repairs.add("mixed_units", "a file mixing millisecond and microsecond timestamps; each row "
                        "was converted by its own unit", 1,
                        [f"{where}:{int(parsed.lines[k])} (first row in {'µs' if is_us[k] else 'ms'})"])
        back = out_of_order(open_ns)
        if back.size:
            repairs.add("rows_reordered", "rows out of time order inside a file (sorted)", int(back.size),
                        [f"{where}:{int(parsed.lines[k])}" for k in back[:MAX_LISTED]])
        file_reports.append({
            "path": where, "member": member, "sha256": digest, "bytes": sizes[i], "rows": n,
            "header": parsed.header, "units": {"ms": n - n_us, "us": n_us}, "checksum": checksum,
            "first_open_time": _iso(int(open_ns.min())), "last_open_time": _iso(int(open_ns.max())),
            "parser": "c" if fast else "line-scan",
        })
        parts.append((open_ns, close_ns, parsed))
    return file_reports, parts


def _merge(files: list[Path], parts: list[tuple[np.ndarray, np.ndarray, _Parsed]], repairs: Repairs
           ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], int]:
    """All files as one series sorted by minute, exact duplicate minutes dropped (a repair) and
    conflicting ones refused (naming both file:lines). Returns open_ns, close_ns, columns, rows read."""
    open_ns = np.concatenate([p[0] for p in parts])
    close_ns = np.concatenate([p[1] for p in parts])
    cols = {c: np.concatenate([p[2].cols[c] for p in parts]) for c in FLOAT_COLUMNS + ("count",)}
    file_idx = np.concatenate([np.full(len(p[0]), i, dtype=np.int32) for i, p in enumerate(parts)])
    lines = np.concatenate([p[2].lines for p in parts])
    rows_read = len(open_ns)
    order = np.argsort(open_ns, kind="stable")
    open_ns, close_ns, file_idx, lines = open_ns[order], close_ns[order], file_idx[order], lines[order]
    cols = {c: v[order] for c, v in cols.items()}

    # each later copy of a minute must equal the row it follows (by induction, the first copy)
    dup, conflict = duplicates(open_ns, cols, close_ns // 1_000_000)
    if dup.size:
        if conflict is not None:
            b, c = conflict
            a = b - 1
            va = num(cols[c][a] if c != "close_time" else close_ns[a])
            vb = num(cols[c][b] if c != "close_time" else close_ns[b])
            raise DataError(
                f"conflicting duplicate minute {_iso(int(open_ns[b]))}: {files[file_idx[a]]}:{lines[a]} and "
                f"{files[file_idx[b]]}:{lines[b]} differ in {c} ({va} vs {vb}); remove the wrong copy",
                str(files[file_idx[b]]), int(lines[b]))
        repairs.add("exact_duplicates_dropped", "exact duplicate minutes dropped (the first copy is kept)",
                    int(dup.size), [f"{files[file_idx[i]]}:{lines[i]} (= {files[file_idx[i - 1]]}:{lines[i - 1]})"
                                    for i in dup[:MAX_LISTED]])
        keep = np.ones(len(open_ns), dtype=bool)
        keep[dup] = False
        open_ns, close_ns = open_ns[keep], close_ns[keep]
        cols = {c: v[keep] for c, v in cols.items()}
    return open_ns, close_ns, cols, rows_read


def _gaps(open_ns: np.ndarray, step: int, fill_gaps: bool) -> dict[str, Any]:
    """Missing bars between consecutive minutes: count, total, the longest, the first MAX_LISTED."""
    deltas = np.diff(open_ns)
    gap_at = np.flatnonzero(deltas > step)
    missing = deltas[gap_at] // step - 1
    gaps: dict[str, Any] = {"count": int(gap_at.size), "missing": int(missing.sum()) if gap_at.size else 0,
                            "longest": None, "where": [], "filled": bool(fill_gaps and gap_at.size)}
    if gap_at.size:
        def gap_item(i: int, m: int) -> dict[str, Any]:
            return {"after": _iso(int(open_ns[i])), "before": _iso(int(open_ns[i + 1])), "missing": int(m)}
        j = int(np.argmax(missing))
        gaps["longest"] = gap_item(int(gap_at[j]), int(missing[j]))
        gaps["where"] = [gap_item(int(i), int(m)) for i, m in zip(gap_at[:MAX_LISTED], missing[:MAX_LISTED])]
    return gaps


def _fill(frame: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """Insert the missing bars: prices = previous close, volumes and count 0, filled = True."""
    t = frame["open_time"]
    full = np.arange(t[0], t[-1] + step, step, dtype=np.int64)
    pos = np.searchsorted(full, t)
    present = np.zeros(len(full), dtype=bool)
    present[pos] = True
    src = np.cumsum(present) - 1  # index of the last real bar at or before each slot
    out: dict[str, np.ndarray] = {"open_time": full}
    prev_close = frame["close"][src]
    for c in PRICE_COLUMNS:
        v = prev_close.copy()
        v[pos] = frame[c]
        out[c] = v
    # a filled bar closes like the last real bar before it (…59.999 s for ms data, …59.999999 for µs)
    close_off = frame["close_time"] - t
    out["close_time"] = full + close_off[src]
    for c in VOLUME_COLUMNS:
        v = np.zeros(len(full), dtype=np.float64)
        v[pos] = frame[c]
        out[c] = v
    cnt = np.zeros(len(full), dtype=np.int64)
    cnt[pos] = frame["count"]
    out["count"] = cnt
    out["filled"] = ~present
    return {k: out[k] for k in (*COLUMNS, "filled")}


def _write(table, out: Path, report: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    from atm.utils import atomic_path

    small = {k: report[k] for k in ("kind", "symbol", "interval", "market", "rows", "first_open_time",
                                    "last_open_time", "fill_gaps")}
    small["gaps"] = {k: v for k, v in report["gaps"].items() if k != "where"}
    small["repair_counts"] = report["repair_counts"]
    meta = dict(table.schema.metadata or {})
    meta[b"atm.klines"] = json.dumps(small).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(out, suffix=".parquet") as tmp:
        # dictionary encoding buys nothing on float columns and costs ~4x the write time
        pq.write_table(table, tmp, use_dictionary=False)
        report["sha256"] = hashlib.sha256(tmp.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def read_klines_parquet(path: str | Path):
    """A klines parquet as the frame of docs/architecture.md (checked: columns, dtypes, order)."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise DataError("klines parquet not found (build it with `atm data build`)", str(path))
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"not a readable parquet file ({exc})", str(path)) from exc
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"not a klines parquet: missing columns {', '.join(missing)}", str(path))
    wanted = list(COLUMNS) + (["filled"] if "filled" in df.columns else [])
    df = df[wanted].reset_index(drop=True)
    for c in ("open_time", "close_time"):
        s = df[c]
        if not isinstance(s.dtype, pd.DatetimeTZDtype):
            s = pd.to_datetime(s, utc=True)
        df[c] = s.dt.tz_convert("UTC").astype("datetime64[ns, UTC]")
    for c in FLOAT_COLUMNS:
        df[c] = df[c].astype("float64")
    df["count"] = df["count"].astype("int64")
    if "filled" in df.columns:
        df["filled"] = df["filled"].astype(bool)
    t = df["open_time"].to_numpy(dtype="datetime64[ns]")  # not object Timestamps (350k rows: 2 s -> 2 ms)
    if len(t) > 1 and not (t[1:] > t[:-1]).all():
        raise DataError("open_time is not strictly increasing (unsorted or duplicate minutes)", str(path))
    return df


def parquet_info(path: str | Path) -> dict[str, Any]:
    """What ``atm data info`` prints: the parquet's own summary plus its sidecar when present."""
    import pyarrow.parquet as pq

    path = Path(path)
    df = read_klines_parquet(path)
    md = pq.read_schema(path).metadata or {}
    embedded = json.loads(md[b"atm.klines"]) if b"atm.klines" in md else {}
    t = df["open_time"]
    deltas = t.diff().dropna()
    step = deltas.min() if len(deltas) else None
    info: dict[str, Any] = {
        "path": str(path), "rows": len(df),
        "first_open_time": _iso(t.iloc[0].value) if len(df) else None,
        "last_open_time": _iso(t.iloc[-1].value) if len(df) else None,
        "columns": {c: str(d) for c, d in df.dtypes.items()},
        "gaps": int((deltas > step).sum()) if step is not None else 0,
        "filled": int(df["filled"].sum()) if "filled" in df.columns else 0,
        "symbol": embedded.get("symbol"), "interval": embedded.get("interval"),
        "market": embedded.get("market"), "repair_counts": embedded.get("repair_counts", {}),
    }
    sidecar = meta_path(path)
    if sidecar.exists():
        meta = json.loads(sidecar.read_text())
        info["sidecar"] = str(sidecar)
        info["input_files"] = len(meta.get("files", []))
        info["built"] = meta.get("provenance", {}).get("created")
    return info


# --------------------------------------------------------------------------------------------
# Synthetic klines in Binance's layout (tests, the bad-input corpus, benchmarks)
# --------------------------------------------------------------------------------------------

_US_FROM_NS = 1_735_689_600 * 1_000_000_000  # 2025-01-01: Binance spot files use µs from here on


def synthetic_rows(start: str, minutes: int, seed: int = 0, price: float = 100.0,
                   unit: str = "auto") -> list[list[str]]:
    """Random-walk 1m klines as Binance CSV fields (strings), ``unit`` 'ms' | 'us' | 'auto' (by date).

    The bars are internally consistent (low <= open, close <= high; taker volume <= volume), so a
    test can break exactly one thing and expect exactly one error.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    t0 = pd.Timestamp(start, tz="UTC").value
    opens_ns = t0 + np.arange(minutes, dtype=np.int64) * 60_000_000_000
    steps = rng.normal(0, 1e-3, minutes)
    close = price * np.exp(np.cumsum(steps))
    open_ = np.concatenate([[price], close[:-1]])
    wick = np.abs(rng.normal(0, 5e-4, (2, minutes)))
    high = np.maximum(open_, close) * (1 + wick[0])
    low = np.minimum(open_, close) * (1 - wick[1])
    vol = rng.gamma(2.0, 5.0, minutes)
    count = rng.integers(1, 500, minutes)
    taker = vol * rng.uniform(0, 1, minutes)
    rows = []
    for i in range(minutes):
        ns = int(opens_ns[i])
        us = unit == "us" or (unit == "auto" and ns >= _US_FROM_NS)
        ot = ns // 1000 if us else ns // 1_000_000
        ct = ot + (59_999_999 if us else 59_999)
        rows.append([str(ot), f"{open_[i]:.8f}", f"{high[i]:.8f}", f"{low[i]:.8f}", f"{close[i]:.8f}",
                     f"{vol[i]:.8f}", str(ct), f"{vol[i] * close[i]:.8f}", str(int(count[i])),
                     f"{taker[i]:.8f}", f"{taker[i] * close[i]:.8f}", "0"])
    return rows


def write_binance_file(folder: str | Path, symbol: str, label: str, rows: list[list[str]] | str | bytes,
                       interval: str = "1m", header: bool = False, as_zip: bool = True,
                       checksum: bool = True) -> Path:
    """Write ``SYMBOL-INTERVAL-LABEL.zip`` (one CSV inside) + ``.CHECKSUM`` the way Binance does."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(rows, (str, bytes)):
        text = rows.encode() if isinstance(rows, str) else rows
    else:
        lines = ([",".join(RAW_COLUMNS)] if header else []) + [",".join(r) for r in rows]
        text = ("\n".join(lines) + "\n").encode()
    name = f"{symbol}-{interval}-{label}"
    if not as_zip:
        path = folder / f"{name}.csv"
        path.write_bytes(text)
        return path
    path = folder / f"{name}.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        # a fixed member date keeps the zip (and its checksum) byte-for-byte reproducible
        zf.writestr(zipfile.ZipInfo(f"{name}.csv", date_time=(2025, 1, 1, 0, 0, 0)), text,
                    compress_type=zipfile.ZIP_DEFLATED)
    path.write_bytes(buf.getvalue())
    if checksum:
        path.with_name(path.name + ".CHECKSUM").write_text(
            f"{hashlib.sha256(buf.getvalue()).hexdigest()}  {path.name}\n")
    return path


def layout_dir(root: str | Path, symbol: str, interval: str = "1m", market: str = "spot",
               granularity: str = "daily") -> Path:
    """``root/data/{market}/{granularity}/klines/SYMBOL/INTERVAL`` (Binance's layout)."""
    return Path(root) / "data" / market / granularity / "klines" / symbol / interval
