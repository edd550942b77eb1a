"""Fast checks of the serve helpers that need no server: schema rewriting, class probabilities
from log-probs, kline windows, settings and the CLI's --model/--set handling."""

from __future__ import annotations

import json
import re

import pytest

from atm.serve.advice import AdviceInputError, class_probs, klines_frame
from atm.prompting.llama_schema import llama_safe_schema


@pytest.mark.parametrize("rx,safe", [
    (r"^-?\d+\.\d{8}$", r"^-?[0-9]+[.][0-9]{8}$"),
    (r"[\.a-z]+", r"[.a-z]+"),
    (r"a\\.b", r"a\\.b"),          # an escaped backslash followed by any char: unchanged
    (r"x[.]y", r"x[.]y"),
    (r"\.\.", r"[.][.]"),
    (r"[\d.]+\w", r"[0-9.]+[0-9A-Za-z_]"),
    (r"^\s*\S\D$", r"^[ \t\n\r]*[^ \t\n\r][^0-9]$"),
    (r"a\/b\:c", r"a/b:c"),
])
def test_regex_rewrite_keeps_meaning(rx, safe):
    """llama.cpp silently accepts any string for \\d, \\w, \\s: rewritten into classes it enforces."""
    out = llama_safe_schema({"type": "string", "pattern": rx})["pattern"]
    assert out == safe
    for s in ("1.5", "a.b", "a\\.b", "x.y", "..", "abc", "-12.12345678", " 9x", "a/b:c", "7_", "a"):
        assert bool(re.search(rx, s)) == bool(re.search(out, s)), s


@pytest.mark.parametrize("rx", [r"\bword\b", r"(a)\1", r"\p{L}"])
def test_regex_llama_cannot_enforce_is_an_error(rx):
    with pytest.raises(ValueError, match="cannot be enforced"):
        llama_safe_schema({"pattern": rx})


def test_dot_rewrite_is_deep_and_copies():
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"pattern": r"\."}}},
              "patternProperties": {r"^x\.": {"pattern": r"\.y"}}}
    before = json.dumps(schema)
    out = llama_safe_schema(schema)
    assert out["properties"]["a"]["items"]["pattern"] == "[.]"
    assert out["patternProperties"] == {"^x[.]": {"pattern": "[.]y"}}
    assert json.dumps(schema) == before


def _lp(tokens):
    return {"choices": [{"logprobs": {"content": tokens}}]}


def test_class_probs_at_the_advice_token():
    import math

    text = '{"predicted_open_change": "1.00000000", "advice": "NOOP"}'
    head = text[: text.index('"NOOP"') + 1]
    toks = [{"token": head, "logprob": 0.0, "top_logprobs": []},
            {"token": "NO", "logprob": math.log(0.6), "top_logprobs": [
                {"token": "NO", "logprob": math.log(0.6)}, {"token": "B", "logprob": math.log(0.2)},
                {"token": "S", "logprob": math.log(0.1)}, {"token": "x", "logprob": math.log(0.1)}]},
            {"token": 'OP"}', "logprob": 0.0, "top_logprobs": []}]
    p = class_probs(_lp(toks), text)
    assert p == pytest.approx({"BUY": 2 / 9, "NOOP": 6 / 9, "SELL": 1 / 9}, abs=1e-6)


def test_class_probs_token_straddles_the_quote():
    import math

    text = '{"advice": "SELL"}'
    toks = [{"token": '{"advice": ', "logprob": 0.0},
            {"token": '"S', "logprob": math.log(0.5), "top_logprobs": [
                {"token": '"S', "logprob": math.log(0.5)}, {"token": '"B', "logprob": math.log(0.5)},
                {"token": "x", "logprob": math.log(0.1)}]},
            {"token": 'ELL"}', "logprob": 0.0}]
    assert class_probs(_lp(toks), text) == pytest.approx({"BUY": 0.5, "NOOP": 0.0, "SELL": 0.5})


def test_class_probs_absent():
    assert class_probs({"choices": [{}]}, '{"advice": "BUY"}') is None
    assert class_probs(_lp([{"token": "{}", "logprob": 0}]), "{}") is None


def _rows(n, start_ms=1_754_006_400_000):
    return [[start_ms + 60_000 * i, "100.0", "101", "99", "100.5", "3.2", start_ms + 60_000 * i + 59_999,
             "320", 12, "1.1", "110", "0"] for i in range(n)]


def test_klines_frame_binance_arrays_and_objects():
    df = klines_frame(_rows(5))
    assert list(df.columns)[:6] == ["open_time", "open", "high", "low", "close", "volume"]
    assert str(df["open_time"].dtype) == "datetime64[ns, UTC]"
    assert df["count"].dtype == "int64" and len(df) == 5
    objs = [{"open_time": "2025-08-01T00:0%d:00Z" % i, "open": 1, "high": 2, "low": 0.5, "close": 1.5,
             "volume": 3} for i in range(3)]
    assert len(klines_frame(objs[::-1])) == 3  # sorted


@pytest.mark.parametrize("mutate,msg", [
    (lambda r: r[:2] + r[3:], "gap"),
    (lambda r: r + [r[-1]], "twice"),
    (lambda r: [r[0][:3]] + r[1:], "at least"),
    (lambda r: [[r[0][0], "abc", *r[0][2:]]] + r[1:], "not a number"),
    (lambda r: [[r[0][0], "-1", *r[0][2:]]] + r[1:], "positive"),
    (lambda r: [[r[0][0], "nan", *r[0][2:]]] + r[1:], "finite"),
    (lambda r: [[r[0][0] + 5, *r[0][1:]]] + r[1:], "whole minutes"),
    (lambda r: [], "empty"),
])
def test_klines_frame_rejects(mutate, msg):
    with pytest.raises(AdviceInputError, match=msg):
        klines_frame(mutate(_rows(6)))


def test_cli_model_args_and_list_overrides():
    import argparse

    from atm.serve.cli import load_settings

    ns = argparse.Namespace(config="serve/default.yaml", model=["atm:q4", "x=/tmp/x.gguf", "r=http://h:1/v1"],
                            overrides=["models.2.upstream_api=ollama", "klines.BTCUSDT=/d.parquet", "parallel=3"],
                            engine=None, host=None, port=9000, api_key=None, parallel=None, ctx_size=None)
    s = load_settings(ns)
    assert [m.name for m in s.models] == ["atm:q4", "x", "r"]
    assert s.models[1].path == "/tmp/x.gguf"
    assert s.models[2].engine == "remote" and s.models[2].upstream_api == "ollama"
    assert s.klines == {"BTCUSDT": "/d.parquet"} and s.parallel == 3 and s.port == 9000
    assert s.host == "127.0.0.1" and s.cors_origins == []


def test_settings_reject_unknown_and_duplicates():
    from atm.errors import ConfigError
    from atm.serve.settings import ServeSettings

    with pytest.raises(ConfigError, match="did you mean 'parallel'"):
        ServeSettings.load(overrides=["paralel=2"])
    with pytest.raises(ConfigError, match="unique"):
        ServeSettings.load(models=[{"name": "a"}, {"name": "a"}])


def test_every_serve_config_loads(root):
    from atm.serve.settings import ServeSettings

    files = sorted((root / "serve").glob("*.yaml"))
    assert files
    for f in files:
        ServeSettings.load(f)


def test_help_has_examples(cli):
    for cmd in ("serve", "chat"):
        out = cli(cmd, "--help").stdout
        assert "examples:" in out


def test_engine_registry_matches_the_settings_type():
    """Every engine kind the settings accept has a registry entry whose class loads, and back."""
    import typing

    from atm.serve.engines import ENGINES, Engine, engine_class
    from atm.serve.settings import EngineKind

    assert set(typing.get_args(EngineKind)) == set(ENGINES)
    for kind in ENGINES:
        cls = engine_class(kind)
        assert issubclass(cls, Engine) and cls.kind == kind and cls.serves in ("gguf", "hf", "url")


def test_ollama_codec_both_directions_agree():
    """What ATM sends an Ollama server (remote engine) reads back, through the same codec, as the
    request it came from (the /api routes' direction)."""
    from atm.serve import ollama_codec
    from atm.serve.engines import EngineRequest

    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    req = EngineRequest(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=7, temperature=0.3,
                        top_p=0.9, top_k=5, seed=11, stop=["\n"], presence_penalty=0.1, frequency_penalty=0.2,
                        json_schema=schema)
    body = ollama_codec.upstream_payload(req, "up", stream=False)
    assert body["model"] == "up" and body["messages"] == req.messages and body["format"] == schema
    back = ollama_codec.request_fields(body["options"], body["format"])
    for k in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "presence_penalty",
              "frequency_penalty", "json_schema"):
        assert back[k] == getattr(req, k), k
    raw = ollama_codec.upstream_payload(EngineRequest(model="m", prompt="p", json_object=True), "up", stream=True)
    assert raw["raw"] is True and raw["prompt"] == "p" and raw["format"] == "json"
    assert ollama_codec.request_fields({"num_predict": -1}, "json") == {"max_tokens": None, "json_object": True}
    # answers: an Ollama answer -> OpenAI -> the Ollama final object keeps counts and the reason
    obj = {"message": {"content": "hi"}, "done": True, "done_reason": "length", "prompt_eval_count": 4,
           "eval_count": 2}
    resp = ollama_codec.openai_response(obj, "m", chat=True)
    assert resp["choices"][0]["finish_reason"] == "length" and resp["usage"]["total_tokens"] == 6
    fin = ollama_codec.final("m", resp, 0.0, ollama_codec.answer("hi", True))
    assert (fin["done_reason"], fin["prompt_eval_count"], fin["eval_count"]) == ("length", 4, 2)
    assert fin["message"] == {"role": "assistant", "content": "hi"}
    chunk = ollama_codec.openai_chunk({"response": "a", "done": False}, "m", chat=False, cid="c", created=1)
    assert chunk["choices"][0] == {"index": 0, "text": "a", "finish_reason": None} and "usage" not in chunk


def test_klines_frame_checks_bars_as_the_build_does():
    """The API refuses what `atm data build` refuses (high < low, open outside the bar), naming the
    request's row, and reports a sort as the build does: a counted repair."""
    from atm.market.validate import Repairs

    rows = _rows(6)
    rows[3][2], rows[3][3] = "98", "99.5"  # high 98 < low 99.5
    with pytest.raises(AdviceInputError, match=r"klines\[3\]: high 98.0 < low 99.5"):
        klines_frame(rows)
    rows = _rows(6)
    rows[2][1] = "150"  # open above high
    with pytest.raises(AdviceInputError, match=r"klines\[2\]: open 150.0 outside \[low 99.0, high 101.0\]"):
        klines_frame(rows)
    rows = _rows(6)
    rows[1], rows[4] = rows[4], rows[1]
    repairs = Repairs()
    df = klines_frame(rows, repairs)
    assert df["open_time"].is_monotonic_increasing and len(df) == 6
    (item,) = repairs.as_list()
    assert item["kind"] == "rows_reordered" and item["count"] == 2 and item["where"] == ["klines[2]", "klines[4]"]
def test_xgrammar_schema_drops_only_the_length_bounds_the_pattern_implies():
    """vLLM's xgrammar refuses a pattern with length bounds: the bounds a pattern implies go (the
    same strings admitted), others stay; deep, and a copy."""
    from atm.prompting.advice import load_schema
    from atm.prompting.xgrammar_schema import regex_width, xgrammar_safe_schema

    schema = load_schema()
    out = xgrammar_safe_schema(schema)
    change = out["properties"]["predicted_open_change"]
    assert "minLength" not in change and "maxLength" not in change and change["pattern"]
    assert "minLength" in schema["properties"]["predicted_open_change"]  # the original untouched
    assert regex_width(change["pattern"]) == (10, 20)
    assert xgrammar_safe_schema({"type": "string", "pattern": "a+", "minLength": 1, "maxLength": 5}) == {
        "type": "string", "pattern": "a+", "maxLength": 5}  # a+ is unbounded: maxLength means something
    assert xgrammar_safe_schema({"type": "string", "pattern": "ab?", "minLength": 2}) == {
        "type": "string", "pattern": "ab?", "minLength": 2}


class _Eng:
    name, kind = "m", "remote"

    def __init__(self, token_prompts):
        from atm.serve.engines import Capabilities

        self.capabilities = Capabilities(token_prompts=token_prompts)


def test_completion_prompt_forms():
    from atm.serve.api.errors import ApiError
    from atm.serve.api.prompts import completion_prompts

    yes, no = _Eng(True), _Eng(False)
    assert completion_prompts("hi", no) == ["hi"]
    assert completion_prompts(["a", "b"], no) == ["a", "b"]
    assert completion_prompts([1, 2], yes) == [[1, 2]]
    assert completion_prompts([[1], [2, 3]], yes) == [[1], [2, 3]]
    for bad, eng, msg in (([], yes, "empty list"), ([[]], yes, "empty list of token ids"),
                          ([1, 2], no, "cannot take a prompt given as token ids"),
                          (["a"] * 257, yes, "at most 256")):
        with pytest.raises(ApiError, match=msg) as exc:
            completion_prompts(bad, eng)
        assert exc.value.status == 400


def test_prompt_lists_merge_in_order_and_sum_usage():
    import asyncio

    from atm.serve.api.prompts import gather_completions, merged_stream
    from atm.serve.engines import EngineError, EngineRequest

    async def call(req):
        await asyncio.sleep(0.01 * (3 - len(req.prompt)))  # later prompts finish first
        if req.prompt == "boom":
            raise EngineError("bad", 400)
        return {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": req.prompt.upper()}],
                "usage": {"prompt_tokens": len(req.prompt), "completion_tokens": 1, "total_tokens": len(req.prompt) + 1}}

    async def stream(req):
        async def gen():
            for ch in req.prompt:
                await asyncio.sleep(0.001)
                yield {"id": "x", "choices": [{"index": 0, "text": ch}]}
            yield {"id": "x", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": len(req.prompt),
                                                       "total_tokens": 1 + len(req.prompt)}}
        return gen()

    reqs = [EngineRequest(model="m", prompt=p) for p in ("a", "bb", "ccc")]
    out = asyncio.run(gather_completions(call, reqs, limit=2))
    assert [(c["index"], c["text"]) for c in out["choices"]] == [(0, "A"), (1, "BB"), (2, "CCC")]
    assert out["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}
    with pytest.raises(EngineError):
        asyncio.run(gather_completions(call, reqs + [EngineRequest(model="m", prompt="boom")], limit=2))

    async def collect():
        return [c async for c in await merged_stream(stream, reqs)]

    chunks = asyncio.run(collect())
    texts = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"] and c["choices"][0]["index"] == i)
             for i in range(3)}
    assert texts == {0: "a", 1: "bb", 2: "ccc"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert sum(1 for c in chunks if c.get("usage")) == 1


# ------------------------------------------------------------------ /v1/advice: nothing filled in silently
def _objects(n, drop=(), only_rows=None):
    """_rows as objects; ``drop`` columns left out (of every row, or of ``only_rows``)."""
    from atm.market.klines import COLUMNS

    out = []
    for i, r in enumerate(_rows(n)):
        obj = dict(zip(COLUMNS, r))
        obj.pop("close_time")
        if only_rows is None or i in only_rows:
            for c in drop:
                obj.pop(c)
        out.append(obj)
    return out


def _served(**cfg):
    from types import SimpleNamespace

    from atm.prompting.encoders import get_encoder

    enc = get_encoder("seed-json", **cfg)
    return SimpleNamespace(get_encoder=lambda: enc)


def test_advice_refuses_a_field_the_encoder_reads_and_accepts_one_it_does_not():
    """A window without `count` was answered with trade counts of 0 (issue 22): now a 400 naming the
    field and the first row without it; a field the model's encoder never reads may be left out."""
    from atm.serve.advice import encode_window

    with pytest.raises(AdviceInputError, match=r"reads count \(missing from klines\[0\] and 11 more bars\)"):
        encode_window(_served(), klines_frame(_objects(12, drop=["count"])))
    with pytest.raises(AdviceInputError, match=r"count \(missing from klines\[4\]\)"):
        encode_window(_served(), klines_frame(_objects(12, drop=["count"], only_rows={4})))
    # a bar outside the encoder's window may lack it: the window is what is read
    ctx, t = encode_window(_served(), klines_frame(_objects(14, drop=["count"], only_rows={0})))
    assert '"prev_trade_counts"' in ctx
    # an encoder that reads no counts and no quote volumes: both may be left out
    ctx2, _ = encode_window(_served(columns=["open_changes", "prev_volumes"]),
                            klines_frame(_objects(12, drop=["count", "quote_volume", "taker_buy_volume"])))
    full, _ = encode_window(_served(columns=["open_changes", "prev_volumes"]), klines_frame(_objects(12)))
    assert ctx2 == full
    # Binance's 6-value arrays carry no count either
    with pytest.raises(AdviceInputError, match="reads count"):
        encode_window(_served(), klines_frame([r[:6] for r in _rows(12)]))


def test_advice_by_symbol_refuses_times_outside_the_data_and_gaps(btc_parquet, tmp_path):
    """`time` after the data was answered for the last minute of the data (issue 22): a time outside
    is a 400 giving the range; a window with a gap is a 400 naming the missing minute."""
    from types import SimpleNamespace

    import pandas as pd

    from atm.market.klines import read_klines_parquet
    from atm.serve.advice import dataset_window

    s = SimpleNamespace(klines={"BTCUSDT": str(btc_parquet)})
    with pytest.raises(AdviceInputError, match=r"outside the data: BTCUSDT klines cover 2025-08-01T00:00:00\+00:00 "
                                                r"\.\. 2025-08-11T00:00:00\+00:00; with 64 bars of context, `time` "
                                                r"can be 2025-08-01T01:04:00\+00:00 \.\. 2025-08-11T00:01:00\+00:00"):
        dataset_window(s, "BTCUSDT", "2025-09-01T00:00:00Z", 64)
    with pytest.raises(AdviceInputError, match="outside the data"):
        dataset_window(s, "BTCUSDT", "2025-08-01T00:30:00Z", 64)
    last = dataset_window(s, "BTCUSDT", "2025-08-11T00:01:00Z", 64)  # the minute after the last bar
    assert str(last["open_time"].iloc[-1]) == "2025-08-11 00:00:00+00:00" and len(last) == 64
    df = read_klines_parquet(btc_parquet)
    holed = tmp_path / "holed.parquet"
    df.drop(index=500).reset_index(drop=True).to_parquet(holed)
    s = SimpleNamespace(klines={"X": str(holed)})
    gap = pd.Timestamp(df["open_time"].iloc[500]).isoformat()
    with pytest.raises(AdviceInputError, match=f"gap at {re.escape(gap)}"):
        dataset_window(s, "X", df["open_time"].iloc[520].isoformat(), 64)
    assert len(dataset_window(s, "X", df["open_time"].iloc[600].isoformat(), 64)) == 64
    # bars filled by `atm data build --fill-gaps` are used, and the answer's repairs say so
    from atm.market.validate import Repairs

    filled = tmp_path / "filled.parquet"
    df.assign(filled=df.index == 510).to_parquet(filled)
    rep = Repairs()
    dataset_window(SimpleNamespace(klines={"Y": str(filled)}), "Y", df["open_time"].iloc[520].isoformat(), 64, rep)
    (item,) = rep.as_list()
    assert item["kind"] == "filled_bars" and item["count"] == 1


def test_advice_openapi_documents_request_and_response_without_duplicate_ids():
    """/openapi.json shows /v1/advice's request and response (it showed an empty body), and no longer
    warns `Duplicate Operation ID ollama_unsupported_api__what__delete`."""
    import warnings

    from atm.serve.app import create_app
    from atm.serve.settings import ServeSettings

    app = create_app(ServeSettings(), served={})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = app.openapi()
    op = spec["paths"]["/v1/advice"]["post"]
    req = op["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "klines", "symbol", "time", "probs"} <= set(req["properties"])
    assert "count" in req["properties"]["klines"]["description"]
    resp = op["responses"]["200"]["content"]["application/json"]["schema"]
    body = spec["components"]["schemas"][resp["$ref"].rsplit("/", 1)[1]]
    assert {"advice", "advice_source", "scored_advice", "probs", "repairs"} <= set(body["properties"])
    assert "scored options" in body["properties"]["probs"]["description"]
    assert not any(p.startswith("/api/{what}") for p in spec["paths"])


def test_serve_preflight_refuses_bad_klines_and_a_busy_port(tmp_path, monkeypatch):
    """Found before any engine starts, each in one line: a --set klines path that is not a klines
    parquet (it was a 500 at the first request) and a port in use (it was uvicorn's Errno 98 after
    llama-server came up)."""
    import socket

    from atm.errors import AtmError
    from atm.serve.cli import preflight
    from atm.serve.settings import ServeSettings

    bad = tmp_path / "nope.parquet"
    with pytest.raises(AtmError, match=r"^klines\.BTCUSDT: .*nope\.parquet.*not found"):
        preflight(ServeSettings(klines={"BTCUSDT": str(bad)}, port=0))
    bad.write_text("not parquet")
    with pytest.raises(AtmError, match=r"^klines\.BTCUSDT: .*not a readable parquet"):
        preflight(ServeSettings(klines={"BTCUSDT": str(bad)}, port=0))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        with pytest.raises(AtmError, match=f"cannot listen on 127.0.0.1:{port}: .*another --port"):
            preflight(ServeSettings(port=port))
    finally:
        busy.close()
    monkeypatch.setenv("ATM_LLAMA_SERVER", "/no/such/llama-server")
    with pytest.raises(AtmError, match=r"^\$ATM_LLAMA_SERVER=/no/such/llama-server is not an executable file$"):
        preflight(ServeSettings(models=[{"name": "atm:q8"}], port=0))
    monkeypatch.delenv("ATM_LLAMA_SERVER")
    sock = preflight(ServeSettings(port=0))
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_advice_request_forms_are_one_or_the_other(btc_parquet):
    """klines with symbol or time was answered from the klines, the rest ignored: a 400 now."""
    from types import SimpleNamespace

    from atm.market.validate import Repairs
    from atm.serve.advice import request_window
    from atm.serve.api.protocol import AdviceRequest

    s = SimpleNamespace(klines={"BTCUSDT": str(btc_parquet)})
    enc = _served().get_encoder()
    for body, msg, param in (
            ({"klines": _objects(12), "time": "2025-08-05T00:00:00Z"}, "not both (got klines and time)", "time"),
            ({"klines": _objects(12), "symbol": "BTCUSDT"}, "not both (got klines and symbol)", "symbol"),
            ({"time": "2025-08-05T00:00:00Z"}, "`time` needs `symbol`", "symbol"),
            ({"symbol": "BTCUSDT"}, "give `time`", "time"),
            ({}, "give `klines`", "klines")):
        with pytest.raises(AdviceInputError, match=re.escape(msg)) as exc:
            request_window(AdviceRequest(model="m", **body), s, enc, Repairs())
        assert exc.value.param == param
    assert len(request_window(AdviceRequest(model="m", klines=_objects(12)), s, enc, Repairs())) == 12
