"""The answer contract: schema, strict parser (with fuzzed model outputs), and the one scorer."""

from __future__ import annotations

import json
import math
import random

import pytest

from atm.prompting.advice import (CLIP_BPS, INVALID_PENALTY, MAX_ANSWER_CHARS, REASONS, advice_reward,
                                  completion_text, load_schema, parse_advice, score_advice, score_parsed)

VALID = '{"predicted_open_change": "-12.34000000", "advice": "SELL"}'
REALIZED = {"BUY": 0.0031, "NOOP": 0.0, "SELL": -0.0051}


def test_schema_is_valid_bounded_and_uses_bracket_dot():
    import jsonschema

    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"predicted_open_change", "advice"}
    assert schema["properties"]["advice"]["enum"] == ["BUY", "NOOP", "SELL"]
    change = schema["properties"]["predicted_open_change"]
    assert change["maxLength"] <= 24 and "[.]" in change["pattern"]
    assert "\\." not in json.dumps(schema)  # llama.cpp's converter mishandles an escaped dot


def test_schema_converts_to_a_llama_cpp_grammar():
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed yet")
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(load_schema()), verbose=False)
    assert grammar is not None


@pytest.mark.parametrize("text, reason", [
    (None, "empty"),
    ("", "empty"),
    ("   \n", "empty"),
    ("x" * (MAX_ANSWER_CHARS + 1), "too long"),
    ('{"predicted_open_change": "1.00000000", "advice": "BUY"\x00}', "control characters"),
    ('{"predicted_open_change": "1.00000000\n", "advice": "BUY"}', "control characters"),
    ('{"predicted_open_change": "1.00000000", "advice": "BUY"', "truncated"),
    ('{"predicted_open_change": "1.000', "truncated"),
    ('{"predicted_open_change"', "truncated"),
    ("BUY", "not JSON"),
    ("```json\n" + VALID + "\n```", "not JSON"),
    (VALID + " and then some", "not JSON"),
    (VALID + VALID, "not JSON"),
    ("{'predicted_open_change': '1.00000000', 'advice': 'BUY'}", "not JSON"),
    ('["BUY"]', "not an object"),
    ('"BUY"', "not an object"),
    ('{"advice": "BUY", "advice": "SELL", "predicted_open_change": "1.00000000"}', "duplicate key"),
    ('{"predicted_open_change": "1.00000000", "advice": "BUY", "why": "up"}', "extra key"),
    ('{"advice": "BUY"}', "missing key"),
    ('{"predicted_open_change": "1.00000000", "advice": "buy"}', "bad enum"),
    ('{"predicted_open_change": "1.00000000", "advice": "HOLD"}', "bad enum"),
    ('{"predicted_open_change": "1.00000000", "advice": null}', "bad enum"),
    ('{"predicted_open_change": 1.0, "advice": "BUY"}', "bad number"),
    ('{"predicted_open_change": "1.0", "advice": "BUY"}', "bad number"),
    ('{"predicted_open_change": "01.00000000", "advice": "BUY"}', "bad number"),
    ('{"predicted_open_change": "12345678901.00000000", "advice": "BUY"}', "bad number"),
    ('{"predicted_open_change": "1e-5", "advice": "BUY"}', "bad number"),
])
def test_parse_advice_reasons(text, reason):
    p = parse_advice(text)
    assert not p.valid and p.reason == reason, p
    assert p.reason in REASONS and p.detail
    assert p.advice is None and p.predicted_change is None


def test_parse_advice_valid_answers():
    p = parse_advice(VALID)
    assert p.valid and p.reason is None and p.advice == "SELL" and p.predicted_change == -12.34
    p = parse_advice('  \n{"advice":"NOOP","predicted_open_change":"0.00000000"}\n')
    assert p.valid and p.advice == "NOOP" and p.predicted_change == 0.0


def _strict_reference(text) -> bool:
    """Validity by another route: strict json + jsonschema + the length bound + unique keys."""
    import jsonschema

    if not isinstance(text, str) or not text.strip() or len(text) > MAX_ANSWER_CHARS:
        return False
    pairs_seen = []

    def hook(pairs):
        pairs_seen.append(len(pairs) != len({k for k, _ in pairs}))
        return dict(pairs)
    try:
        obj = json.loads(text, object_pairs_hook=hook)
    except (ValueError, RecursionError):
        return False
    if any(pairs_seen):
        return False
    return jsonschema.Draft202012Validator(load_schema()).is_valid(obj)


def _mutations(rng: random.Random, base: str) -> str:
    s = list(base)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(s) + 1)
        if op == 0 and s:
            del s[min(i, len(s) - 1)]
        elif op == 1:
            s.insert(i, rng.choice('{}[]",:. -019eE\n\t\x00\\abBUYNOPSEL\u00e9\U0001F600'))
        elif op == 2 and s:
            s[min(i, len(s) - 1)] = rng.choice('0123456789"{}:,. ')
        elif op == 3:
            s = s[: rng.randint(0, len(s))]  # truncation, as max_tokens does
        elif op == 4:
            s = list(rng.choice(["BUY", "NOOP", "SELL", "null", "{}", "[]", ""]) + "".join(s))
        else:
            s = list("".join(s).replace("SELL", rng.choice(["BUY", "NOOP", "sell", "SELL "])))
    return "".join(s)


def test_fuzzed_model_outputs_never_raise_and_agree_with_the_schema():
    rng = random.Random(1234)
    bases = [VALID, '{"predicted_open_change": "0.00000000", "advice": "NOOP"}',
             '{"advice": "BUY", "predicted_open_change": "123.45678900"}']
    n_valid = 0
    for _ in range(3000):
        text = _mutations(rng, rng.choice(bases))
        p = parse_advice(text)
        assert p.valid == _strict_reference(text), (text, p)
        assert (p.reason is None) == p.valid and (p.reason in REASONS or p.valid)
        n_valid += p.valid
        score = score_advice(text, REALIZED)
        assert score == (INVALID_PENALTY if not p.valid else score_parsed(p, REALIZED))
    for _ in range(500):  # random bytes decoded leniently, as a broken UTF-8 stream would
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 80))).decode("utf-8", "replace")
        assert parse_advice(raw).valid is False
    assert 0 < n_valid < 3000  # the fuzzer reaches both outcomes


def test_score_advice_is_clipped_bps_and_invalid_is_the_floor():
    assert score_advice('{"predicted_open_change": "1.00000000", "advice": "BUY"}', REALIZED) == pytest.approx(31.0)
    assert score_advice(VALID, REALIZED) == pytest.approx(-51.0)
    assert score_advice('{"predicted_open_change": "1.00000000", "advice": "NOOP"}', REALIZED) == 0.0
    big = {"BUY": 0.05, "NOOP": 0.0, "SELL": -0.05}
    assert score_advice('{"predicted_open_change": "1.00000000", "advice": "BUY"}', big) == CLIP_BPS
    assert score_advice(VALID, big) == -CLIP_BPS
    assert score_advice("not json", REALIZED) == INVALID_PENALTY <= -CLIP_BPS
    # the dataset's column names work too (the rl view passes ret_BUY ...)
    assert score_advice(VALID, {"ret_BUY": 0.0, "ret_NOOP": 0.0, "ret_SELL": 0.002}) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="NaN"):
        score_advice(VALID, {"BUY": math.nan, "NOOP": math.nan, "SELL": math.nan})
    with pytest.raises(KeyError):
        score_advice(VALID, {"BUY": 0.0})


def test_advice_reward_takes_trl_conversational_completions():
    completions = [[{"role": "assistant", "content": VALID}],
                   [{"role": "assistant", "content": "SELL!"}],
                   '{"predicted_open_change": "2.00000000", "advice": "BUY"}']
    rewards = advice_reward(prompts=[[]] * 3, completions=completions, ret_BUY=[0.001, 0.001, 0.004],
                            ret_NOOP=[0.0, 0.0, 0.0], ret_SELL=[-0.003, -0.003, -0.006], trainer_state=None)
    assert rewards == pytest.approx([-30.0, INVALID_PENALTY, 40.0])
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"
    with pytest.raises(ValueError):
        advice_reward(completions=["x"], ret_BUY=[0.0], ret_NOOP=[0.0], ret_SELL=[0.0, 1.0])


def test_schema_order_follows_the_answer_format():
    from atm.prompting.advice import ANSWER_FORMATS, answer_order

    assert load_schema() == load_schema("change-first")  # the file is written change-first
    adv = load_schema("advice-first")
    assert list(adv["properties"]) == adv["required"] == ["advice", "predicted_open_change"]
    assert adv["properties"]["advice"] == load_schema()["properties"]["advice"]
    assert {k: answer_order(v) for k, v in ANSWER_FORMATS.items()} == {k: k for k in ANSWER_FORMATS}
    with pytest.raises(ValueError):
        load_schema("advice-last")


def _keys(text: str) -> list[str]:
    return list(json.loads(text, object_pairs_hook=lambda pairs: dict(pairs)))


@pytest.mark.parametrize("fmt", ["change-first", "advice-first"])
def test_llama_cpp_grammar_writes_the_schema_order(fmt):
    """llama.cpp constrained by the ordered schema (its grammar, as llama-server, llama-cpp-python and
    Ollama build it) writes the keys in that order, with a real trained model (SmolLM2-135M)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from atm.export.gguf import quiet_stderr
    from atm.finetune.families import smollm2_gguf

    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(load_schema(fmt)), verbose=False)
    with quiet_stderr():
        llm = llama_cpp.Llama(model_path=str(smollm2_gguf()), n_ctx=256, n_threads=1, verbose=False)
    try:
        for prompt in ("Advice as JSON:", '{"predicted_open_change": "1.00000000", "advice": "BUY"}\nNext:'):
            out = llm.create_completion(prompt, grammar=grammar, max_tokens=48, temperature=0.0, seed=0)
            text = out["choices"][0]["text"]
            assert parse_advice(text).valid, text
            assert _keys(text) == list(load_schema(fmt)["properties"]), text
    finally:
        llm.close()


def test_transformers_constraint_writes_the_schema_order():
    """lm-format-enforcer (the transformers engine and hf: provider) enforces the grammar every other
    engine gets (issue 21): each token of an answer in the schema's order is allowed and the end comes
    only after it, as llama.cpp does (test above); the other order is cut off, as llama.cpp cuts it."""
    torch = pytest.importorskip("torch")
    from atm.finetune.families import build_tokenizer
    from atm.prompting.advice import ANSWER_FORMATS
    from atm.prompting.hf_constraint import schema_processor

    tok = build_tokenizer("smollm2")
    prompt = tok.encode("Answer: ", add_special_tokens=False)
    for schema_fmt in ("change-first", "advice-first"):
        for answer_fmt, answer in ANSWER_FORMATS.items():
            text = answer.format(advice="SELL", change="-12.50000000")
            ids = tok.encode(text, add_special_tokens=False)
            proc = schema_processor(tok, load_schema(schema_fmt))
            refused = None
            for k in range(len(ids) + 1):
                seq = torch.tensor([prompt + ids[:k]])
                mask = proc(seq, torch.zeros(1, len(tok)))
                want = ids[k] if k < len(ids) else tok.eos_token_id
                if mask[0, want] != 0.0:
                    refused = k
                    break
            if answer_fmt == schema_fmt:
                assert refused is None, (schema_fmt, tok.decode(ids[:refused]))
            else:
                assert refused is not None and refused < len(ids), (schema_fmt, answer_fmt)
            assert mask[0, tok.encode("x", add_special_tokens=False)[0]] == float("-inf")
