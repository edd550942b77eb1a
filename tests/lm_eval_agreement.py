"""lm-eval's CLI (the `atm_advice` task of eval/lm_eval_tasks) and atm-eval on the same server and
items, paired item by item: tests/eval/test_eval_lmeval.py (chat, transformers engine) and
tests/serve/test_serve_vllm.py (token-id completions, a real vLLM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lm_eval_and_atm_eval(lm_model: str, model_args: str, atm_spec: str, data, n: int,
                         out: Path) -> list[tuple[dict, dict]]:
    """(lm-eval sample, atm-eval record) for each of the first ``n`` items: lm-eval's ``lm_model``
    with ``model_args`` (the chat template applied), then atm-eval's ``atm_spec``."""
    from atm.eval.harness import load_suite, run_eval
    from atm.eval.rundir import read_results

    p = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", lm_model,
         "--include_path", str(ROOT / "eval" / "lm_eval_tasks"), "--tasks", "atm_advice",
         "--model_args", model_args, "--apply_chat_template", "--limit", str(n), "--log_samples",
         "--output_path", str(out / "lmeval"), "--metadata", json.dumps({"data": str(data)})],
        capture_output=True, text=True, cwd=ROOT, timeout=900, env={**os.environ, "ATM_NO_PROGRESS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "atm_advice" in p.stdout and "balanced_acc" in p.stdout
    samples = [json.loads(x) for f in (out / "lmeval").rglob("samples_atm_advice_*.jsonl")
               for x in f.read_text().splitlines()]
    assert len(samples) == n
    # lm-eval's --limit takes the first n documents; atm-eval's --limit spreads n over the split,
    # so atm-eval takes the same first n minutes with `first`
    run_eval([atm_spec], load_suite(None, ["metrics.n_boot=100", f"first={n}"]), out / "ae", data=str(data),
             with_baselines=False, quiet=True)
    man = json.loads((out / "ae" / "manifest.json").read_text())
    recs = read_results(out / "ae" / man["models"][atm_spec]["file"])
    return [(s, recs[s["doc"]["id"]]) for s in samples]
