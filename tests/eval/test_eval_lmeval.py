"""The lm-eval task `atm_advice` (eval/lm_eval_tasks) run by the real `lm-eval` CLI against the real
`atm serve`, scored by the same scorer as atm-eval: both must agree item for item."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "eval" / "lm_eval_tasks" / "atm_advice"


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def test_task_schema_is_the_advice_schema():
    from atm.prompting.advice import load_schema

    cfg = yaml.load((TASK / "atm_advice.yaml").read_text(), Loader=_Loader)
    assert cfg["generation_kwargs"]["response_format"]["json_schema"]["schema"] == load_schema()
    assert cfg["process_results"] == "!function utils.process_results"


def test_task_scorer_is_the_shared_one(sample_dataset):
    sys.path.insert(0, str(TASK))
    try:
        import utils  # the task's helpers
    finally:
        sys.path.pop(0)
    ds = utils.load_items(data=str(sample_dataset))["test"]
    doc = ds[0]
    from atm.prompting.advice import score_advice

    good = '{"predicted_open_change": "1.00000000", "advice": "%s"}' % doc["label"]
    r = utils.process_results(doc, [good])
    assert r["acc"] == 1 and r["valid"] == 1
    assert r["score_bps"] == score_advice(good, {a: doc[f"ret_{a}"] for a in ("BUY", "NOOP", "SELL")})
    bad = utils.process_results(doc, ['{"advice": "BUY"'])
    assert bad["acc"] == 0 and bad["valid"] == 0 and bad["balanced_acc"] == (doc["label"], "INVALID")
    assert utils.balanced_accuracy([("BUY", "BUY"), ("NOOP", "INVALID"), ("NOOP", "NOOP")]) == pytest.approx(0.75)


@pytest.mark.slow
def test_lm_eval_cli_against_atm_serve_agrees_with_atm_eval(tiny_merged, sample_dataset, tmp_path):
    from atm.eval.harness import load_suite, run_eval
    from atm.eval.rundir import read_results
    from atm.runtime import free_port
    from atm.serve.testing import ServerProcess

    port = free_port()
    srv = ServerProcess(["--model", f"tiny={tiny_merged}", "--engine", "transformers", "--parallel", "1"], port,
                        log=tmp_path / "serve.log")
    try:
        srv.wait_ready(180)
        n = 8
        out = tmp_path / "lmeval"
        p = subprocess.run(
            [sys.executable, "-m", "lm_eval", "run", "--model", "local-chat-completions",
             "--include_path", str(ROOT / "eval" / "lm_eval_tasks"), "--tasks", "atm_advice",
             "--model_args", f"model=tiny,base_url=http://127.0.0.1:{port}/v1/chat/completions,num_concurrent=1,max_retries=3",
             "--apply_chat_template", "--limit", str(n), "--log_samples", "--output_path", str(out),
             "--metadata", json.dumps({"data": str(sample_dataset)})],
            capture_output=True, text=True, cwd=ROOT, timeout=900, env={**os.environ, "ATM_NO_PROGRESS": "1"})
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "atm_advice" in p.stdout and "balanced_acc" in p.stdout
        samples = [json.loads(x) for f in out.rglob("samples_atm_advice_*.jsonl") for x in f.read_text().splitlines()]
        assert len(samples) == n
        spec = f"openai:tiny@http://127.0.0.1:{port}/v1"
        run_eval([spec], load_suite(None, ["metrics.n_boot=100"]), tmp_path / "ae", data=str(sample_dataset),
                 limit=n, with_baselines=False, quiet=True)
        man = json.loads((tmp_path / "ae" / "manifest.json").read_text())
        recs = read_results(tmp_path / "ae" / man["models"][spec]["file"])
    finally:
        srv.stop()
    for s in samples:
        r = recs[s["doc"]["id"]]
        assert s["filtered_resps"][0] == r["raw"], (s["filtered_resps"], r["raw"])  # same prompt, same answer
        assert s["acc"] == int(bool(r["valid"]) and r["advice"] == s["doc"]["label"])
        assert s["valid"] == int(bool(r["valid"]))
