"""Whether two ways of running a model answer alike: the same items, item by item.

``compare(a, b) -> dict`` takes two runs' per-item records (``{id: record}`` as
``atm.eval.rundir.read_results`` returns them, or ``Prediction.to_dict()`` rows) and gives the share
of items with the same advice, with the same raw answer (whitespace stripped), and, where both have
class probabilities (loglik), the largest and mean absolute difference of P(class) per item.
``run_records(out, spec)`` reads a run directory's records. The engine-agreement test and
``benchmarks/bench_agreement.py`` use these (issue 21: the same model gives the same answers on
every engine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from atm.constants import ADVICES


def run_records(out: str | Path, spec: str) -> dict[str, dict[str, Any]]:
    """The records of ``spec`` in the run directory ``out`` (id -> record)."""
    import json

    from atm.eval.rundir import read_results

    out = Path(out)
    man = json.loads((out / "manifest.json").read_text())
    return dict(read_results(out / man["models"][spec]["file"]))


def compare(a: Mapping[str, Mapping[str, Any]], b: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Agreement of two runs on the items both answered (see the module docstring)."""
    ids = sorted(set(a) & set(b))
    same_advice = same_raw = 0
    diffs: list[float] = []
    differ: list[dict[str, Any]] = []
    for i in ids:
        ra, rb = a[i], b[i]
        if ra.get("advice") == rb.get("advice"):
            same_advice += 1
        elif len(differ) < 10:
            differ.append({"id": i, "a": ra.get("raw"), "b": rb.get("raw")})
        if (ra.get("raw") or "").strip() == (rb.get("raw") or "").strip():
            same_raw += 1
        pa, pb = ra.get("probs"), rb.get("probs")
        if pa and pb:
            diffs.append(max(abs(float(pa.get(c, 0.0)) - float(pb.get(c, 0.0))) for c in ADVICES))
    n = len(ids)
    return {"n": n, "only_a": len(set(a) - set(b)), "only_b": len(set(b) - set(a)),
            "same_advice": same_advice / n if n else None, "same_raw": same_raw / n if n else None,
            "n_probs": len(diffs), "max_prob_diff": max(diffs) if diffs else None,
            "mean_prob_diff": sum(diffs) / len(diffs) if diffs else None,
            "probs_within_0.02": (sum(d <= 0.02 for d in diffs) / len(diffs)) if diffs else None,
            "differ": differ}
