"""``classic:MODEL[@ARTIFACT_DIR]``: the classic models behind the eval provider interface."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from atm.constants import ADVICES
from atm.errors import AtmError
from atm.eval.classic.core import MODELS, ClassicConfig, load_classic, read_klines, train_classic
from atm.eval.providers import Prediction, Provider

log = logging.getLogger(__name__)


class ClassicProvider(Provider):
    """``classic:MODEL[@ARTIFACT_DIR]``. Options: ``classic`` (dict of ClassicConfig overrides),
    ``classic_root`` (where artifacts go, default ``runs/classic`` or ``$ATM_CLASSIC_DIR``)."""

    supports_loglik = True  # probabilities come with every answer; the mode changes nothing
    needs_fit = True  # fit() trains, reuses or loads, and reads the dataset's klines
    batch_size = 100_000  # features are computed for the whole batch at once

    def __init__(self, spec: str, arg: str, **options: Any):
        super().__init__(spec, arg, **options)
        name, _, path = arg.partition("@")
        if name not in MODELS:
            raise AtmError(f"unknown classic model {arg!r}; valid: " + ", ".join(f"classic:{m}" for m in MODELS)
                           + " (optionally @RUN_DIR of a saved artifact)")
        self.name = name
        self.artifact = Path(path) if path else None
        self.model: Any = None  # a core.FittedClassic once fitted / loaded
        self._kl = None
        self._features = None
        self.dataset_dir: Path | None = Path(options["dataset_dir"]) if options.get("dataset_dir") else None
        self.overlap_note: str | None = None

    def fit(self, dataset_dir: str, train_items: Sequence[dict]) -> None:
        self.dataset_dir = Path(dataset_dir)
        if self.artifact is not None:
            self.model = load_classic(self.artifact)
            if self.model.cfg.model != self.name:
                raise AtmError(f"{self.artifact} holds a classic:{self.model.cfg.model} model, not classic:{self.name}")
        else:
            overrides = dict(self.options.get("classic") or {})
            cfg = ClassicConfig(**{**overrides, "model": self.name})
            path = train_classic(self.dataset_dir, cfg, root=self.options.get("classic_root"), quiet=False)
            self.model = load_classic(path)
        self._load_klines()

    def _load_klines(self) -> None:
        if self.dataset_dir is None:
            raise AtmError(f"{self.spec}: no dataset to read klines from (fit() was not called)")
        self._kl = read_klines(self.dataset_dir)
        self._features = self.model.indicators_for(self._kl) if self.model is not None else None

    def predict(self, items: Sequence[dict], mode: str = "generate") -> list[Prediction]:
        import numpy as np

        if self.model is None:
            if self.artifact is None:
                raise AtmError(f"{self.spec}: call fit() first (it trains the model on the train items)")
            self.model = load_classic(self.artifact)
        if self._kl is None:
            self._load_klines()
        if not items:
            return []
        t0 = time.perf_counter()
        rows = np.array([int(it["row"]) for it in items], dtype=np.int64)
        self._check_overlap(items)
        P = self.model.predict_proba(self._kl, rows, self._features)
        symbols = [it.get("symbol") for it in items]
        pred = self.model.advice(P, symbols)
        per_item = (time.perf_counter() - t0) / len(items)
        out = []
        for it, p, j in zip(items, P, pred):
            advice = ADVICES[int(j)]
            probs = {a: float(v) for a, v in zip(ADVICES, p)}
            out.append(Prediction(id=str(it["id"]), raw=json.dumps({"advice": advice, "probs": probs}),
                                  advice=advice, predicted_change=None, probs=probs, valid=True,
                                  latency=per_item))
        return out

    def _check_overlap(self, items: Sequence[dict]) -> None:
        """Warn when evaluated minutes fall inside the artifact's training period (a leak)."""
        import pandas as pd

        per = (self.model.record.get("train") or {})
        fit_period = per.get("val_period") or per.get("fit_period")
        first = (per.get("fit_period") or [None])[0]
        if not first or not fit_period or not items or "open_time" not in items[0]:
            return
        trained_symbols = per.get("symbols")
        same = [it for it in items if not trained_symbols or it.get("symbol") in (None, *trained_symbols)]
        if not same:
            return  # another pair at the same times is not a leak
        t = pd.to_datetime([it["open_time"] for it in same], utc=True)
        inside = int(((t >= pd.Timestamp(first)) & (t <= pd.Timestamp(fit_period[1]))).sum())
        if inside:
            self.overlap_note = (f"WARNING: {inside} evaluated minutes lie inside {self.spec}'s training period "
                                 f"({first} .. {fit_period[1]}): its scores there are not out-of-sample")
            self.mode_note = self.overlap_note
            log.warning(self.overlap_note)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"spec": self.spec, "kind": "classic", "model": self.name}
        if self.model is None:
            return d
        r = self.model.record
        d.update({
            "artifact": str(self.model.path) if self.model.path else None,
            "classes": r.get("classes"),
            "class_weight": r.get("class_weight"),
            "thresholds": r.get("thresholds"),
            "threshold_objective": (r.get("config") or {}).get("threshold"),
            "design": r.get("design"),
            "n_features": len(r.get("feature_names") or []),
            "train": r.get("train"),
            "validation": r.get("validation"),
            "estimator": {k: v for k, v in (r.get("estimator") or {}).items() if k != "history"},
            "config": r.get("config"),
            "trained_on": (r.get("dataset") or {}).get("path"),
            "versions": ((r.get("provenance") or {}).get("versions")),
        })
        if self.overlap_note:
            d["warning"] = self.overlap_note
        return d
