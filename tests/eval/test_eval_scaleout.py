"""Eval scale-out on real parts: one model behind several `atm serve` endpoints (fan-out, one
killed mid-run), and a run cut into shards (`--shard K/N`) merged back by `atm-eval report`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from atm.errors import AtmError

ROOT = Path(__file__).resolve().parents[2]
ITEM_FIELDS = ("id", "raw", "advice", "predicted_change", "probs", "valid", "reason", "failed", "prompt_hash")


def _suite(**kw):
    from atm.eval.harness import load_suite

    return load_suite(None, ["metrics.n_boot=200", *[f"{k}={v}" for k, v in kw.items()]])


def _cli(*args, check=True, timeout=600):
    p = subprocess.run([sys.executable, "-m", "atm", "eval", *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "ATM_NO_PROGRESS": "1"}, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"atm eval {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def _records(out: Path, spec: str) -> list[dict]:
    """The records of ``spec`` in file order (every line: nothing deduped away)."""
    man = json.loads((out / "manifest.json").read_text())
    f = out / man["models"][spec]["file"]
    return [json.loads(x) for x in f.read_bytes().splitlines() if x.strip()]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connections are refused at once
    return port


# ---------------------------------------------------------------------------------- parsing
def test_shard_rule_and_endpoint_lists():
    from atm.eval.harness import parse_shard
    from atm.eval.providers import endpoint_args
    from atm.eval.rundir import shard_rows

    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None
    for bad in ("0/4", "5/4", "2", "a/b", "2/-1"):
        with pytest.raises(AtmError, match="--shard"):
            parse_shard(bad)
    # every item in exactly one shard, shards within one item of each other
    for n_items, n in ((41, 2), (10, 3), (7, 7), (5, 8)):
        parts = [list(shard_rows(n_items, k, n)) for k in range(1, n + 1)]
        assert sorted(i for p in parts for i in p) == list(range(n_items))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert endpoint_args("openai", "m@http://a/v1, http://b/v1") == ["m@http://a/v1", "m@http://b/v1"]
    assert endpoint_args("openai", "m@http://a/v1") == ["m@http://a/v1"]
    with pytest.raises(AtmError, match="listed twice"):
        endpoint_args("openai", "m@http://a/v1,http://a/v1")
    with pytest.raises(AtmError, match="no empty endpoint"):
        endpoint_args("openai", "m@http://a/v1,")


def test_fanout_with_every_endpoint_dead_records_failures_fast(sample_dataset, tmp_path):
    """Two endpoints that refuse connections: each item is recorded as a failure naming both,
    none lost or doubled, and the run gives up in seconds instead of waiting forever."""
    from atm.eval.harness import run_eval

    urls = [f"http://127.0.0.1:{_closed_port()}/v1" for _ in range(2)]
    spec = "openai:tiny@" + ",".join(urls)
    t0 = time.monotonic()
    m = run_eval([spec], _suite(**{"generation.retries": 1, "generation.backoff": 0.05}), tmp_path / "dead",
                 data=str(sample_dataset), limit=12, concurrency=2, with_baselines=False, quiet=True)
    assert time.monotonic() - t0 < 30
    r = m["models"][spec]
    assert r["n"] == 12 and r["failed"] == 12 and r["validity"]["valid"] == 0
    recs = _records(tmp_path / "dead", spec)
    assert len(recs) == len({x["id"] for x in recs}) == 12
    assert all(u in " ".join(x["reason"] for x in recs) for u in urls)


# ---------------------------------------------------------------------------------- fan-out
@pytest.mark.slow
@pytest.mark.native
def test_fanout_over_two_atm_serve_endpoints_one_killed_mid_run(tiny_gguf, sample_dataset, tmp_path):
    from atm.eval.harness import run_eval
    from atm.eval.report import write_report
    from atm.export.llamacpp import find_tool
    from atm.runtime import free_port
    from atm.serve.testing import ServerProcess

    if find_tool("llama-server") is None:
        pytest.skip("llama-server is not built here (atm doctor --build builds it)")
    servers = [ServerProcess(["--model", "atm:q8", "--parallel", "2"], free_port(), log=tmp_path / f"serve{k}.log")
               for k in range(2)]
    try:
        for s in servers:
            s.wait_ready(180)
        a, b = (f"{s.url}/v1" for s in servers)
        spec = f"openai:atm:q8@{a},{b}"
        out = tmp_path / "fan"
        n_items = 36
        suite = _suite(**{"generation.backoff": 0.2})
        box: dict = {}

        def run():
            try:
                box["m"] = run_eval([spec], suite, out, data=str(sample_dataset), limit=n_items, concurrency=2,
                                    with_baselines=False, quiet=True)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                box["err"] = exc

        th = threading.Thread(target=run)
        th.start()
        f = None
        deadline = time.monotonic() + 300
        killed_after = None
        while th.is_alive() and time.monotonic() < deadline:
            f = f or next((out / "predictions").glob("*.jsonl"), None) if (out / "predictions").exists() else None
            if f is not None:
                lines = [json.loads(x) for x in f.read_bytes().splitlines() if x.endswith(b"}")]
                by_b = [x for x in lines if x.get("endpoint") == b]
                if len(by_b) >= 3:  # endpoint B has answered a few items: kill it (and its llama-server)
                    os.killpg(servers[1].proc.pid, signal.SIGKILL)
                    servers[1].proc.wait(10)
                    killed_after = len(lines)
                    break
            time.sleep(0.01)
        th.join(300)
        assert "err" not in box, box.get("err")
        assert killed_after is not None and killed_after < n_items, "the run ended before endpoint B was killed"
        m = box["m"]
        recs = _records(out, spec)
        ids = [x["id"] for x in recs]
        assert len(ids) == len(set(ids)) == n_items  # none lost, none doubled
        assert not any(x["failed"] for x in recs) and all(x["valid"] for x in recs)
        count = {u: sum(x["endpoint"] == u for x in recs) for u in (a, b)}
        assert count[a] + count[b] == n_items and count[b] >= 3
        # after the kill only A answered (B's last answers, sent before it died, may land just after)
        assert count[a] >= n_items - killed_after - 2
        # an item that needed more than one request (in flight on B when it died) was finished by A
        assert all(x["endpoint"] == a for x in recs if x["attempts"] > 1)
        res = m["models"][spec]
        assert res["endpoints"] == {a: {"items": count[a], "failed": 0}, b: {"items": count[b], "failed": 0}}
        write_report([out], metrics=[m])
        md = (out / "report.md").read_text()
        assert "### Endpoints" in md and f"| `{b}` | {count[b]} | 0 |" in md
        # the same command again: nothing is asked twice
        run_eval([spec], suite, out, data=str(sample_dataset), limit=n_items, concurrency=2, with_baselines=False,
                 quiet=True)
        assert len(_records(out, spec)) == n_items
    finally:
        for s in servers:
            s.stop()


# ---------------------------------------------------------------------------------- shards
@pytest.mark.slow
def test_two_shards_merged_equal_one_run_and_a_killed_shard_resumes(tiny_gguf, sample_dataset, tmp_path):
    from atm.eval.harness import run_eval

    n_items = 40
    common = ["--model", "atm:q8", "--limit", str(n_items), "--set", "metrics.n_boot=200", "--no-report"]
    full = tmp_path / "full"
    ref = run_eval(["atm:q8"], _suite(), full, data=str(sample_dataset), limit=n_items, quiet=True)

    s1 = tmp_path / "q8-shard1of2"
    run_eval(["atm:q8"], _suite(), s1, data=str(sample_dataset), limit=n_items, quiet=True, shard="1/2")
    # shard 2 on a copy of the dataset elsewhere (another machine's path: the content decides), killed
    # with -9 once it has written a few answers, then run again: it resumes from its per-item file
    ds2 = tmp_path / "elsewhere" / sample_dataset.name
    shutil.copytree(sample_dataset, ds2)
    s2 = tmp_path / "q8-shard2of2"
    args = ["run", *common, "--data", str(ds2), "--shard", "2/2", "--out", str(s2)]
    proc = subprocess.Popen([sys.executable, "-m", "atm", "eval", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "ATM_NO_PROGRESS": "1"})
    kept = 0
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        f = next((s2 / "predictions").glob("atm_q8-*.jsonl"), None) if (s2 / "predictions").exists() else None
        if f is not None and f.read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "shard 2 ended before it could be killed"
    kept = len(_records(s2, "atm:q8"))
    assert 3 <= kept < n_items // 2
    _cli(*args)
    recs2 = _records(s2, "atm:q8")
    assert len(recs2) == len({x["id"] for x in recs2}) == n_items // 2  # resumed: none lost, none doubled

    merged = tmp_path / "merged"
    p = _cli("report", str(s1), str(s2), "--out", str(merged))
    assert f"merged 2 shards into {merged}" in p.stdout
    got = json.loads((merged / "metrics.json").read_text())
    assert set(got["models"]) == set(ref["models"])
    for spec, a in ref["models"].items():
        b = got["models"][spec]
        assert b["n"] == a["n"] == n_items and b["complete"]
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "ci", "confusion", "validity", "score"):
            assert b[k] == a[k], (spec, k)
        ra, rb = _records(full, spec), _records(merged, spec)
        assert [x["id"] for x in rb] == [x["id"] for x in ra]
        for x, y in zip(ra, rb):
            assert {k: x.get(k) for k in ITEM_FIELDS} == {k: y.get(k) for k in ITEM_FIELDS}, (spec, x["id"])
    assert got["verdicts"] == ref["verdicts"]
    # s/item adds up the shards' timed loops (the killed run's time never reached its manifest)
    sp = got["models"]["atm:q8"]["speed"]
    assert sp["n_timed"] == n_items - kept and sp["s_per_item"] == pytest.approx(sp["wall_s"] / sp["n_timed"])
    assert got["models"]["atm:q8"]["tokens"]["n"] == n_items
    md = (merged / "report.md").read_text()
    assert "Merged from 2 shards" in md and "q8-shard2of2" in md

    # what a merge refuses (cheap baseline-only shards; each check names its own reason)
    from atm.eval.rundir import merge_shards

    never = tmp_path / "never"

    def refused(*dirs, match, out=never):
        with pytest.raises(AtmError) as exc:
            merge_shards(list(dirs), out)
        assert match in str(exc.value), str(exc.value)
        assert not never.exists()

    refused(s1, match="missing shard 2/2")
    refused(s1, s1, match="given twice")
    refused(s1, full, match="not a shard")

    def shard2(name, suite=None, **kw):
        run_eval(["baseline:majority"], suite or _suite(), tmp_path / name, data=str(ds2), quiet=True, shard="2/2",
                 **{"limit": n_items, **kw})
        return tmp_path / name

    refused(s1, shard2("other-items", limit=n_items + 2), match="items (content hash")
    refused(s1, shard2("no-llm"), match="models: " + str(tmp_path / "no-llm") + " lacks atm:q8")
    refused(s1, shard2("other-suite", _suite(**{"generation.max_tokens": 48})), match="generation.max_tokens")
    refused(s1, s2, match="holds a run of its own", out=full)
    # and through the CLI: the error, no traceback, no directory
    p = _cli("report", str(s1), str(full), "--out", str(never), check=False)
    assert p.returncode != 0 and "are shards and" in p.stderr and "Traceback" not in p.stderr
    assert not never.exists()
