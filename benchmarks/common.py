"""Helpers shared by the benchmark scripts: machine description and the results JSON writer."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import RESULTS, machine  # noqa: E402


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(name: str, title: str, figures: list[dict], targets: list[dict], notes: str = "") -> Path:
    """Write benchmarks/results/<name>.json (rendered into docs/benchmarks.md by run_all.py)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {"title": title, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
               "machine": machine(), "figures": figures, "targets": targets, "notes": notes}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return out
