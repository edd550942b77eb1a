"""An eval run directory, read and written in one place.

``--out`` of ``atm-eval run`` holds:

- ``manifest.json``: suite config, dataset path and hashes, options, per-model provider description
  (versions, model file hashes), provenance. Written atomically.
- ``truth.parquet``: the evaluated items WITHOUT prompts (id, row, open_time, symbol, label,
  ret_BUY/NOOP/SELL): what metrics and backtests are computed against, so a report can be rebuilt
  even if the dataset directory moves.
- ``predictions/<model>.jsonl``: one line per item as it finishes (id, prompt hash, raw output,
  parsed advice, why invalid, latency, attempts, failed). Each line is flushed when written (a
  ``kill -9`` loses nothing already written) and fsynced at least every half second.
- ``metrics.json`` (``atm.eval.scoring``), ``report.md``, ``report.html`` (``atm.eval.report``).

A shard (``atm-eval run --shard K/N``) is such a directory over its 1/N of the items
(``shard_rows``); ``merge_shards`` joins the N shard directories of one run into one.

The harness writes a run, scoring and the report read it; none of them imports another for it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from atm.errors import AtmError, DataError
from atm.eval.providers import Prediction
from atm.utils import atomic_path, provenance, sha256_text, write_json_atomic

MANIFEST = "manifest.json"
TRUTH = "truth.parquet"
METRICS = "metrics.json"
PREDICTIONS = "predictions"


def manifest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / MANIFEST


def is_run(run_dir: str | Path) -> bool:
    return manifest_path(run_dir).exists()


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's manifest; an AtmError naming the directory when it is not an eval run."""
    p = manifest_path(run_dir)
    if not p.exists():
        raise AtmError(f"{run_dir}: not an eval run (no manifest.json)")
    return json.loads(p.read_text())


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(manifest_path(run_dir), manifest)


def write_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / METRICS, metrics)


def read_truth(run_dir: str | Path):
    """``truth.parquet`` with string ids."""
    import pandas as pd

    truth = pd.read_parquet(Path(run_dir) / TRUTH)
    truth["id"] = truth["id"].astype(str)
    return truth


def write_truth_once(run_dir: str | Path, truth) -> None:
    """Write ``truth.parquet`` atomically unless the run already has one (a resumed run keeps it)."""
    p = Path(run_dir) / TRUTH
    if not p.exists():
        with atomic_path(p, suffix=".parquet") as tmp:
            truth.to_parquet(tmp, index=False)


def predictions_path(run_dir: str | Path, spec: str) -> Path:
    return Path(run_dir) / PREDICTIONS / f"{model_slug(spec)}.jsonl"


def advice_by_model(run_dir: str | Path, manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per model, ``{"id", "advice"}`` rows for the backtest (an invalid answer's advice is None:
    it places no trade)."""
    return {spec: [{"id": i, "advice": r.get("advice") if r.get("valid") else None} for i, r in recs.items()]
            for spec, recs in model_results(run_dir, manifest).items()}


def backtest_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """The suite's ``backtest:`` settings, holding for the label horizon unless the suite says."""
    fields = dict((manifest.get("suite") or {}).get("backtest") or {})
    lab = manifest.get("label_config") or {}
    fields.setdefault("horizon", int(lab.get("horizon", 10) or 10))
    return fields


def model_results(run_dir: str | Path, manifest: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every model's records by id (``read_results`` of each file the manifest names)."""
    return {spec: read_results(Path(run_dir) / entry["file"]) for spec, entry in manifest["models"].items()}


def model_slug(spec: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[:60]
    return f"{s}-{sha256_text(spec)[:6]}"


def read_results(path: Path, repair: bool = False) -> dict[str, dict[str, Any]]:
    """Per-item records by id (last wins). A torn last line is ignored (and cut off if ``repair``).

    A bad line that is NOT the last one is real corruption: it is reported with its line number.
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    if repair and end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    out: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(data[:end].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"corrupt result line ({exc.msg}); move the file away to re-run this model",
                            str(path), lineno) from None
        out[str(rec["id"])] = rec
    return out


class ResultWriter:
    """Append-only JSONL: each record flushed at once, fsynced at least every ``sync_every`` s."""

    def __init__(self, path: Path, sync_every: float = 0.5):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "ab")
        self.sync_every = sync_every
        self._last = time.monotonic()

    def write(self, rec: dict[str, Any]) -> None:
        self.fh.write((json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n").encode())
        self.fh.flush()
        now = time.monotonic()
        if now - self._last >= self.sync_every:
            os.fsync(self.fh.fileno())
            self._last = now

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def record_of(pred: Prediction, phash: str) -> dict[str, Any]:
    rec = pred.to_dict()
    extra = rec.pop("extra", {}) or {}
    rec["prompt_hash"] = phash
    rec["failed"] = bool(extra.pop("failed", False))
    rec["attempts"] = int(extra.pop("attempts", 1))
    if "endpoint" in extra:  # which endpoint of a fan-out answered (atm.eval.fanout)
        rec["endpoint"] = extra.pop("endpoint")
    if extra:
        rec["extra"] = extra
    if rec.get("probs"):
        rec["probs"] = {k: float(v) for k, v in rec["probs"].items()}
    return rec


def failure(item_id: str, reason: str, attempts: int, latency: float = 0.0) -> Prediction:
    return Prediction(id=item_id, raw=None, valid=False, reason=f"request failed: {reason}", latency=latency,
                      extra={"failed": True, "attempts": attempts})


# ---------------------------------------------------------------------------------- shards
SHARD_RULE = "item i (0-based) of the chronological selection belongs to shard i % N + 1"
# suite keys that may differ between the shards of one run: how each machine runs, not what is
# measured (the selection hash covers first/limit)
_RUN_ONLY = {"concurrency", "first", "limit", "generation.timeout", "generation.retries",
             "generation.backoff", "generation.threads"}


def shard_rows(n_items: int, k: int, n: int) -> range:
    """The shard rule: item i (0-based) of the chronological selection belongs to shard ``i % N + 1``.
    Shards differ by at most one item and each spans the whole period; the rule depends only on
    the selection (suite, dataset, split, first, limit), which every shard must share."""
    return range(k - 1, n_items, n)


SPACED_RULE = "item floor(i * M / N) of the M selected, i = 0..N-1 (evenly spaced over the period)"


def spaced_rows(n_items: int, limit: int) -> list[int]:
    """``--limit N``: N items evenly spaced over the chronological selection of ``n_items`` (all of
    them when N >= n_items), so a small run spans the whole period, as shards do (``shard_rows``),
    instead of its first N minutes (``first`` takes those)."""
    if limit >= n_items:
        return list(range(n_items))
    return [i * n_items // limit for i in range(limit)]


def shard_of(run_dir: str | Path) -> dict[str, Any] | None:
    """``{"k", "n", "rule"}`` of a shard run directory (``atm-eval run --shard K/N``), else None."""
    if not is_run(run_dir):
        return None
    return (read_manifest(run_dir).get("data") or {}).get("shard")


def default_merge_dir(shard_dirs: list[str | Path]) -> Path:
    """``runs/eval/X-shard1of4`` -> ``runs/eval/X-merged``."""
    first = Path(shard_dirs[0])
    return first.parent / (re.sub(r"-shard\d+of\d+$", "", first.name) + "-merged")


def _flat(d: Any, pre: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {pre: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{pre}.{k}" if pre else str(k)))
    return out


def _differences(ref: dict[str, Any], ref_dir: Path, man: dict[str, Any], d: Path) -> list[str]:
    """Why shard ``d`` is not a shard of the run ``ref`` is one of (empty when it is)."""
    out: list[str] = []
    a, b = ref.get("data") or {}, man.get("data") or {}
    for key, what in (("split", "split"), ("selection_sha256", "items (content hash of ids, prompts, labels, returns)"),
                      ("n_items_all", "number of selected items")):
        if a.get(key) != b.get(key):
            out.append(f"{what}: {d} has {b.get(key)!r}, {ref_dir} has {a.get(key)!r}")
    for key, what in (("template_sha256", "prompt template"), ("label_config", "label rule")):
        if ref.get(key) != man.get(key):
            out.append(f"{what}: {d} has {man.get(key)!r}, {ref_dir} has {ref.get(key)!r}")
    fa, fb = _flat(ref.get("suite") or {}), _flat(man.get("suite") or {})
    suite_diff = sorted(k for k in set(fa) | set(fb) if k not in _RUN_ONLY and fa.get(k) != fb.get(k))
    if suite_diff:
        out.append(f"suite: {d} differs from {ref_dir} in " +
                   ", ".join(f"{k} ({fb.get(k)!r} vs {fa.get(k)!r})" for k in suite_diff[:8]))
    sa, sb = _specs(ref), _specs(man)
    if sa != sb:
        parts = [f"lacks {', '.join(sorted(sa - sb))}" if sa - sb else "", f"adds {', '.join(sorted(sb - sa))}" if sb - sa else ""]
        out.append(f"models: {d} " + " and ".join(p for p in parts if p) + f" (vs {ref_dir}); give every shard the same --model list")
    for spec in sorted(sa & sb):
        ea, eb = ref["models"].get(spec) or {}, man["models"].get(spec) or {}
        if ea.get("mode") and eb.get("mode") and ea["mode"] != eb["mode"]:
            out.append(f"{spec}: {d} ran it in {eb['mode']} mode, {ref_dir} in {ea['mode']}")
        da, db = ea.get("describe") or {}, eb.get("describe") or {}
        for key in ("sha256", "quant"):  # the model file itself (a tag may name another file elsewhere)
            if da.get(key) and db.get(key) and da[key] != db[key]:
                out.append(f"{spec}: {d} evaluated a model with {key} {db[key]}, {ref_dir} one with {da[key]}")
    return out


def _specs(man: dict[str, Any]) -> set[str]:
    return set(man.get("specs") or man.get("models") or {})


def merge_shards(shard_dirs: list[str | Path], out: str | Path) -> Path:
    """Join the shard directories of one run into the run directory one machine would have written.

    Refuses shards of different runs (split, items by content hash, suite, models and their files,
    label rule, template), a shard given twice or missing, and an ``out`` that holds a run of its own.
    The merged directory is rewritten from the shards each time (items in the unsharded order), so
    its metrics equal an unsharded run's item for item; a shard still running counts as INCOMPLETE.
    """
    import pandas as pd

    dirs = [Path(d) for d in shard_dirs]
    if not dirs:
        raise AtmError("give the shard directories to merge")
    mans = {d: read_manifest(d) for d in dirs}
    by_k: dict[int, Path] = {}
    ns: dict[int, list[Path]] = {}
    for d in dirs:
        sh = (mans[d].get("data") or {}).get("shard")
        if not sh:
            raise AtmError(f"{d}: not a shard (run with atm-eval run --shard K/N)")
        ns.setdefault(int(sh["n"]), []).append(d)
        if int(sh["k"]) in by_k:
            raise AtmError(f"shard {sh['k']}/{sh['n']} given twice: {by_k[int(sh['k'])]} and {d}")
        by_k[int(sh["k"])] = d
    if len(ns) > 1:
        raise AtmError("shards of different splits: " + "; ".join(f"{len(v)} of {n} ({', '.join(map(str, v))})"
                                                                  for n, v in sorted(ns.items())))
    n = next(iter(ns))
    missing = [k for k in range(1, n + 1) if k not in by_k]
    if missing:
        raise AtmError(f"missing shard{'s' if len(missing) > 1 else ''} " + ", ".join(f"{k}/{n}" for k in missing)
                       + " of this run: give every shard's directory (run a missing one with "
                       "atm-eval run ... --shard K/N)")
    order = [by_k[k] for k in range(1, n + 1)]
    ref_dir, ref = order[0], mans[order[0]]
    problems = [p for d in order[1:] for p in _differences(ref, ref_dir, mans[d], d)]
    if problems:
        raise AtmError("refusing to merge shards of different runs:\n  " + "\n  ".join(problems))
    out = Path(out)
    if out.resolve() in {d.resolve() for d in dirs}:
        raise AtmError(f"--out {out} is one of the shards; merge into a new directory")
    if is_run(out) and not (read_manifest(out).get("data") or {}).get("merged_from"):
        raise AtmError(f"--out {out} holds a run of its own; merge into a new directory")

    n_all = int(ref["data"]["n_items_all"])
    parts, shard_ids = [], {}
    for k, d in enumerate(order, 1):
        t = read_truth(d)
        rows = shard_rows(n_all, k, n)
        if len(t) != len(rows):
            raise AtmError(f"{d}: {len(t)} items in truth.parquet, shard {k}/{n} of {n_all} has {len(rows)}")
        parts.append(t.assign(_pos=list(rows)))
        shard_ids[d] = set(t["id"])
    truth = pd.concat(parts, ignore_index=True).sort_values("_pos", kind="stable").drop(columns="_pos")
    truth = truth.reset_index(drop=True)
    ids = truth["id"].tolist()
    if sha256_text("\n".join(ids)) != ref["data"].get("ids_sha256_all"):
        raise AtmError(f"the shards' items, joined, are not the selection they were cut from ({ref_dir})")

    specs = list(dict.fromkeys([*(ref.get("specs") or []), *ref.get("models", {})]))
    models: dict[str, Any] = {}
    files: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        recs: dict[str, dict[str, Any]] = {}
        per_shard, notes, entry0 = {}, [], None
        wall, n_timed = 0.0, 0  # the shards' prediction loops added up: s/item as on one machine
        for k, d in enumerate(order, 1):
            e = mans[d]["models"].get(spec)
            if not e:
                per_shard[f"{k}/{n}"] = {"status": "not started", "n_done": 0}
                continue
            entry0 = entry0 or e
            got = read_results(d / e["file"])
            stray = [i for i in got if i not in shard_ids[d]]
            if stray:
                raise DataError(f"{len(stray)} records for items outside shard {k}/{n}, e.g. {stray[0]!r}",
                                str(d / e["file"]))
            recs.update(got)
            per_shard[f"{k}/{n}"] = {"status": e.get("status"), "n_done": len(got)}
            wall += float(e.get("wall_s") or 0.0)
            n_timed += int(e.get("n_timed") or 0)
            if e.get("note") and e["note"] not in notes:
                notes.append(e["note"])
        if entry0 is None:
            continue  # asked for but started on no shard yet
        done = all(v["status"] == "done" for v in per_shard.values())
        models[spec] = {**entry0, "file": str(predictions_path(out, spec).relative_to(out)),
                        "status": "done" if done else "incomplete", "n_done": len(recs),
                        "note": "; ".join(notes) or None, "shards": per_shard,
                        "wall_s": round(wall, 3), "n_timed": n_timed}
        files[spec] = [recs[i] for i in ids if i in recs]

    data = {k: v for k, v in ref["data"].items() if k != "shard"}
    data.update(n_items=n_all, ids_sha256=ref["data"]["ids_sha256_all"],
                first_open_time=str(truth["open_time"].iloc[0]) if "open_time" in truth else None,
                last_open_time=str(truth["open_time"].iloc[-1]) if "open_time" in truth else None,
                merged_from=[{"dir": str(d), "shard": f"{k}/{n}", "n_items": len(shard_ids[d]),
                              "dataset": mans[d]["data"].get("path"),
                              "machine": (mans[d].get("provenance") or {}).get("machine")}
                             for k, d in enumerate(order, 1)])
    manifest = {**ref, "data": data, "models": models, "specs": specs,
                "last_command": provenance(None)["command"]}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / TRUTH, suffix=".parquet") as tmp:
        truth.to_parquet(tmp, index=False)
    for spec, rows in files.items():
        with atomic_path(predictions_path(out, spec)) as tmp:
            tmp.write_bytes(b"".join((json.dumps(r, ensure_ascii=False, default=_json_default) + "\n").encode()
                                     for r in rows))
    write_manifest(out, manifest)
    return out
