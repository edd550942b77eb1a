"""Helpers of the ``atm_advice`` lm-eval task: items from an ATM dataset, the shared scorer.

Everything that decides whether an answer is right goes through ``atm.prompting.advice`` (the
parser and ``score_parsed``/``score_advice``) and ``atm.eval.metrics``: the same code as
``atm-eval`` and the DAPO reward, so the three can never disagree about an answer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ADVICES = ("BUY", "NOOP", "SELL")


def _dataset_dir(data: str | None) -> Path:
    from atm.eval.harness import ensure_dataset, load_suite

    data = data or os.environ.get("ATM_LMEVAL_DATA")
    if data:
        return ensure_dataset(load_suite(None), data)
    return ensure_dataset(load_suite(None))  # the default suite's dataset, built on first use


def load_items(data: str | None = None, split: str = "verify", **_: Any):
    """The items view of an ATM dataset as a ``DatasetDict`` with one ``test`` split.

    Columns: id, label, ret_BUY/NOOP/SELL (realized returns, for the score), system (the prompt's
    system text plus any k-shot turns folded in), user (the minute's user message), answer.
    """
    import datasets

    from atm.eval.harness import load_items as _load, select_items, load_suite

    d = _dataset_dir(data)
    df = select_items(_load(d, split), load_suite(None, ["first=null", "limit=null"]), None)
    systems, users = [], []
    for msgs in df["prompt"]:
        msgs = [dict(m) for m in msgs]
        sys_parts = [m["content"] for m in msgs[:-1] if m["role"] == "system"]
        shots = [f"{m['role']}: {m['content']}" for m in msgs[:-1] if m["role"] != "system"]
        systems.append("\n\n".join(sys_parts + (["Examples:\n" + "\n".join(shots)] if shots else [])))
        users.append(msgs[-1]["content"])
    out = {"id": df["id"].astype(str).tolist(), "label": df["label"].tolist(),
           "ret_BUY": df["ret_BUY"].astype(float).tolist(), "ret_NOOP": df["ret_NOOP"].astype(float).tolist(),
           "ret_SELL": df["ret_SELL"].astype(float).tolist(), "system": systems, "user": users,
           "answer": df["answer"].tolist() if "answer" in df else [""] * len(df)}
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(out)})


def doc_to_text(doc: dict) -> str:
    return doc["user"]


def process_results(doc: dict, results: list[str]) -> dict[str, Any]:
    """Strictly parse the answer; invalid answers are wrong and score the invalid penalty."""
    from atm.prompting.advice import parse_advice, score_parsed

    raw = results[0] if results else ""
    p = parse_advice(raw)
    pred = p.advice if p.valid else "INVALID"
    score = score_parsed(p, {a: doc[f"ret_{a}"] for a in ADVICES})
    pair = (doc["label"], pred)
    return {"acc": int(pred == doc["label"]), "valid": int(p.valid), "score_bps": score,
            "balanced_acc": pair, "macro_f1": pair}


def _encode(pairs):
    from atm.eval import metrics as M

    t = M.encode_true([a for a, _ in pairs])
    p = M.encode_pred([b for _, b in pairs])
    return M.classification(t, p)


def balanced_accuracy(items: list) -> float:
    return float(_encode(items)["balanced_accuracy"])


def macro_f1(items: list) -> float:
    return float(_encode(items)["macro_f1"])
