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
from atm.utils import atomic_path, sha256_text, write_json_atomic

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
    if extra:
        rec["extra"] = extra
    if rec.get("probs"):
        rec["probs"] = {k: float(v) for k, v in rec["probs"].items()}
    return rec


def failure(item_id: str, reason: str, attempts: int, latency: float = 0.0) -> Prediction:
    return Prediction(id=item_id, raw=None, valid=False, reason=f"request failed: {reason}", latency=latency,
                      extra={"failed": True, "attempts": attempts})
