"""`atm data download` against a real HTTP server on 127.0.0.1 serving Binance's layout.

The server serves a temp copy of the shipped sample (datasets/samples/binance) with faults
planted the way they happen upstream: a truncated zip, a wrong CHECKSUM, a missing CHECKSUM, a
zip that is garbage although its CHECKSUM matches, days that do not exist (404), and transient
HTTP 500s that succeed on retry.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from atm.market.download import date_labels, download, targets

REL = "data/spot/daily/klines/BTCUSDT/1m"


class FaultyHandler(SimpleHTTPRequestHandler):
    """Serves files; answers 500 to the first request of each path in ``server.fail_once``."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.log.append(self.path)
        with self.server.lock:
            if self.path in self.server.fail_once:
                self.server.fail_once.discard(self.path)
                self.send_error(500, "transient")
                return
        super().do_GET()

    def log_message(self, *args):  # keep pytest output clean; requests are in server.log
        pass


@pytest.fixture
def upstream(tmp_path, sample_raw):
    site = tmp_path / "site"
    shutil.copytree(sample_raw, site)
    d = site / REL

    def zip_(day):
        return d / f"BTCUSDT-1m-{day}.zip"

    def ck(day):
        return d / f"BTCUSDT-1m-{day}.zip.CHECKSUM"

    # 08-03: truncated in transit / on the mirror; CHECKSUM is the true one -> mismatch
    data = zip_("2025-08-03").read_bytes()
    zip_("2025-08-03").write_bytes(data[: len(data) // 2])
    # 08-04: CHECKSUM wrong
    ck("2025-08-04").write_text("0" * 64 + "  BTCUSDT-1m-2025-08-04.zip\n")
    # 08-05: CHECKSUM missing upstream
    ck("2025-08-05").unlink()
    # 08-06: garbage published with a matching CHECKSUM -> not a zip
    junk = b"this is not a zip file\n" * 50
    zip_("2025-08-06").write_bytes(junk)
    ck("2025-08-06").write_text(hashlib.sha256(junk).hexdigest() + "  BTCUSDT-1m-2025-08-06.zip\n")

    handler = functools.partial(FaultyHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.log, server.lock = [], threading.Lock()
    # 08-07's zip and 08-08's CHECKSUM fail once with HTTP 500, then succeed
    server.fail_once = {f"/{REL}/BTCUSDT-1m-2025-08-07.zip", f"/{REL}/BTCUSDT-1m-2025-08-08.zip.CHECKSUM"}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}", sample_raw / REL
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


GOOD = ["2025-08-01", "2025-08-02", "2025-08-07", "2025-08-08", "2025-08-09", "2025-08-10", "2025-08-11"]


def test_download_verifies_retries_resumes(upstream, tmp_path, cli):
    server, url, original = upstream
    out = tmp_path / "raw"
    s = download("BTCUSDT", "1m", "2025-07-31", "2025-08-12", out, base_url=url, retries=3, backoff=0.01,
                 timeout=10, workers=3)
    assert s["fetched"] == 7 and s["already"] == 0
    assert s["missing"] == ["2025-07-31", "2025-08-12"]
    failed = {f["file"]: f["reason"] for f in s["failed"]}
    assert set(failed) == {f"BTCUSDT-1m-2025-08-0{i}.zip" for i in (3, 4, 5, 6)}
    assert "checksum mismatch" in failed["BTCUSDT-1m-2025-08-03.zip"]
    assert "checksum mismatch" in failed["BTCUSDT-1m-2025-08-04.zip"]
    assert "CHECKSUM is missing" in failed["BTCUSDT-1m-2025-08-05.zip"]
    assert "not a readable zip" in failed["BTCUSDT-1m-2025-08-06.zip"]
    assert not server.fail_once, "both transient 500s were hit and retried"

    got = out / REL
    for day in GOOD:  # byte-identical to upstream, with the CHECKSUM beside it
        name = f"BTCUSDT-1m-{day}.zip"
        assert (got / name).read_bytes() == (original / name).read_bytes()
        assert (got / (name + ".CHECKSUM")).read_text().split()[0] == hashlib.sha256(
            (original / name).read_bytes()).hexdigest()
    names = sorted(p.name for p in got.iterdir())
    assert not [n for n in names if n.startswith(".") or n.endswith(".part")], names
    assert not any(f"2025-08-0{i}" in n for n in names for i in (3, 4, 5, 6)), "failed files must not be kept"

    # the downloaded layout builds; the four failed days show up as one reported gap
    from atm.market.klines import build_klines

    rep = build_klines(out, "BTCUSDT", out=tmp_path / "k.parquet", progress=False)
    assert rep["rows"] == 6 * 1440 + 1 and rep["checksums"]["verified"] == 7
    assert rep["gaps"]["count"] == 1 and rep["gaps"]["missing"] == 4 * 1440

    # resume through the real CLI: verified files are not requested again; failures still fail (rc 1)
    server.log.clear()
    proc = cli("data", "download", "--symbol", "BTCUSDT", "--start", "2025-07-31", "--end", "2025-08-12",
               "--base-url", url, "--out", str(out), "--retries", "1", check=False)
    assert proc.returncode == 1, proc.stderr
    assert "fetched 0, already there 7, missing upstream (404) 2, failed 4" in proc.stdout
    assert not [p for p in server.log if any(day in p for day in GOOD)], server.log

    # a partial leftover (no CHECKSUM beside it) and a tampered file are fetched again
    (got / "BTCUSDT-1m-2025-08-09.zip.CHECKSUM").unlink()
    tampered = got / "BTCUSDT-1m-2025-08-10.zip"
    tampered.write_bytes(tampered.read_bytes()[:100])
    (got / ".BTCUSDT-1m-2025-08-09.zip.999999.part").write_bytes(b"left by a killed run")
    server.log.clear()
    s2 = download("BTCUSDT", "1m", "2025-08-07", "2025-08-11", out, base_url=url, retries=1, backoff=0.01,
                  timeout=10)
    assert (s2["fetched"], s2["already"], s2["missing"], s2["failed"]) == (2, 3, [], [])
    assert tampered.read_bytes() == (original / tampered.name).read_bytes()
    assert not list(got.glob(".*")), "stale .part files are cleaned up"


def test_download_connection_refused_is_a_failure_not_a_crash(tmp_path, port):
    s = download("BTCUSDT", "1m", "2025-08-01", "2025-08-02", tmp_path, base_url=f"http://127.0.0.1:{port}",
                 retries=1, backoff=0.01, timeout=5)
    assert s["fetched"] == 0 and len(s["failed"]) == 2
    assert all("gave up after 2 attempts" in f["reason"] for f in s["failed"])
    assert not any(tmp_path.rglob("*.zip"))


def test_targets_follow_binance_layout(tmp_path):
    ts = targets("bnbbtc", "1m", "2023-08-30", "2023-09-02", tmp_path, market="futures/um",
                 base_url="https://data.binance.vision/")
    assert [t.label for t in ts] == ["2023-08-30", "2023-08-31", "2023-09-01", "2023-09-02"]
    assert ts[0].url == ("https://data.binance.vision/data/futures/um/daily/klines/BNBBTC/1m/"
                         "BNBBTC-1m-2023-08-30.zip")
    assert ts[0].checksum_url.endswith(".zip.CHECKSUM")
    assert ts[0].path == tmp_path / "data/futures/um/daily/klines/BNBBTC/1m/BNBBTC-1m-2023-08-30.zip"
    assert date_labels("2023-08-01", "2024-04-30", "monthly") == [
        "2023-08", "2023-09", "2023-10", "2023-11", "2023-12", "2024-01", "2024-02", "2024-03", "2024-04"]
    assert len(date_labels("2023-08-01", "2024-04-30", "daily")) == 274
    assert date_labels("2024-02", "2024-02", "daily")[-1] == "2024-02-29"


@pytest.mark.parametrize("args, message", [
    (("2024-05-01", "2024-04-30", "daily"), "before --start"),
    (("2024-13-01", "2024-12-31", "daily"), "month must be in 1..12"),
    (("yesterday", "2024-12-31", "daily"), "is not YYYY-MM-DD"),
])
def test_bad_dates_are_clear_errors(args, message):
    from atm.errors import AtmError

    with pytest.raises(AtmError, match=message):
        date_labels(*args)


def test_download_help_has_examples(cli):
    out = cli("data", "download", "--help").stdout
    assert "examples:" in out and "--granularity" in out and "data.binance.vision" in out
