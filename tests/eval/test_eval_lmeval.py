"""The lm-eval task `atm_advice` (eval/lm_eval_tasks) run by the real `lm-eval` CLI against the real
`atm serve`, scored by the same scorer as atm-eval: both must agree item for item."""

from __future__ import annotations

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
    from atm.runtime import free_port
    from atm.serve.testing import ServerProcess
    from lm_eval_agreement import lm_eval_and_atm_eval

    port = free_port()
    srv = ServerProcess(["--model", f"tiny={tiny_merged}", "--engine", "transformers", "--parallel", "1"], port,
                        log=tmp_path / "serve.log")
    try:
        srv.wait_ready(180)
        pairs = lm_eval_and_atm_eval(
            "local-chat-completions",
            f"model=tiny,base_url=http://127.0.0.1:{port}/v1/chat/completions,num_concurrent=1,max_retries=3",
            f"openai:tiny@http://127.0.0.1:{port}/v1", sample_dataset, 8, tmp_path)
    finally:
        srv.stop()
    for s, r in pairs:
        assert s["filtered_resps"][0] == r["raw"], (s["filtered_resps"], r["raw"])  # same prompt, same answer
        assert s["acc"] == int(bool(r["valid"]) and r["advice"] == s["doc"]["label"])
        assert s["valid"] == int(bool(r["valid"]))
