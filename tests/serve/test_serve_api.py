"""`atm serve` with the real `openai` and `ollama` clients, on the tiny pipeline's GGUFs.

One real server process serves atm:q8 and atm:q4 (two llama-server engines) on 127.0.0.1; every
test talks to it over HTTP exactly as a user's tools would.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from atm.runtime import free_port
from atm.serve.testing import ServerProcess, klines_rows

pytestmark = [pytest.mark.native, pytest.mark.slow]

# the advice schema written the way users write regexes, with `\d` and `\.` (llama.cpp's converter
# ignores `\d` - any string passes - and its Python twin chokes on `\.`; atm serve rewrites both)
DOT_SCHEMA = {
    "type": "object",
    "properties": {
        "predicted_open_change": {"type": "string", "pattern": r"^-?(0|[1-9]\d{0,3})\.\d{2}$"},
        "advice": {"type": "string", "enum": ["BUY", "NOOP", "SELL"]},
    },
    "required": ["predicted_open_change", "advice"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tiny_gguf, atm_home, btc_parquet, tmp_path_factory):
    port = free_port()
    with ServerProcess(["--model", "atm:q8", "--model", "atm:q4", "--parallel", "4",
                        "--ctx-size", "1024", "--set", f"klines.BTCUSDT={btc_parquet}"], port,
                       env={"ATM_HOME": str(atm_home)},
                       log=tmp_path_factory.mktemp("serve") / "serve.log") as srv:
        srv.wait_ready(180)
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def olm(server):
    import ollama

    return ollama.Client(host=server.url, timeout=60)


MSG = [{"role": "user", "content": "What does the market look like?"}]


# ------------------------------------------------------------------------------------ OpenAI


def test_models_list(oai):
    ids = sorted(m.id for m in oai.models.list().data)
    assert ids == ["atm:q4", "atm:q8"]


def test_chat_completion(oai):
    out = oai.chat.completions.create(model="atm:q8", messages=MSG, max_tokens=12, temperature=0)
    assert out.model == "atm:q8"
    assert out.object == "chat.completion"
    assert isinstance(out.choices[0].message.content, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert 0 < out.usage.completion_tokens <= 12
    assert out.usage.prompt_tokens > 5


def test_several_models_at_once(oai):
    a = oai.chat.completions.create(model="atm:q8", messages=MSG, max_tokens=4, temperature=0)
    b = oai.chat.completions.create(model="atm:q4", messages=MSG, max_tokens=4, temperature=0)
    assert (a.model, b.model) == ("atm:q8", "atm:q4")


def test_completion(oai):
    out = oai.completions.create(model="atm:q8", prompt="<|user|>hello<|assistant|>", max_tokens=8,
                                 temperature=0)
    assert out.object == "text_completion"
    assert isinstance(out.choices[0].text, str)
    assert 0 < out.usage.completion_tokens <= 8


def test_completion_token_ids_and_prompt_lists(oai, tiny_merged):
    """OpenAI's prompt forms on llama-server: token ids answer as the same text does; a list of
    texts or of token-id lists gets one choice per prompt, in order (usage summed), streamed too."""
    from tokenizers import Tokenizer

    texts = ["<|user|>hello<|assistant|>", "<|user|>advise<|assistant|>"]
    kw = dict(model="atm:q8", max_tokens=8, temperature=0)
    single = [oai.completions.create(prompt=t, **kw) for t in texts]
    tok = Tokenizer.from_file(str(tiny_merged / "tokenizer.json"))
    bos = json.loads((tiny_merged / "config.json").read_text())["bos_token_id"]
    ids = []
    for t, s in zip(texts, single):  # as llama-server tokenizes a text prompt (bos first or not)
        x = tok.encode(t).ids
        ids.append([bos] + x if s.usage.prompt_tokens == len(x) + 1 else x)
        assert len(ids[-1]) == s.usage.prompt_tokens
    one = oai.completions.create(prompt=ids[0], **kw)
    assert one.choices[0].text == single[0].choices[0].text
    for prompt in (texts, ids):
        out = oai.completions.create(prompt=prompt, **kw)
        assert [(c.index, c.text) for c in out.choices] == [(i, s.choices[0].text) for i, s in enumerate(single)]
        assert out.usage.completion_tokens == sum(s.usage.completion_tokens for s in single)
    chunks = list(oai.completions.create(prompt=ids, stream=True, **kw))
    for i, s in enumerate(single):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) == s.choices[0].text


def test_chat_streaming_matches_non_streaming(oai):
    kw = dict(model="atm:q8", messages=MSG, max_tokens=16, temperature=0, seed=1)
    full = oai.chat.completions.create(**kw).choices[0].message.content
    chunks = list(oai.chat.completions.create(stream=True, **kw))
    assert len(chunks) >= 2
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_completion_streaming_matches_non_streaming(oai):
    # constrained, so the tiny model cannot end at once with eos: the text is never empty
    kw = dict(model="atm:q8", prompt="<|user|>x<|assistant|>", max_tokens=40, temperature=1.0, seed=5,
              extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": DOT_SCHEMA}}})
    full = oai.completions.create(**kw).choices[0].text
    chunks = list(oai.completions.create(stream=True, **kw))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    jsonschema.validate(json.loads(full), DOT_SCHEMA)


def test_json_schema_always_valid_with_escaped_dot(oai):
    """100% valid under a schema whose pattern uses `\\.`, at temperature 1 (random tokens)."""
    for seed in range(12):
        out = oai.chat.completions.create(
            model="atm:q8", messages=MSG, max_tokens=48, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "advice", "schema": DOT_SCHEMA}})
        obj = json.loads(out.choices[0].message.content)
        jsonschema.validate(obj, DOT_SCHEMA)


def test_advice_schema_valid_and_parsed(oai, tiny_gguf):
    """The model's own schema (from the registry) through the chat API: the one parser accepts it."""
    from atm.export.registry import Registry
    from atm.prompting.advice import parse_advice

    schema = Registry().resolve("atm:q8").schema
    for seed in range(8):
        out = oai.chat.completions.create(
            model="atm:q4", messages=MSG, max_tokens=64, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "advice", "schema": schema}})
        parsed = parse_advice(out.choices[0].message.content)
        assert parsed.valid, (parsed.reason, out.choices[0].message.content)


def test_json_object_mode(oai):
    out = oai.chat.completions.create(model="atm:q8", messages=MSG, max_tokens=32, temperature=0.8,
                                      seed=4, response_format={"type": "json_object"})
    content = out.choices[0].message.content
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by max_tokens: still a JSON object prefix
        assert content.lstrip().startswith("{")


def test_completions_json_schema(oai):
    out = oai.completions.create(model="atm:q8", prompt="<|user|>advise<|assistant|>", max_tokens=48,
                                 temperature=1.0, seed=2, extra_body={"response_format": {
                                     "type": "json_schema", "json_schema": {"name": "a", "schema": DOT_SCHEMA}}})
    jsonschema.validate(json.loads(out.choices[0].text), DOT_SCHEMA)


def test_seed_reproducible_and_stop(oai):
    kw = dict(model="atm:q8", messages=MSG, max_tokens=24, temperature=1.0, seed=7)
    a = oai.chat.completions.create(**kw).choices[0].message.content
    b = oai.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    if len(a) > 3:
        stop = a[2:4]
        c = oai.chat.completions.create(stop=[stop], **kw)
        assert stop not in c.choices[0].message.content
        assert c.choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------------ Ollama


def test_ollama_version_tags_show(olm, server):
    assert httpx.get(server.url + "/api/version").json()["version"]
    names = sorted(m.model for m in olm.list().models)
    assert names == ["atm:q4", "atm:q8"]
    q8 = next(m for m in olm.list().models if m.model == "atm:q8")
    assert q8.size > 0 and q8.details.format == "gguf" and q8.details.quantization_level == "Q8_0"
    show = olm.show("atm:q8")
    assert show.modelinfo["llama.context_length"] == 1024
    assert "completion" in show.capabilities
    assert show.details.family == "llama"


def test_ollama_chat(olm):
    r = olm.chat(model="atm:q8", messages=MSG, options={"num_predict": 10, "temperature": 0})
    assert r.message.role == "assistant"
    assert isinstance(r.message.content, str)
    assert r.done and r.done_reason in ("stop", "length")
    assert 0 < r.eval_count <= 10 and r.prompt_eval_count > 0


def test_ollama_chat_stream(olm):
    parts = list(olm.chat(model="atm:q8", messages=MSG, stream=True,
                          options={"num_predict": 12, "temperature": 0, "seed": 1}))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    streamed = "".join(p.message.content for p in parts)
    full = olm.chat(model="atm:q8", messages=MSG, options={"num_predict": 12, "temperature": 0, "seed": 1})
    assert streamed == full.message.content


def test_ollama_generate_and_stream(olm):
    r = olm.generate(model="atm:q4", prompt="hello", options={"num_predict": 8, "temperature": 0})
    assert isinstance(r.response, str) and r.done
    parts = list(olm.generate(model="atm:q4", prompt="hello", stream=True,
                              options={"num_predict": 8, "temperature": 0}))
    assert parts[-1].done
    assert "".join(p.response for p in parts) == r.response
    raw = olm.generate(model="atm:q4", prompt="<|user|>hi<|assistant|>", raw=True,
                       options={"num_predict": 4})
    assert raw.done


def test_ollama_format_schema_and_json(olm):
    for seed in range(6):
        r = olm.chat(model="atm:q8", messages=MSG, format=DOT_SCHEMA,
                     options={"num_predict": 48, "temperature": 1.0, "seed": seed})
        jsonschema.validate(json.loads(r.message.content), DOT_SCHEMA)
    g = olm.generate(model="atm:q8", prompt="advise", format=DOT_SCHEMA,
                     options={"num_predict": 48, "temperature": 1.0, "seed": 9})
    jsonschema.validate(json.loads(g.response), DOT_SCHEMA)
    j = olm.chat(model="atm:q8", messages=MSG, format="json", options={"num_predict": 24, "seed": 3})
    assert j.message.content.lstrip().startswith("{")


def test_ollama_errors_are_ollama_shaped(olm):
    import ollama

    with pytest.raises(ollama.ResponseError) as exc:
        olm.chat(model="nope:q1", messages=MSG)
    assert exc.value.status_code == 404
    assert "atm:q8" in exc.value.error  # names the served models


# ------------------------------------------------------------------------------------ advice


def test_advice_from_klines(server, btc_parquet):
    from atm.prompting.advice import parse_advice

    rows = klines_rows(btc_parquet, 200, 30)
    r = httpx.post(server.url + "/v1/advice", json={"model": "atm:q8", "klines": rows}, timeout=60)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["valid"] and d["advice"] in ("BUY", "NOOP", "SELL")
    assert parse_advice(d["raw"]).valid
    assert d["time"].startswith(rows[-1]["open_time"][:14])  # the minute after the last bar
    assert d["last_kline"] == rows[-1]["open_time"]
    assert d["messages"][-1]["role"] == "user" and d["context"] in d["messages"][-1]["content"]
    probs = d["probs"]
    assert set(probs) == {"BUY", "NOOP", "SELL"}
    assert abs(sum(probs.values()) - 1) < 1e-3
    # the chosen advice is never one the engine gave no probability to
    assert probs[d["advice"]] > 0


def test_advice_matches_dataset_prompt(server, sample_dataset, btc_parquet):
    """Served prompts are the training prompts: /v1/advice by symbol+time renders the same user
    message as the dataset's items view for that minute."""
    import pandas as pd

    items = pd.read_parquet(next((sample_dataset / "items" / "data").glob("verify-*.parquet")))
    item = items.iloc[5]
    t = pd.Timestamp(item["open_time"]).isoformat()
    r = httpx.post(server.url + "/v1/advice", json={"model": "atm:q8", "symbol": "BTCUSDT", "time": t},
                   timeout=60)
    assert r.status_code == 200, r.text
    served = r.json()["messages"]
    trained = [dict(m) for m in item["prompt"]]
    assert served == trained


# ------------------------------------------------------------------------------------ health, metrics


def test_health_and_metrics(server, oai):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"
    assert {m["model"] for m in h["models"]} == {"atm:q8", "atm:q4"}
    assert all(m["engine"] == "llama-server" and m["pid"] for m in h["models"])
    oai.chat.completions.create(model="atm:q8", messages=MSG, max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    assert 'atm_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'atm_generated_tokens_total{model="atm:q8"}' in text
    assert 'atm_request_latency_seconds_bucket{le="0.5",route="/v1/chat/completions"}' in text
    assert 'atm_engine_ready{model="atm:q4"} 1.0' in text


def test_advice_checks_klines_like_the_build(server, btc_parquet):
    """A bar `atm data build` refuses is a 400 naming its row; a window sent out of order is sorted
    and the answer says so (the same counted repair the build reports)."""
    rows = klines_rows(btc_parquet, 200, 30)
    bad = [dict(r) for r in rows]
    bad[7]["high"], bad[7]["low"] = bad[7]["low"] - 1.0, bad[7]["high"]
    r = httpx.post(server.url + "/v1/advice", json={"model": "atm:q8", "klines": bad}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "klines" and err["message"].startswith("klines[7]: high ")
    shuffled = rows[:10] + rows[10:20][::-1] + rows[20:]
    r = httpx.post(server.url + "/v1/advice", json={"model": "atm:q8", "klines": shuffled}, timeout=60)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["last_kline"] == rows[-1]["open_time"]
    assert [x["kind"] for x in d["repairs"]] == ["rows_reordered"] and d["repairs"][0]["count"] == 9
    ok = httpx.post(server.url + "/v1/advice", json={"model": "atm:q8", "klines": rows}, timeout=60).json()
    assert ok["repairs"] == [] and ok["messages"] == d["messages"]  # the same prompt once sorted


def test_advice_says_which_answer_is_which_and_refuses_silent_fills(server, btc_parquet):
    """Issue 22 against the real server: the response matches its documented model and names the
    generated and the scored answer; no count, a time after the data, are 400s saying so; the
    server logged each request and said where it is ready."""
    from atm.serve.api.protocol import AdviceResponse

    rows = klines_rows(btc_parquet, 200, 30)
    r = httpx.post(server.url + "/v1/advice", json={"model": "atm:q8", "klines": rows}, timeout=60)
    d = AdviceResponse.model_validate(r.json())
    assert d.advice_source == "generated" and d.scored_advice == max(d.probs, key=d.probs.get)
    no_count = [{k: v for k, v in row.items() if k != "count"} for row in rows]
    r = httpx.post(server.url + "/v1/advice", json={"model": "atm:q8", "klines": no_count}, timeout=60)
    assert r.status_code == 400 and "reads count (missing from klines[0]" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/advice", json={"model": "atm:q8", "symbol": "BTCUSDT",
                                                     "time": "2025-09-01T00:00:00Z"}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "time"
    assert "outside the data: BTCUSDT klines cover 2025-08-01T00:00:00+00:00 .. 2025-08-11T00:00:00+00:00" \
        in err["message"]
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "klines" in spec["paths"]["/v1/advice"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]
    log = server.log.read_text(errors="replace")
    assert f"atm serve: ready at {server.url}" in log and "POST /v1/advice 400 " in log
    assert "Duplicate Operation ID" not in log
