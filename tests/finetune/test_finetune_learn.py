"""Pieces of the learning recipe (issue 23) that need no model: the validation slice held out of
training, class-interleaved batches, balanced accuracy of the curve, the context-ablation shuffle."""

from __future__ import annotations

import json

import pytest

from atm.constants import ADVICES


def _ds(labels: list[str]):
    datasets = pytest.importorskip("datasets")
    rows = []
    for i, a in enumerate(labels):
        ans = json.dumps({"advice": a, "predicted_open_change": "0.00000000"})
        rows.append({"messages": [{"role": "user", "content": f"minute {i}"},
                                  {"role": "assistant", "content": ans}]})
    return datasets.Dataset.from_list(rows)


def _advice(row) -> str:
    return json.loads(row["messages"][-1]["content"])["advice"]


def test_holdout_is_the_end_of_train_and_training_stops_before_it():
    from atm.finetune.curve import holdout_rows

    labels = (["NOOP"] * 8 + ["BUY", "SELL"]) * 10  # 100 rows, 10 BUY, 10 SELL
    val, pool = holdout_rows(_ds(labels), "sft", per_class=3, embargo=5)
    assert len(val) == 9 and sorted(labels[i] for i in val).count("BUY") == 3
    assert min(val) >= 70 and pool == list(range(min(val) - 5))  # nothing near the slice is trained on
    with pytest.raises(Exception, match="too few"):
        holdout_rows(_ds(labels), "sft", per_class=6, embargo=0)


def test_interleaved_batches_hold_every_class():
    from atm.finetune.train import interleave_classes

    labels = ["NOOP"] * 30 + ["BUY"] * 30 + ["SELL"] * 30
    out = interleave_classes("sft", _ds(labels), seed=1)
    got = [_advice(r) for r in out]
    assert sorted(got) == sorted(labels)
    for s in range(0, 90, 15):  # any batch of 15 consecutive rows: 5 of each
        assert {a: got[s:s + 15].count(a) for a in ADVICES} == {a: 5 for a in ADVICES}


def test_curve_balanced_accuracy():
    from atm.finetune.curve import balanced_accuracy

    bal, rec = balanced_accuracy(["BUY", "BUY", "NOOP", "SELL"], ["BUY", "NOOP", "NOOP", "BUY"])
    assert rec == {"BUY": 0.5, "NOOP": 1.0, "SELL": 0.0} and bal == pytest.approx(0.5)


def test_context_ablation_gives_every_item_another_items_prompt():
    from atm.eval.harness import SuiteConfig, shuffle_contexts

    items = [{"id": str(i), "prompt": [{"role": "user", "content": f"c{i}"}], "context": f"c{i}"}
             for i in range(50)]
    shuffle_contexts(items, seed=3)
    assert all(it["context"] != f"c{it['id']}" for it in items)
    assert sorted(it["context"] for it in items) == sorted(f"c{i}" for i in range(50))
    assert all(it["prompt"][0]["content"] == it["context"] for it in items)
    assert SuiteConfig(context_ablation="shuffle").context_ablation == "shuffle"


def test_advice_end_cuts_after_the_advice_value():
    from atm.finetune.sft import advice_end

    pieces = ['{"', 'advice', '":', ' "', 'NO', 'OP', '",', ' "', 'predicted', '_open', '_change', '":', ' "1.0"}']

    class Tok:
        def decode(self, ids):
            return "".join(pieces[i] for i in ids)

    assert advice_end(Tok(), list(range(len(pieces)))) == 7  # through '",'
    assert advice_end(Tok(), [0, 1, 2]) is None
