"""The transformers engine: the registry model's merged HF dir served in process, same API.

(For GPU machines; here the plain CPU path.) Requests with equal sampling settings are decoded in
one padded batch; the answers must equal the ones decoded alone.
"""

from __future__ import annotations

import re
import threading

import httpx
import pytest

from atm.runtime import free_port
from atm.serve.testing import ServerProcess, klines_rows

pytestmark = [pytest.mark.slow]


def test_transformers_engine_serves_registry_model(tiny_gguf, tiny_merged, atm_home, btc_parquet, tmp_path):
    import openai

    port = free_port()
    with ServerProcess(["--engine", "transformers", "--model", "atm:q8", "--parallel", "4"], port,
                       env={"ATM_HOME": str(atm_home), "OMP_NUM_THREADS": "1"}, log=tmp_path / "serve.log") as srv:
        health = srv.wait_ready(240)
        assert health["models"][0]["engine"] == "transformers"
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        prompts = [f"question {i}" for i in range(4)]

        def ask(p):
            return client.chat.completions.create(model="atm:q8", max_tokens=6, temperature=0,
                                                  messages=[{"role": "user", "content": p}])

        alone = [ask(p).choices[0].message.content for p in prompts]
        together: dict[int, str] = {}

        def worker(i):
            together[i] = ask(prompts[i]).choices[0].message.content

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [together[i] for i in range(4)] == alone  # batching changes nothing but speed
        out = ask("hello")
        assert out.model == "atm:q8" and out.usage.completion_tokens <= 6
        comp = client.completions.create(model="atm:q8", prompt="<|user|>hi<|assistant|>", max_tokens=4)
        assert isinstance(comp.choices[0].text, str)
        # the same prompt as token ids (this engine adds no special tokens to a text prompt), and a
        # list of prompts: one choice per prompt, in order; an id outside the vocabulary is a 400
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tiny_merged / "tokenizer.json"))
        ids = tok.encode("<|user|>hi<|assistant|>", add_special_tokens=False).ids
        kw = dict(model="atm:q8", max_tokens=4, temperature=0)
        greedy = client.completions.create(prompt="<|user|>hi<|assistant|>", **kw).choices[0].text
        assert client.completions.create(prompt=ids, **kw).choices[0].text == greedy
        two = client.completions.create(prompt=[ids, ids], **kw)
        assert [(c.index, c.text) for c in two.choices] == [(0, greedy), (1, greedy)]
        with pytest.raises(openai.BadRequestError, match="outside the model's vocabulary"):
            client.completions.create(prompt=[ids, [10**6]], **kw)
        chunks = list(client.chat.completions.create(model="atm:q8", max_tokens=4, stream=True,
                                                     messages=[{"role": "user", "content": "x"}]))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        r = httpx.post(srv.url + "/v1/advice", timeout=120,
                       json={"model": "atm:q8", "klines": klines_rows(btc_parquet, 50, 20)})
        assert r.status_code == 200
        d = r.json()
        assert d["probs"] is None  # no log-probs from this engine
        assert d["valid"] in (True, False) and d["messages"][-1]["role"] == "user"
        # json_schema / json_object are enforced token by token, as llama-server does: a schema the
        # model never saw in training (it writes advice JSON, or prose for "question 0")
        import json

        import jsonschema

        schema = {"type": "object", "properties": {"side": {"type": "string", "enum": ["up", "down"]},
                  "v": {"type": "string", "pattern": "^[0-9]{2}[.][0-9]$"}}, "required": ["side", "v"],
                  "additionalProperties": False}
        for i in range(3):
            res = client.chat.completions.create(
                model="atm:q8", max_tokens=60, temperature=0, messages=[{"role": "user", "content": prompts[i]}],
                response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
            text = res.choices[0].message.content
            jsonschema.validate(json.loads(text), schema)
            assert not re.search(r"\s\s", text), text  # no whitespace padding
        obj = client.chat.completions.create(model="atm:q8", max_tokens=60, temperature=0,
                                             messages=[{"role": "user", "content": "hi"}],
                                             response_format={"type": "json_object"})
        text = obj.choices[0].message.content
        if obj.choices[0].finish_reason == "stop":  # an object the model closed itself
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_tokens: still an object under way, never prose
            assert text.lstrip().startswith("{") and not re.search(r"\s\s", text), text
        too_long = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": "atm:q8", "max_tokens": 4, "messages": [{"role": "user", "content": "w " * 5000}]})
        assert too_long.status_code == 400


def test_advice_contract_on_a_real_server(tiny_merged, btc_parquet, tmp_path):
    """Issue 22 end to end (this engine needs no llama.cpp): the answer matches its documented model
    and says which advice is generated; no count and a time after the data are 400s saying so; the
    log holds the ready line and one line per request, and no Duplicate Operation ID warning."""
    from atm.serve.api.protocol import AdviceResponse

    port = free_port()
    log = tmp_path / "serve.log"
    with ServerProcess(["--engine", "transformers", "--model", f"tiny={tiny_merged}",
                        "--set", f"klines.BTCUSDT={btc_parquet}"], port,
                       env={"OMP_NUM_THREADS": "1"}, log=log) as srv:
        srv.wait_ready(240)
        rows = klines_rows(btc_parquet, 200, 30)
        r = httpx.post(srv.url + "/v1/advice", json={"model": "tiny", "symbol": "BTCUSDT",
                                                     "time": "2025-08-05T12:00:00Z"}, timeout=120)
        d = AdviceResponse.model_validate(r.json())
        assert d.advice_source == "generated" and d.repairs == [] and d.time == "2025-08-05T12:00:00+00:00"
        assert d.scored_advice == (max(d.probs, key=d.probs.get) if d.probs else None)
        no_count = [{k: v for k, v in row.items() if k != "count"} for row in rows]
        r = httpx.post(srv.url + "/v1/advice", json={"model": "tiny", "klines": no_count}, timeout=60)
        assert r.status_code == 400 and "reads count (missing from klines[0]" in r.json()["error"]["message"]
        r = httpx.post(srv.url + "/v1/advice", json={"model": "tiny", "symbol": "BTCUSDT",
                                                     "time": "2025-09-01T00:00:00Z"}, timeout=60)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "time" and "`time` can be 2025-08-01T01:04:00+00:00 .. " \
            "2025-08-11T00:01:00+00:00" in err["message"]
        spec = httpx.get(srv.url + "/openapi.json").json()
        body = spec["paths"]["/v1/advice"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "klines" in body["properties"]
    text = log.read_text(errors="replace")
    assert f"atm serve: ready at {srv.url}" in text and "POST /v1/advice 400 " in text
    assert "GET /openapi.json 200" in text and "Duplicate Operation ID" not in text
    assert "Loading weights" not in text  # no progress bars into a log file
