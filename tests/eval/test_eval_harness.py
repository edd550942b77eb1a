"""The harness end to end: baselines on the sample, resume after kill -9, fuzzed model outputs,
retries and recorded failures, unknown model names.

Model outputs that no trained model produces on demand (truncated JSON, control characters, 500s,
timeouts) come from a real OpenAI-compatible HTTP server on 127.0.0.1 (stdlib ``http.server``),
asked through the real ``openai`` client by ``OpenAIProvider``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from atm.errors import AtmError

ROOT = Path(__file__).resolve().parents[2]

FUZZ = [
    ("", "empty"),
    ('{"predicted_open_change": "1.00000000", "advi', "truncated"),
    ('{"predicted_open_change": "1.00000000", "advice": "BUY", "why": "x"}', "extra key"),
    ('{"predicted_open_change": "1.00000000", "advice": "HOLD"}', "bad enum"),
    ('{"predicted_open_change": "1.00000000", "advice": "BU\x07Y"}', "control characters"),
    ('{"predicted_open_change": "1.0", "advice": "BUY"}', "bad number"),
    ("x" * 100_000, "too long"),
    ("Sure! I think you should BUY.", "not JSON"),
    ("[1, 2, 3]", "not an object"),
    ('{"predicted_open_change": "1.00000000", "advice": "SELL"}', None),  # the one valid answer
]


def _answer_for(content: str) -> str:
    h = int(hashlib.sha256(content.encode()).hexdigest()[:8], 16)
    advice = ("BUY", "NOOP", "SELL", "NOOP")[h % 4]
    return json.dumps({"predicted_open_change": f"{(h % 1000) / 100:.8f}", "advice": advice})


class FakeLLM:
    """A real OpenAI-compatible chat server whose answers are scripted per request."""

    def __init__(self, mode: str = "hash", delay: float = 0.0, fail_first: int = 0, slow_every: int = 0):
        self.mode, self.delay, self.fail_first, self.slow_every = mode, delay, fail_first, slow_every
        self.requests = 0
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    n = outer.requests
                if n <= outer.fail_first:
                    self.send_response(500)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "engine overloaded"}}')
                    return
                if outer.slow_every and n % outer.slow_every == 0:
                    time.sleep(3.0)  # past the client's timeout
                if outer.delay:
                    time.sleep(outer.delay)
                user = body["messages"][-1]["content"]
                if outer.mode == "fuzz":
                    idx = int(hashlib.sha256(user.encode()).hexdigest()[:8], 16) % len(FUZZ)
                    content = FUZZ[idx][0]
                else:
                    content = _answer_for(user)
                resp = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                data = json.dumps(resp).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    @property
    def spec(self) -> str:
        return f"openai:fake@http://127.0.0.1:{self.port}/v1"


def _suite(**kw):
    from atm.eval.harness import load_suite

    over = [f"{k}={v}" for k, v in kw.items()]
    return load_suite(None, ["metrics.n_boot=200", *over])


def _cli(*args, check=True, timeout=600, env=None):
    e = {**os.environ, "ATM_NO_PROGRESS": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "atm", "eval", *args], capture_output=True, text=True,
                       cwd=ROOT, env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"atm eval {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_unknown_model_lists_valid_forms():
    p = _cli("run", "--model", "gpt5", "--out", "/tmp/never", check=False)
    assert p.returncode == 2
    for form in ("atm:TAG", "openai:MODEL@BASE_URL", "ollama:NAME", "hf:PATH", "baseline:", "classic:"):
        assert form in p.stderr
    from atm.eval.providers import get_provider

    with pytest.raises(AtmError, match="valid: baseline:random"):
        get_provider("baseline:oracle")


def test_unknown_registry_name_lists_registered_models_and_valid_forms(tmp_path):
    # foo:bar looks like a registry name (name:tag) but may be a typo of another form
    p = _cli("run", "--model", "foo:bar", "--out", str(tmp_path / "never"), check=False,
             env={"ATM_HOME": str(tmp_path / "home")})
    assert p.returncode == 2, p.stderr
    assert "unknown model 'foo:bar'" in p.stderr and "known models: none" in p.stderr
    for form in ("atm:TAG", "openai:MODEL@BASE_URL", "ollama:NAME", "hf:PATH", "baseline:", "classic:"):
        assert form in p.stderr
    assert not (tmp_path / "never").exists()


def test_baselines_end_to_end_on_sample(sample_dataset, tmp_path):
    out = tmp_path / "run"
    p = _cli("run", "--model", "baseline:majority", "--model", "baseline:momentum", "--data", str(sample_dataset),
             "--out", str(out), "--set", "metrics.n_boot=300")
    assert "verdict: baseline:majority is" in p.stdout and "report:" in p.stdout
    md = (out / "report.md").read_text()
    assert "## Verdict" in md and "baseline:majority is " in md and "block bootstrap" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html
    assert "src='http" not in html and 'src="http' not in html and "<link" not in html  # self-contained
    m = json.loads((out / "metrics.json").read_text())
    maj = m["models"]["baseline:majority"]
    truth_n = m["n_items"]
    assert maj["n"] == truth_n and maj["validity"]["rate"] == 1.0
    # majority answers the train majority (NOOP on this sample): balanced accuracy exactly 1/3
    assert maj["balanced_accuracy"] == pytest.approx(1 / 3)
    assert maj["accuracy"] > 0.8  # and the raw accuracy that fooled the original experiment
    # every suite baseline ran beside the requested ones, on the same items
    assert set(m["models"]) == {f"baseline:{k}" for k in ("majority", "momentum", "prior", "random", "persistence")}
    # no provider saw labels: persistence used a lag measured on the label rule
    man = json.loads((out / "manifest.json").read_text())
    assert man["models"]["baseline:persistence"]["describe"]["lag"] >= 1
    # rerun: nothing is asked again, same metrics
    p2 = _cli("run", "--model", "baseline:majority", "--model", "baseline:momentum", "--data", str(sample_dataset),
              "--out", str(out), "--set", "metrics.n_boot=300")
    assert "already done" in p2.stdout
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["models"]["baseline:momentum"]["ci"] == m["models"]["baseline:momentum"]["ci"]


def test_fuzzed_outputs_are_invalid_with_reasons(sample_dataset, tmp_path):
    from atm.eval.harness import run_eval
    from atm.eval.rundir import read_results

    with FakeLLM(mode="fuzz") as srv:
        m = run_eval([srv.spec], _suite(), tmp_path / "fuzz", data=str(sample_dataset), limit=120,
                     with_baselines=False, concurrency=4, quiet=True)
        recs = read_results(tmp_path / "fuzz" / json.loads((tmp_path / "fuzz" / "manifest.json").read_text())
                            ["models"][srv.spec]["file"])
    assert len(recs) == 120
    seen = set()
    for r in recs.values():
        if r["valid"]:
            assert r["advice"] == "SELL"
            continue
        assert r["reason"], r
        seen.add(r["reason"].split(":")[0])
        assert len(r["raw"] or "") <= 4000  # huge outputs are clipped in the file, not kept whole
    expected = {why for _, why in FUZZ if why}
    assert expected <= seen, expected - seen
    res = m["models"][srv.spec]
    assert res["validity"]["valid"] < 120 and res["n"] == 120  # invalid answers counted, not dropped
    inv = sum(res["confusion"]["matrix"][i][3] for i in range(3))
    assert inv == 120 - res["validity"]["valid"]


def test_server_errors_retried_then_recorded(sample_dataset, tmp_path):
    from atm.eval.harness import run_eval
    from atm.eval.rundir import read_results

    # the first 3 requests fail with 500: with retries=3 every item still gets an answer
    with FakeLLM(fail_first=3) as srv:
        run_eval([srv.spec], _suite(**{"generation.backoff": 0.01}), tmp_path / "r1", data=str(sample_dataset),
                 limit=10, with_baselines=False, quiet=True)
        recs = list(read_results(next((tmp_path / "r1" / "predictions").glob("*.jsonl"))).values())
    assert len(recs) == 10 and all(r["valid"] for r in recs)
    assert max(r["attempts"] for r in recs) == 4
    # a server that keeps failing: every item is recorded as a failure, counted invalid, none dropped
    with FakeLLM(fail_first=10**6) as srv:
        m = run_eval([srv.spec], _suite(**{"generation.backoff": 0.01, "generation.retries": 1}),
                     tmp_path / "r2", data=str(sample_dataset), limit=6, with_baselines=False, quiet=True)
    r = m["models"][srv.spec]
    assert r["n"] == 6 and r["failed"] == 6 and r["validity"]["valid"] == 0 and r["accuracy"] == 0.0
    assert "request failed" in next(iter(r["validity"]["reasons"]))
    # timeouts too (client timeout 1 s, every 2nd request sleeps 3 s), then --retry-failed fixes them
    with FakeLLM(slow_every=2) as srv:
        m = run_eval([srv.spec], _suite(**{"generation.timeout": 1, "generation.retries": 0,
                                           "generation.backoff": 0.01}),
                     tmp_path / "r3", data=str(sample_dataset), limit=6, with_baselines=False, quiet=True)
        assert 0 < m["models"][srv.spec]["failed"] < 6
        srv.slow_every = 0
        m = run_eval([srv.spec], _suite(**{"generation.timeout": 1, "generation.retries": 0}),
                     tmp_path / "r3", data=str(sample_dataset), limit=6, with_baselines=False, quiet=True,
                     retry_failed=True)
    assert m["models"][srv.spec]["failed"] == 0 and m["models"][srv.spec]["n"] == 6


def test_torn_last_line_is_dropped_and_run_resumes(sample_dataset, tmp_path):
    from atm.eval.harness import run_eval
    from atm.eval.rundir import read_results

    out = tmp_path / "torn"
    with FakeLLM() as srv:
        m1 = run_eval([srv.spec], _suite(), out, data=str(sample_dataset), limit=40, with_baselines=False, quiet=True)
        f = next((out / "predictions").glob("*.jsonl"))
        lines = f.read_bytes().splitlines(keepends=True)
        f.write_bytes(b"".join(lines[:25]) + lines[25][:17])  # a kill in the middle of a write
        assert len(read_results(f)) == 25
        m2 = run_eval([srv.spec], _suite(), out, data=str(sample_dataset), limit=40, with_baselines=False, quiet=True)
    recs = [json.loads(x) for x in f.read_bytes().splitlines()]
    assert len(recs) == 40 and len({r["id"] for r in recs}) == 40
    assert m2["models"][srv.spec]["ci"] == m1["models"][srv.spec]["ci"]
    # a run dir holding other items is refused, not mixed
    with pytest.raises(AtmError, match="other items"):
        run_eval(["baseline:majority"], _suite(), out, data=str(sample_dataset), limit=41, quiet=True)


@pytest.mark.slow
def test_kill9_at_random_points_then_rerun_matches_uninterrupted(sample_dataset, tmp_path):
    """kill -9 the CLI at random moments; rerunning ends with the same metrics as one clean run."""
    rng = random.Random(7)
    with FakeLLM(delay=0.01) as srv:
        args = ["run", "--model", srv.spec, "--model", "baseline:momentum", "--data", str(sample_dataset),
                "--limit", "300", "--concurrency", "3", "--set", "metrics.n_boot=200", "--no-report"]
        clean = tmp_path / "clean"
        _cli(*args, "--out", str(clean))
        ref = json.loads((clean / "metrics.json").read_text())
        out = tmp_path / "killed"
        kills = 0
        for _ in range(6):
            proc = subprocess.Popen([sys.executable, "-m", "atm", "eval", *args, "--out", str(out)], cwd=ROOT,
                                    env={**os.environ, "ATM_NO_PROGRESS": "1"}, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(1.0, 4.0))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait(60)
        _cli(*args, "--out", str(out))
    assert kills >= 1
    got = json.loads((out / "metrics.json").read_text())
    for spec in ref["models"]:
        a, b = ref["models"][spec], got["models"][spec]
        assert b["n"] == a["n"] == 300
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "ci", "confusion", "validity"):
            assert b[k] == a[k], (spec, k)
    for f in (out / "predictions").glob("*.jsonl"):
        ids = [json.loads(x)["id"] for x in f.read_bytes().splitlines()]
        assert len(ids) == len(set(ids)) == 300


def test_every_suite_loads():
    from atm.eval.harness import SuiteConfig, suites_dir

    suites = sorted(suites_dir().glob("*.yaml"))
    assert suites
    for s in suites:
        SuiteConfig.load(s)


def test_report_over_several_runs_and_partial_run(sample_dataset, tmp_path):
    """`atm-eval report A B` writes one report with a section per run; a run whose model stopped
    early is reported as INCOMPLETE over the items it answered, not silently as complete."""
    from atm.eval.harness import run_eval
    from atm.eval.rundir import read_results

    a, b = tmp_path / "a", tmp_path / "b"
    run_eval(["baseline:majority"], _suite(), a, data=str(sample_dataset), limit=200, quiet=True)
    run_eval(["baseline:momentum"], _suite(), b, data=str(sample_dataset), limit=300, quiet=True)
    f = next(p for p in (b / "predictions").glob("*.jsonl") if "momentum" in p.name)
    lines = f.read_bytes().splitlines(keepends=True)
    f.write_bytes(b"".join(lines[:250]))
    assert len(read_results(f)) == 250
    out = tmp_path / "both"
    p = _cli("report", str(a), str(b), "--out", str(out))
    assert "verdict: baseline:majority is" in p.stdout
    md = (out / "report.md").read_text()
    assert md.count("# ATM evaluation") == 2
    assert "INCOMPLETE" in md and "baseline:momentum (250/300)" in md
    assert (out / "report.html").stat().st_size > 10_000


def test_constant_answer_interval_is_exact_in_the_report(sample_dataset, tmp_path):
    """baseline:majority (always NOOP) through the harness and the report, on a few hundred mostly
    quiet minutes: its balanced-accuracy interval is its exact value, not [0.333, 1.000], and the
    report still warns about the rare classes."""
    from atm.eval.harness import run_eval

    out = tmp_path / "run"
    from atm.eval.report import write_report

    run_eval(["baseline:majority"], _suite(), out, data=str(sample_dataset), limit=400, quiet=True)
    write_report([out])
    m = json.loads((out / "metrics.json").read_text())
    maj = m["models"]["baseline:majority"]
    support = {c: v["support"] for c, v in maj["per_class"].items()}
    present = sum(v > 0 for v in support.values())
    assert present >= 2, support  # a set that holds a minority class
    assert maj["balanced_accuracy"] == pytest.approx(1 / present)
    assert maj["ci"]["balanced_accuracy"] == [pytest.approx(1 / present, abs=1e-12)] * 2
    md = (out / "report.md").read_text()
    assert f"[{1 / present:.3f}, {1 / present:.3f}]" in md
    if min(v for v in support.values() if v) < 10:
        assert "fewer than 10 times" in md


def test_limit_is_evenly_spaced_and_the_terminal_says_what_was_taken(sample_dataset, tmp_path):
    """`--limit 200` took the first 200 minutes (all NOOP, every model 1.000) and said nothing: now N
    items evenly spaced over the split, the dataset, split and selection printed at the start, the
    class counts and the few-minority warning beside the table."""
    import pandas as pd

    from atm.eval.rundir import spaced_rows

    assert spaced_rows(10, 4) == [0, 2, 5, 7] and spaced_rows(3, 5) == [0, 1, 2]
    out = tmp_path / "lim"
    p = _cli("run", "--model", "baseline:majority", "--data", str(sample_dataset), "--limit", "60",
             "--no-baselines", "--no-report", "--set", "metrics.n_boot=50", "--out", str(out))
    lines = p.stdout.splitlines()
    assert f"dataset: {sample_dataset} (from --data)" in lines
    assert "split: verify (suite 'default'; give --split to change)" in lines
    items = next(ln for ln in lines if ln.startswith("items: "))
    assert items.startswith("items: 60 of ") and ", evenly spaced over the split (--limit 60;" in items
    assert "--set first=N" in items
    truth = pd.read_parquet(out / "truth.parquet")
    every = pd.read_parquet(next((sample_dataset / "items" / "data").glob("verify-*.parquet")))
    span = (truth["open_time"].max() - truth["open_time"].min()) / (every["open_time"].max() - every["open_time"].min())
    assert len(truth) == 60 and span > 0.95
    assert any(ln.startswith("true classes: BUY ") for ln in lines)
    assert any(ln.startswith("WARNING: ") and "fewer than 10 times" in ln for ln in lines)


def test_a_failed_new_run_leaves_no_files(sample_dataset, tmp_path):
    """A model typo that fails after the run directory was set up left manifest.json and
    truth.parquet in --out; now nothing is left (an existing run is never touched)."""
    out = tmp_path / "typo"
    p = _cli("run", "--model", "baseline:majorty", "--data", str(sample_dataset), "--no-baselines",
             "--out", str(out), check=False)
    assert p.returncode == 2 and "majorty" in p.stderr
    assert not out.exists()
    out.mkdir()
    p = _cli("run", "--model", "baseline:majorty", "--data", str(sample_dataset), "--no-baselines",
             "--out", str(out), check=False)
    assert p.returncode == 2 and out.is_dir() and not any(out.iterdir())


def test_a_shard_says_which_items_it_took(sample_dataset, tmp_path):
    p = _cli("run", "--model", "baseline:majority", "--data", str(sample_dataset), "--limit", "40", "--shard", "2/4",
             "--no-baselines", "--no-report", "--set", "metrics.n_boot=20", "--out", str(tmp_path / "s"))
    assert "shard 2/4: 10 of those items (every 4th one, from the 2nd)" in p.stdout.splitlines()
