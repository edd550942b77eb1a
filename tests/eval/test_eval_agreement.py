"""The engines agree (issue 21): the same tiny model on the same verify items, greedy, gives the same
advice whichever way it is run, because every engine enforces the one answer contract's grammar.

- GGUF paths: ``atm:q8`` in process (llama.cpp) vs ``openai:`` through ``atm serve`` on llama-server:
  identical advice on >= 99% of items in generate mode; in loglik mode the class probabilities
  (in process: exact option log-likelihoods; through the server: the top-20 log-probs at the
  advice token) within 0.02 on every item.
- GGUF F16 (``atm:f16`` in process) vs the HF weights it was made from (``hf:``, transformers with
  the grammar's regex): identical advice on >= 97% of items.

The suite asks 60 items (generate) and 30 (loglik) to stay near 2-3 minutes on 2 busy cores (100 and 50
took 238 s + 33 s);
``ATM_AGREEMENT_ITEMS=200`` asks the issue's 200 for both (measured on 2026-12-07, 2 shared cores:
in process vs llama-server 200/200 same advice in generate (97% byte-identical answers: the
change's last digits differ on 6 items) and in loglik (max |dP| 0.00064); F16 vs HF 200/200
identical answers, loglik max |dP| 0.00005). SmolLM2's run of the same comparison is
``benchmarks/bench_agreement.py`` (too slow for the suite).
"""

from __future__ import annotations

import json
import logging
import os

import pytest

from atm.eval.agreement import compare, run_records

N = int(os.environ.get("ATM_AGREEMENT_ITEMS", "0")) or None
N_GENERATE, N_LOGLIK = N or 60, N or 30
log = logging.getLogger(__name__)


def _suite():
    from atm.eval.harness import load_suite

    return load_suite(None, ["metrics.n_boot=50"])


def _run(spec, data, out, mode):
    from atm.eval.harness import run_eval

    n = N_LOGLIK if mode == "loglik" else N_GENERATE
    run_eval([spec], _suite(), out, data=str(data), limit=n, mode=mode, with_baselines=False, quiet=True)
    return run_records(out, spec)


@pytest.mark.slow
@pytest.mark.native
def test_in_process_and_llama_server_agree(tiny_gguf, sample_dataset, tmp_path):
    from atm.export.llamacpp import find_tool
    from atm.runtime import free_port
    from atm.serve.testing import ServerProcess

    if find_tool("llama-server") is None:
        pytest.skip("llama-server is not built here (atm doctor --build builds it)")
    figures = {}
    port = free_port()
    srv = ServerProcess(["--model", "atm:q8", "--engine", "llama-server", "--parallel", "1"], port,
                        log=tmp_path / "serve.log")
    try:
        srv.wait_ready(180)
        remote = f"openai:atm:q8@http://127.0.0.1:{port}/v1"
        for mode in ("generate", "loglik"):
            a = _run("atm:q8", sample_dataset, tmp_path / f"inproc-{mode}", mode)
            b = _run(remote, sample_dataset, tmp_path / f"server-{mode}", mode)
            figures[mode] = compare(a, b)
    finally:
        srv.stop()
    log.info("agreement in process vs llama-server: %s", json.dumps(figures))
    g, ll = figures["generate"], figures["loglik"]
    assert g["n"] == N_GENERATE and ll["n"] == N_LOGLIK and g["only_a"] == g["only_b"] == 0
    assert g["same_advice"] >= 0.99, g
    assert ll["n_probs"] == ll["n"] and ll["max_prob_diff"] <= 0.02, ll
    assert ll["same_advice"] >= 0.99, ll


@pytest.mark.slow
def test_gguf_f16_and_hf_weights_agree(tiny_gguf, tiny_merged, sample_dataset, tmp_path):
    a = _run("atm:f16", sample_dataset, tmp_path / "f16", "generate")
    b = _run(f"hf:{tiny_merged}", sample_dataset, tmp_path / "hf", "generate")
    fig = compare(a, b)
    log.info("agreement GGUF F16 vs HF: %s", json.dumps(fig))
    assert fig["n"] == N_GENERATE and fig["same_advice"] >= 0.97, fig
