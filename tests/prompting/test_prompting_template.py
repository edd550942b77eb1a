"""Every shipped template renders, its answers validate against the schema, and it travels as YAML."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import json
import numpy as np
import pytest

from atm.errors import ConfigError
from atm.prompting.advice import load_schema, parse_advice
from atm.prompting.template import Template, choose_examples

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = sorted((ROOT / "prompts").glob("*.yaml"))
ORIGINAL_INSTRUCTION = (
    "Analyse the following exchange data, predict the next minute's change and advise. Respond in a "
    "JSON object with 2 properties: predicted_open_change (8 decimals precision), and advice (BUY, NOOP or SELL)")


def test_templates_are_shipped():
    names = {p.stem for p in TEMPLATES}
    assert {"seed", "natural", "seed-compat"} <= names


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_every_template_renders_and_its_answers_validate(path):
    t = Template.load(path)
    validator = jsonschema.Draft202012Validator(load_schema())
    msgs = t.render("CONTEXT-TEXT")
    assert all(set(m) == {"role", "content"} for m in msgs)
    assert msgs[-1]["role"] == "user" and "CONTEXT-TEXT" in msgs[-1]["content"]
    assert msgs[: len(msgs) - 1] == t.prefix()  # the shared prefix comes first, unchanged
    roles = [m["role"] for m in msgs]
    if t.system_text:
        assert roles[0] == "system"
    assert roles[-1 - 2 * len(t.spec.examples):-1] == ["user", "assistant"] * len(t.spec.examples)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    answers += [t.answer(a, c) for a in ("BUY", "NOOP", "SELL") for c in (0.0, -0.123456789, 12345.5, "0.00000000")]
    for a in answers:
        validator.validate(json.loads(a))
        assert parse_advice(a).valid
    for ex in t.spec.examples:
        assert ex.context in "".join(m["content"] for m in msgs)
    # it travels as YAML text and comes back identical
    again = Template.from_yaml(t.to_yaml())
    assert again.to_yaml() == t.to_yaml() and again.render("x") == t.render("x")


def test_seed_templates_keep_the_original_instruction():
    assert Template.load("seed").spec.instruction == ORIGINAL_INSTRUCTION
    compat = Template.load("seed-compat")
    assert compat.spec.instruction == ORIGINAL_INSTRUCTION
    assert compat.spec.encoder == "seed-json-compat"
    assert sorted(e.advice for e in compat.spec.examples) == ["BUY", "NOOP", "SELL"]  # 3-shot, well-formed
    for ex in compat.spec.examples:
        obj = json.loads(ex.context)
        assert [len(v) for v in obj.values()] == [9, 9, 9]


def test_answer_formats():
    t = Template.load("seed")
    assert t.answer("BUY", -1.5) == '{"predicted_open_change": "-1.50000000", "advice": "BUY"}'
    assert t.answer("NOOP", -1e-12) == '{"predicted_open_change": "0.00000000", "advice": "NOOP"}'
    with pytest.raises(ValueError):
        t.answer("HOLD", 0.0)


def test_with_examples_and_user_messages():
    t = Template.load("seed").with_examples([
        {"context": "ctx-a", "advice": "SELL", "change": "-1.00000000", "row": 5, "split": "train"}])
    msgs = t.render("ctx-b")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == '{"predicted_open_change": "-1.00000000", "advice": "SELL"}'
    assert t.user_messages(["ctx-b"]) == [msgs[-1]["content"]]
    assert Template.from_yaml(t.to_yaml()).render("ctx-b") == msgs


@pytest.mark.parametrize("patch, match", [
    ({"input": "no context here"}, "context"),
    ({"answer": '{"predicted_open_change": "{change}", "advice": "{advice}"}'}, "placeholder"),
    ({"answer": '{{"advice": "{advice}"}}'}, "valid answer"),
    ({"fewshot": {"k": 3, "source_split": "verify"}}, "train"),
    ({"colour": "blue"}, "unknown key"),
])
def test_bad_templates_are_rejected(patch, match):
    import yaml

    data = yaml.safe_load((ROOT / "prompts" / "seed.yaml").read_text())
    data.update(patch)
    with pytest.raises(ConfigError, match=match):
        Template.from_yaml(yaml.safe_dump(data))


def test_choose_examples_balanced_seeded_and_from_candidates_only():
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array(["BUY", "NOOP", "SELL"], dtype=object), size=1000, p=[0.05, 0.9, 0.05])
    train = np.arange(0, 700)
    a = choose_examples(labels, train, 6, seed=3)
    assert a.tolist() == choose_examples(labels, train, 6, seed=3).tolist()
    assert a.tolist() != choose_examples(labels, train, 6, seed=4).tolist()
    assert set(a.tolist()) <= set(train.tolist())
    assert sorted(labels[a].tolist()) == ["BUY", "BUY", "NOOP", "NOOP", "SELL", "SELL"]
    b = choose_examples(labels, train, 3, seed=0)
    assert sorted(labels[b].tolist()) == ["BUY", "NOOP", "SELL"]
    assert len(choose_examples(labels, train, 0)) == 0


def _seed_data() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "prompts" / "seed.yaml").read_text())


def test_answer_format_option_orders_the_answer_and_the_schema():
    import yaml

    data = _seed_data()
    data.pop("answer")
    t = Template.from_yaml(yaml.safe_dump({**data, "answer_format": "advice-first"}))
    assert t.answer_format == "advice-first"
    assert t.answer("BUY", 1.5) == '{"advice": "BUY", "predicted_open_change": "1.50000000"}'
    assert list(t.schema()["properties"]) == ["advice", "predicted_open_change"] == t.schema()["required"]
    assert {k: v for k, v in t.schema().items() if k not in ("properties", "required")} == \
        {k: v for k, v in load_schema().items() if k not in ("properties", "required")}
    again = Template.from_yaml(t.to_yaml())
    assert again.answer_format == "advice-first" and again.to_yaml() == t.to_yaml()
    # the answer text alone gives its order; the shipped templates write the change first
    for name in ("seed", "seed-compat", "natural", "compact"):
        s = Template.load(name)
        assert s.answer_format == "change-first" and s.schema() == load_schema()
        assert list(s.schema()["properties"]) == ["predicted_open_change", "advice"]
    written = Template.from_yaml(yaml.safe_dump({**data, "answer": '{{"advice":"{advice}","predicted_open_change":"{change}"}}'}))
    assert written.answer_format == "advice-first" and written.answer("SELL", "0.00000000") == \
        '{"advice":"SELL","predicted_open_change":"0.00000000"}'
    shipped = Template.load("compact-advice-first")
    assert shipped.answer_format == "advice-first" and shipped.spec.encoder == "compact"
    assert shipped.render("x")[-1]["content"].index("advice (BUY") < shipped.render("x")[-1]["content"].index(
        "predicted_open_change (8")  # the instruction names the properties in the answer's order


@pytest.mark.parametrize("patch, match", [
    ({"answer_format": "advice-first"}, "answer_format is advice-first but the answer writes the change first"),
    ({"answer_format": "change-last"}, "answer_format"),
])
def test_answer_format_must_agree_with_the_answer(patch, match):
    import yaml

    with pytest.raises(ConfigError, match=match):
        Template.from_yaml(yaml.safe_dump({**_seed_data(), **patch}))


@pytest.mark.parametrize("fmt", ["change-first", "advice-first"])
def test_both_answer_orders_parse_score_and_split_for_loglik(fmt):
    import yaml

    from atm.prompting.answer import answer_pieces

    data = _seed_data()
    data.pop("answer")
    t = Template.from_yaml(yaml.safe_dump({**data, "answer_format": fmt}))
    other = Template.load("seed") if fmt == "advice-first" else Template.load("compact-advice-first")
    for advice in ("BUY", "NOOP", "SELL"):
        for change in (0.0, -12.345, 98765.4321):
            a = t.answer(advice, change)
            p = parse_advice(a)
            assert p.valid and p.advice == advice and p.predicted_change == round(change, 8)
            jsonschema.Draft202012Validator(t.schema()).validate(json.loads(a))
            assert list(json.loads(a)) == list(t.schema()["properties"])  # the schema's order is the answer's
            assert list(json.loads(other.answer(advice, change))) != list(t.schema()["properties"])
    pieces = answer_pieces(t.spec.answer)
    assert pieces["advice_first"] is (fmt == "advice-first")
    if fmt == "advice-first":  # loglik scores the options right after this text: nothing to decode first
        assert pieces["before_advice"] == '{"advice": "'
