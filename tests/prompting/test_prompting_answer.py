"""The answer module: one format reader, one answer regex, class probabilities with one rule for
serve and eval alike."""

from __future__ import annotations

import math
import re

import pytest

from atm.constants import ADVICES
from atm.prompting.answer import (CHANGE_RE, DEFAULT_ANSWER, answer_pieces, change_pattern, class_of, most_likely,
                                  probs_from_logliks, probs_from_token_probs, probs_from_top_logprobs)


def test_pieces_of_the_default_format_and_the_schema_pattern():
    p = answer_pieces(DEFAULT_ANSWER)
    assert p == {"advice_first": False, "before_change": '{"predicted_open_change": "', "between": '", "advice": "',
                 "after_advice": '"}'}
    from atm.prompting.advice import load_schema

    assert change_pattern(load_schema()) == CHANGE_RE  # the parser's pattern is the schema's
    assert re.fullmatch(CHANGE_RE, "-1.50000000") and not re.fullmatch(CHANGE_RE, "1.5")
    first = answer_pieces('{{"advice": "{advice}", "predicted_open_change": "{change}"}}')
    assert first["advice_first"] and first["before_advice"] == '{"advice": "' and first["after_advice"] == '", "predicted_open_change": "'


def test_one_rule_for_a_token_text():
    assert [class_of(t) for t in ("B", "NO", "NOOP", 'NOOP"}', "S", "x", "")] == \
        ["BUY", "NOOP", "NOOP", "NOOP", "SELL", None, None]
    assert class_of("N", ("NO", "NOOP")) is None  # could start either: counts for none
    # the same rule for the llama-server probe and for top log-probs of a generated answer
    probe = probs_from_token_probs([("B", 0.2), ("NO", 0.6), ("S", 0.1), ("x", 0.1)])
    text = '{"predicted_open_change": "1.00000000", "advice": "'
    content = [{"token": text, "logprob": 0.0},
               {"token": "NO", "logprob": math.log(0.6), "top_logprobs": [
                   {"token": "NO", "logprob": math.log(0.6)}, {"token": "B", "logprob": math.log(0.2)},
                   {"token": "S", "logprob": math.log(0.1)}, {"token": "x", "logprob": math.log(0.1)}]},
               {"token": 'OP"}', "logprob": 0.0}]
    want = {"BUY": 2 / 9, "NOOP": 6 / 9, "SELL": 1 / 9}
    assert probe == pytest.approx(want)
    assert probs_from_top_logprobs(content) == pytest.approx(want)
    assert probs_from_token_probs([("x", 1.0)]) is None


def test_loglik_softmax_and_ties():
    p = probs_from_logliks({"BUY": math.log(1), "NOOP": math.log(3), "SELL": math.log(1)})
    assert p == pytest.approx({"BUY": 0.2, "NOOP": 0.6, "SELL": 0.2})
    assert most_likely(p) == "NOOP"
    assert most_likely({"BUY": 0.4, "NOOP": 0.2, "SELL": 0.4}) == "BUY"  # a tie: the first class
    assert most_likely({a: 1 / 3 for a in ADVICES}) == ADVICES[0]
