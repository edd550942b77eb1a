"""Download Binance public-data kline zips into Binance's own layout, checked and resumable.

For each day (or month) the ``.zip.CHECKSUM`` is fetched first, then the zip is streamed to a
temp name while hashing; only a zip whose SHA-256 matches its CHECKSUM and that opens as a
one-member zip is renamed into place (with its CHECKSUM beside it). So a file present in the
layout with a matching CHECKSUM is complete and verified, and a rerun skips it without any
network request (resume). Transient failures (connection errors, timeouts, HTTP 429/5xx) are
retried with exponential backoff; a 404 for both the CHECKSUM and the zip means the day does not
exist upstream (reported, not a failure). Network access uses only the standard library.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from atm.errors import AtmError
from atm.market.klines import GRANULARITIES, MARKETS

DEFAULT_BASE_URL = "https://data.binance.vision"
USER_AGENT = "atm-data-download/0.1 (+https://github.com/)"
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


class _Transient(Exception):
    """A failure worth retrying (network hiccup, 5xx, 429)."""


class _NotFound(Exception):
    """HTTP 404."""


class _Failed(Exception):
    """A permanent failure of one file (reason in the message)."""


@dataclass
class Target:
    """One file to fetch: its date label, URL and place in the local layout."""

    label: str
    url: str
    path: Path

    @property
    def checksum_url(self) -> str:
        return self.url + ".CHECKSUM"

    @property
    def checksum_path(self) -> Path:
        return self.path.with_name(self.path.name + ".CHECKSUM")


def _parse_day(text: str, end: bool) -> date:
    m = re.fullmatch(r"(\d{4})-(\d{2})(?:-(\d{2}))?", text.strip())
    if not m:
        raise AtmError(f"date {text!r} is not YYYY-MM-DD or YYYY-MM")
    y, mo = int(m.group(1)), int(m.group(2))
    try:
        if m.group(3):
            return date(y, mo, int(m.group(3)))
        if not end:
            return date(y, mo, 1)
        nxt = date(y + mo // 12, mo % 12 + 1, 1)
        return nxt - timedelta(days=1)
    except ValueError as exc:
        raise AtmError(f"date {text!r}: {exc}") from None


def date_labels(start: str, end: str, granularity: str) -> list[str]:
    """The file date labels from ``start`` to ``end`` inclusive: YYYY-MM-DD days or YYYY-MM months."""
    a, b = _parse_day(start, end=False), _parse_day(end, end=True)
    if b < a:
        raise AtmError(f"--end {end} is before --start {start}")
    if granularity == "daily":
        return [(a + timedelta(days=i)).isoformat() for i in range((b - a).days + 1)]
    out, y, m = [], a.year, a.month
    while (y, m) <= (b.year, b.month):
        out.append(f"{y:04d}-{m:02d}")
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def targets(symbol: str, interval: str, start: str, end: str, out: str | Path, market: str = "spot",
            granularity: str = "daily", base_url: str = DEFAULT_BASE_URL) -> list[Target]:
    """Every file of the range, as URL + local path in Binance's layout under ``out``."""
    if market not in MARKETS:
        raise AtmError(f"market {market!r} is not one of {', '.join(MARKETS)}")
    if granularity not in GRANULARITIES:
        raise AtmError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    symbol = symbol.upper()
    if not re.fullmatch(r"[A-Z0-9_]{2,30}", symbol):
        raise AtmError(f"symbol {symbol!r} does not look like a Binance symbol (e.g. BTCUSDT)")
    rel = f"data/{market}/{granularity}/klines/{symbol}/{interval}"
    base = base_url.rstrip("/")
    return [Target(lab, f"{base}/{rel}/{symbol}-{interval}-{lab}.zip",
                   Path(out) / rel / f"{symbol}-{interval}-{lab}.zip")
            for lab in date_labels(start, end, granularity)]


def _opener(url: str) -> urllib.request.OpenerDirector:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        # never send loopback traffic through an environment proxy
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _get(url: str, timeout: float, sink=None) -> bytes:
    """GET ``url``; body returned, or streamed into ``sink(chunk)``. Raises _NotFound/_Transient/_Failed."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with _opener(url).open(req, timeout=timeout) as resp:
            if sink is None:
                return resp.read()
            while True:
                chunk = resp.read(1 << 16)
                if not chunk:
                    return b""
                sink(chunk)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise _NotFound(url) from None
        if exc.code in TRANSIENT_HTTP:
            raise _Transient(f"HTTP {exc.code} for {url}") from None
        raise _Failed(f"HTTP {exc.code} {exc.reason} for {url}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Transient(f"{type(exc).__name__}: {reason} ({url})") from None


def _with_retries(fn, retries: int, backoff: float):
    """Call ``fn`` until it stops raising _Transient, at most ``retries`` extra times."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except _Transient as exc:
            if attempt == retries:
                raise _Failed(f"gave up after {retries + 1} attempts: {exc}") from None
            time.sleep(backoff * (2 ** attempt))
    raise AssertionError("unreachable")  # pragma: no cover


def _expected_sha(text: str, url: str) -> str:
    first = text.strip().split()[0].lower() if text.strip() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", first):
        raise _Failed(f"CHECKSUM is not 'SHA256  NAME': {text[:80]!r} ({url})")
    return first


def _local_verified(t: Target) -> bool:
    if not (t.path.is_file() and t.checksum_path.is_file()):
        return False
    try:
        expected = _expected_sha(t.checksum_path.read_text(errors="replace"), str(t.checksum_path))
    except _Failed:
        return False
    h = hashlib.sha256()
    with open(t.path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() == expected


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            if len(members) != 1:
                raise _Failed(f"zip holds {len(members)} files, expected one CSV")
            bad = zf.testzip()
            if bad is not None:
                raise _Failed(f"zip member {bad} fails its CRC check")
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise _Failed(f"not a readable zip although its checksum matches ({exc})") from None


def fetch_one(t: Target, retries: int = 4, backoff: float = 0.5, timeout: float = 60.0) -> str:
    """'already' | 'fetched' | 'missing'; raises _Failed with the reason."""
    if _local_verified(t):
        return "already"
    try:
        ck_text = _with_retries(lambda: _get(t.checksum_url, timeout), retries, backoff).decode(
            "utf-8", errors="replace")
    except _NotFound:
        try:  # is the zip there without its CHECKSUM, or is the whole day absent upstream?
            _with_retries(lambda: _get(t.url, timeout, sink=lambda _c: None), retries, backoff)
        except _NotFound:
            return "missing"
        raise _Failed("zip exists upstream but its .CHECKSUM is missing; cannot verify, not kept") from None
    expected = _expected_sha(ck_text, t.checksum_url)
    t.path.parent.mkdir(parents=True, exist_ok=True)
    for stale in t.path.parent.glob(f".{t.path.name}.*.part"):  # left by an interrupted earlier run
        stale.unlink(missing_ok=True)
    part = t.path.with_name(f".{t.path.name}.{os.getpid()}.part")
    try:
        for attempt in range(2):  # a mismatch may be in-flight corruption: fetch once more
            state: dict[str, Any] = {}

            def fetch() -> None:  # each (re)try starts the file and the hash afresh
                state["h"] = h = hashlib.sha256()
                with open(part, "wb") as fh:
                    def sink(chunk: bytes) -> None:
                        h.update(chunk)
                        fh.write(chunk)
                    _get(t.url, timeout, sink=sink)

            try:
                _with_retries(fetch, retries, backoff)
            except _NotFound:
                raise _Failed("CHECKSUM exists upstream but the zip is 404") from None
            got = state["h"].hexdigest()
            if got == expected:
                break
            if attempt == 1:
                raise _Failed(f"checksum mismatch: downloaded sha256 {got}, CHECKSUM says {expected}")
        _check_zip(part)
        os.replace(part, t.path)
        ck_part = t.checksum_path.with_name(f".{t.checksum_path.name}.{os.getpid()}.part")
        ck_part.write_text(ck_text if ck_text.endswith("\n") else ck_text + "\n")
        os.replace(ck_part, t.checksum_path)
    finally:
        if part.exists():
            part.unlink()
    return "fetched"


def download(symbol: str, interval: str, start: str, end: str, out: str | Path, market: str = "spot",
             granularity: str = "daily", base_url: str = DEFAULT_BASE_URL, retries: int = 4,
             backoff: float = 0.5, timeout: float = 60.0, workers: int = 4) -> dict[str, Any]:
    """Fetch every file of the range into ``out``; returns the summary (also what the CLI prints).

    Summary keys: ``fetched`` / ``already`` (counts), ``missing`` (date labels 404 upstream),
    ``failed`` (list of {file, reason}), plus the request echoed back and per-file ``results``.
    """
    from atm.utils import progress as progress_bar

    todo = targets(symbol, interval, start, end, out, market, granularity, base_url)
    results: dict[str, dict[str, str]] = {}

    def work(t: Target) -> tuple[Target, str, str | None]:
        try:
            return t, fetch_one(t, retries=retries, backoff=backoff, timeout=timeout), None
        except _Failed as exc:
            return t, "failed", str(exc)
        except OSError as exc:  # local disk trouble: report against this file, keep going
            return t, "failed", f"{type(exc).__name__}: {exc}"

    bar = progress_bar(total=len(todo), desc=f"download {symbol.upper()} {interval}", unit="file")
    with bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for fut in as_completed([pool.submit(work, t) for t in todo]):
            t, status, reason = fut.result()
            results[t.label] = {"status": status, "path": str(t.path), **({"reason": reason} if reason else {})}
            bar.update(1)
    results = dict(sorted(results.items()))
    summary = {
        "symbol": symbol.upper(), "interval": interval, "market": market, "granularity": granularity,
        "start": start, "end": end, "base_url": base_url, "out": str(out),
        "fetched": sum(r["status"] == "fetched" for r in results.values()),
        "already": sum(r["status"] == "already" for r in results.values()),
        "missing": [lab for lab, r in results.items() if r["status"] == "missing"],
        "failed": [{"file": Path(r["path"]).name, "reason": r["reason"]}
                   for r in results.values() if r["status"] == "failed"],
        "results": results,
    }
    return summary


__all__ = ["DEFAULT_BASE_URL", "Target", "date_labels", "download", "fetch_one", "targets"]
