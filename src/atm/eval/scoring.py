"""Scoring an eval run: metrics with block-bootstrap intervals, paired comparisons and verdicts.

``evaluate_run(run_dir)`` recomputes everything from the run directory alone (``atm.eval.rundir``):
it works on a finished run, a killed one and while a run is going, and writes ``metrics.json``.
The harness calls it at the end of a run and the report calls it for ``atm-eval report``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field

from atm.config import AtmConfig
from atm.constants import ADVICES
from atm.eval import rundir
from atm.eval.providers import model_kind


class MetricsSpec(AtmConfig):
    """Metric and uncertainty settings."""

    n_boot: int = Field(1000, ge=0, description="bootstrap replicates")
    level: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals")
    block: int | None = Field(None, ge=1, description="bootstrap block length in minutes (None: max(horizon, sqrt(n)))")
    seed: int = Field(0, description="bootstrap seed")
    calibration_bins: int = Field(10, ge=2, description="reliability-diagram bins")
    primary: str = Field("balanced_accuracy", description="metric the verdict is about")
    show_raw_accuracy: bool = Field(True, description="show raw accuracy beside balanced accuracy")


def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """Metrics of every model in a run dir (recomputed from the per-item files; works mid-run)."""
    import numpy as np

    from atm.eval import metrics as M

    run_dir = Path(run_dir)
    manifest = rundir.read_manifest(run_dir)
    truth = rundir.read_truth(run_dir)
    ms = MetricsSpec.model_validate((manifest.get("suite") or {}).get("metrics") or {})
    lcfg = manifest.get("label_config") or {}
    horizon = _horizon(lcfg)
    ids = truth["id"].tolist()
    t_all = M.encode_true(truth["label"].tolist())
    change_col = next((c for c in ("true_change", "change") if c in truth.columns), None)

    preds = rundir.model_results(run_dir, manifest)
    common = [i for i in ids if all(i in p for p in preds.values())]
    pos = {id_: k for k, id_ in enumerate(ids)}

    boot = M.BootConfig(n_boot=ms.n_boot, level=ms.level, seed=ms.seed, block=ms.block, horizon=horizon)
    results: dict[str, Any] = {}
    pvecs: dict[str, np.ndarray] = {}
    for spec, recs in preds.items():
        entry = manifest["models"][spec]
        have = [i for i in ids if i in recs]
        idx = np.array([pos[i] for i in have], dtype=np.int64)
        t = t_all[idx]
        rlist = [recs[i] for i in have]
        p = M.encode_pred([r.get("advice") for r in rlist], [bool(r.get("valid")) for r in rlist])
        res: dict[str, Any] = {"spec": spec, "kind": entry.get("kind", model_kind(spec)), "mode": entry.get("mode"),
                               "user": bool(entry.get("user")),
                               "note": entry.get("note"), "n": len(have), "n_expected": len(ids),
                               "complete": len(have) == len(ids)}
        res["validity"] = M.validity([bool(r.get("valid")) for r in rlist], [r.get("reason") for r in rlist])
        res["failed"] = int(sum(bool(r.get("failed")) for r in rlist))
        if any(r.get("endpoint") for r in rlist):
            res["endpoints"] = endpoint_counts(rlist)
        if len(have):
            res.update(M.classification(t, p))
            res["ci"] = M.bootstrap_ci(t, p, boot)
            lat = np.array([float(r.get("latency") or 0.0) for r in rlist])
            res["latency"] = {"mean_s": float(lat.mean()), "p50_s": float(np.median(lat)),
                              "p99_s": float(np.percentile(lat, 99)), "total_s": float(lat.sum())}
            res["tokens"] = token_summary(rlist)
            res["speed"] = speed_summary(entry, res["latency"])
            res["score"] = _score(rlist, truth.iloc[idx], boot)
            if change_col:
                res["change"] = M.change_metrics([r.get("predicted_change") if r.get("valid") else None for r in rlist],
                                                 truth[change_col].iloc[idx].tolist())
            else:
                res["change"] = {"n": 0, "note": "the items view has no true-change column; MAE not computed"}
            with_probs = [k for k, r in enumerate(rlist) if r.get("probs")]
            if with_probs:
                P = np.array([[float(rlist[k]["probs"].get(c, 0.0)) for c in M.CLASSES] for k in with_probs])
                P = P / np.clip(P.sum(axis=1, keepdims=True), 1e-12, None)
                res["calibration"] = M.calibration(t[with_probs], P, ms.calibration_bins)
                res["calibration"]["coverage"] = len(with_probs) / len(rlist)
        full = np.full(len(ids), -1, dtype=np.int64)
        full[idx] = p
        pvecs[spec] = full
        results[spec] = res

    # paired comparisons on the items every model answered
    cidx = np.array([pos[i] for i in common], dtype=np.int64)
    tc = t_all[cidx]
    for spec, res in results.items():
        comps = {}
        for ref in _references(spec, results):
            if len(cidx) < 2:
                continue
            pa, pb = pvecs[spec][cidx], pvecs[ref][cidx]
            pb_res = M.paired_bootstrap(tc, pa, pb, boot, metric=ms.primary)
            comps[ref] = {**pb_res, "mcnemar": M.mcnemar(pa == tc, pb == tc),
                          "a": float(M._from_sums(M.indicators(tc, pa).sum(0))[ms.primary]),
                          "b": float(M._from_sums(M.indicators(tc, pb).sum(0))[ms.primary])}
        res["comparisons"] = comps
        res["verdict"] = verdict(spec, res, results, ms.primary, ms.level) if comps else None
    out = {"run": str(run_dir), "n_items": len(ids), "n_common": len(common), "horizon": horizon,
           "block": boot.block or M.block_length(len(common) or len(ids), horizon),
           "primary": ms.primary, "level": ms.level, "n_boot": ms.n_boot, "models": results,
           "verdicts": [r["verdict"] for s, r in results.items() if r.get("verdict") and _is_candidate(s, results)],
           "data": manifest["data"], "suite": manifest["suite"], "label_config": lcfg}
    rundir.write_metrics(run_dir, out)
    return out


def endpoint_counts(records: Sequence[dict]) -> dict[str, dict[str, int]]:
    """Items per endpoint of a fan-out (``atm.eval.fanout``), and how many of them are failures.
    An item that failed on every endpoint has no endpoint; it is counted under ``none``."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        c = out.setdefault(r.get("endpoint") or "none", {"items": 0, "failed": 0})
        c["items"] += 1
        c["failed"] += int(bool(r.get("failed")))
    return out


def token_summary(rlist: list[dict]) -> dict[str, Any]:
    """Tokens per item, from the per-item ``tokens`` the providers record (atm.eval.providers):
    the mean of each count over the items that have it, and the two totals a user plans with:
    ``per_item`` = prompt + completion + scored (what an item costs an engine without prefix
    reuse) and ``evaluated`` = prompt_eval + completion + scored (what it cost here). ``reused`` is
    the share of prompt tokens that came from the prefix cache."""
    from atm.eval.providers import TOKEN_KEYS

    toks = [r["tokens"] for r in rlist if isinstance(r.get("tokens"), dict)]
    out: dict[str, Any] = {"n": len(toks)}
    if not toks:
        out["note"] = "the engine reported no token counts"
        return out
    for k in TOKEN_KEYS:
        vals = [t[k] for t in toks if t.get(k) is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    both = [t for t in toks if t.get("prompt") is not None and t.get("prompt_eval") is not None]
    p_sum = sum(t["prompt"] for t in both)
    out["reused"] = (1 - sum(t["prompt_eval"] for t in both) / p_sum) if p_sum else None

    def total(first: str) -> float | None:
        if out.get(first) is None:
            return None
        return out[first] + (out.get("completion") or 0.0) + (out.get("scored") or 0.0)

    out["per_item"] = total("prompt")
    out["evaluated"] = total("prompt_eval")
    return out


def speed_summary(entry: dict[str, Any], latency: dict[str, float]) -> dict[str, Any]:
    """Seconds per item: the wall time of the model's prediction loops over the items they
    answered (every run of a resumed directory added up; with --concurrency > 1 below the
    per-request latency), and the mean per-request latency."""
    wall, n = entry.get("wall_s"), entry.get("n_timed")
    out: dict[str, Any] = {"latency_s": latency.get("mean_s")}
    if wall is not None and n:
        out.update({"s_per_item": float(wall) / int(n), "items_per_s": int(n) / float(wall) if wall else None,
                    "wall_s": float(wall), "n_timed": int(n)})
    else:  # a run directory from before the wall time was recorded: the latency is all there is
        out.update({"s_per_item": latency.get("mean_s"), "items_per_s": None, "wall_s": None, "n_timed": None})
    return out


def _horizon(lcfg: dict[str, Any]) -> int:
    try:
        from atm.market.labels import LabelConfig, label_horizon

        return int(label_horizon(LabelConfig(**lcfg)))
    except Exception:  # noqa: BLE001 - an unknown label config: fall back to its horizon field
        return int(lcfg.get("horizon", 1) or 1)


def _score(rlist: list[dict], truth, boot) -> dict[str, Any]:
    """Mean of THE scorer (atm.prompting.advice.score_parsed: DAPO reward = eval score), in bps."""
    import numpy as np

    from atm.eval import metrics as M

    try:
        from atm.prompting.advice import ParsedAdvice, score_parsed
    except ImportError:  # pragma: no cover
        return {"note": "atm.prompting.advice not available"}
    cols = [c for c in ("ret_BUY", "ret_NOOP", "ret_SELL") if c in truth.columns]
    if len(cols) < 3:
        return {"note": "items view has no ret_BUY/NOOP/SELL; score not computed"}
    vals = []
    R = truth[cols].to_numpy(dtype=np.float64)
    for r, ret in zip(rlist, R):
        if np.isnan(ret).any():
            vals.append(np.nan)
            continue
        pa = ParsedAdvice(valid=bool(r.get("valid")), advice=r.get("advice"))
        vals.append(score_parsed(pa, dict(zip(ADVICES, ret))))
    v = np.array(vals, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not v.size:
        return {"note": "no realized returns"}
    res = M.mean_ci(v, boot)
    return {"mean_bps": res["mean"], "ci": res["ci"], "n": int(v.size)}


def _references(spec: str, results: dict[str, Any]) -> list[str]:
    """What a model is compared with: LLMs vs baselines + classic; classic vs baselines; baselines vs others."""
    kind = results[spec]["kind"]
    if kind == "llm":
        allowed = ("baseline", "classic")
    elif kind == "classic":
        allowed = ("baseline",)
    else:
        allowed = ("baseline",)
    return [s for s, r in results.items() if s != spec and r["kind"] in allowed and r.get("n")]


def _is_candidate(spec: str, results: dict[str, Any]) -> bool:
    """Models that get a verdict: every LLM and classic model; with baselines alone, the requested ones."""
    if any(r["kind"] != "baseline" for r in results.values()):
        return results[spec]["kind"] != "baseline"
    return bool(results[spec].get("user"))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _fmt_ci(ci: Sequence[float | None]) -> str:
    if not ci or ci[0] is None:
        return "[n/a]"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def verdict(spec: str, res: dict[str, Any], results: dict[str, Any], primary: str, level: float) -> str:
    """One conservative line: "better" only when the paired CI of the difference excludes 0 for EVERY
    reference; otherwise "not better than" the strongest reference, with the numbers."""
    comps = res["comparisons"]
    name = primary.replace("_", " ").replace("accuracy", "acc")
    best_ref = max(comps, key=lambda r: (comps[r]["b"], r))
    c = comps[best_ref]
    own_ci = res.get("ci", {}).get(primary, [None, None])
    ref_ci = results[best_ref].get("ci", {}).get(primary, [None, None])
    nums = (f"{name} {_fmt(res.get(primary))} {_fmt_ci(own_ci)} vs {_fmt(results[best_ref].get(primary))} "
            f"{_fmt_ci(ref_ci)}; paired difference {c['diff']:+.3f} {_fmt_ci(c['ci'])}, "
            f"n={res['n']:,}, {int(level * 100)}% block bootstrap")
    all_better = all(v["ci"][0] is not None and v["ci"][0] > 0 for v in comps.values())
    invalid = res["validity"]["n"] - res["validity"]["valid"]
    inv = f"; {invalid:,} invalid answers counted wrong" if invalid else ""
    inc = "" if res.get("complete") else f"; INCOMPLETE: {res['n']}/{res['n_expected']} items"
    if all_better:
        worst = min(comps, key=lambda r: comps[r]["ci"][0])
        return (f"{spec} is better than every reference ({len(comps)}), the closest being {worst} ({nums}){inv}{inc}")
    if c["ci"][1] is not None and c["ci"][1] < 0:
        return f"{spec} is worse than {best_ref} ({nums}){inv}{inc}"
    return f"{spec} is not better than {best_ref} ({nums}){inv}{inc}"
