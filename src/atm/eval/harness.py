"""The evaluation harness: many models, the same items, resumable per-item results, one report.

A run directory (``--out``) holds:

- ``manifest.json``: suite config, dataset path and hashes, options, per-model provider description
  (versions, model file hashes), provenance. Written atomically.
- ``truth.parquet``: the evaluated items WITHOUT prompts (id, row, open_time, symbol, label,
  ret_BUY/NOOP/SELL): what metrics and backtests are computed against, so a report can be rebuilt
  even if the dataset directory moves.
- ``predictions/<model>.jsonl``: one line per item as it finishes (id, prompt hash, raw output,
  parsed advice, why invalid, latency, attempts, failed). Each line is flushed when written (a
  ``kill -9`` loses nothing already written) and fsynced at least every half second.
- ``metrics.json``, ``report.md``, ``report.html``.

Resume: rerunning the same command reads each predictions file, drops a torn last line (the one
being written when the process died), dedupes by id (last record wins, so ``--retry-failed`` can
replace failures) and only asks the models about the items still missing. Nothing is lost or
doubled. Items are never passed to a model with their label or realized returns.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from pydantic import Field

from atm.config import AtmConfig
from atm.errors import AtmError, DataError
from atm.eval.providers import ADVICES, Prediction, Provider, get_provider, parse_spec, resolve_registry
from atm.utils import provenance, repo_root, sha256_file, sha256_text, write_json_atomic

# Columns a model may never see (the answer and what it earns).
HIDDEN_COLUMNS = ("label", "answer", "ret_BUY", "ret_NOOP", "ret_SELL", "change", "true_change")
TRUTH_COLUMNS = ("id", "row", "open_time", "symbol", "label", "ret_BUY", "ret_NOOP", "ret_SELL",
                 "change", "true_change")
DEFAULT_SUITE = "default.yaml"


# ---------------------------------------------------------------------------------- config
class DataSpec(AtmConfig):
    """Where the items come from: a built dataset dir, and how to build it when missing."""

    dataset: str | None = Field(None, description="built dataset dir (datasets/build/NAME), relative to the checkout")
    raw: str | None = Field(None, description="raw Binance tree to build klines from when the dataset is missing")
    symbol: str = Field("BTCUSDT", description="symbol to build from `raw`")
    interval: str = Field("1m", description="kline interval")
    build: dict[str, Any] = Field(default_factory=dict,
                                  description="atm.prompting.dataset.BuildConfig fields (encoder, template, label, ...)")


class MetricsSpec(AtmConfig):
    """Metric and uncertainty settings."""

    n_boot: int = Field(1000, ge=0, description="bootstrap replicates")
    level: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals")
    block: int | None = Field(None, ge=1, description="bootstrap block length in minutes (None: max(horizon, sqrt(n)))")
    seed: int = Field(0, description="bootstrap seed")
    calibration_bins: int = Field(10, ge=2, description="reliability-diagram bins")
    primary: str = Field("balanced_accuracy", description="metric the verdict is about")
    show_raw_accuracy: bool = Field(True, description="show raw accuracy beside balanced accuracy")


class GenerationSpec(AtmConfig):
    """How LLM providers are asked."""

    max_tokens: int = Field(64, ge=1, description="answer token budget (a valid answer is ~25 tokens)")
    temperature: float = Field(0.0, ge=0, description="sampling temperature (0 = greedy)")
    timeout: float = Field(120.0, gt=0, description="per-request timeout in seconds")
    retries: int = Field(3, ge=0, description="retries of a timed-out / failed request before recording a failure")
    backoff: float = Field(0.5, ge=0, description="first retry delay in seconds (doubles each retry)")
    n_ctx: int = Field(4096, ge=256, description="context size for in-process llama.cpp")
    threads: int | None = Field(None, description="CPU threads for in-process engines (None: all cores)")


class SuiteConfig(AtmConfig):
    """An evaluation suite (``eval/suites/NAME.yaml``)."""

    name: str = Field("default", description="suite name (names the default --out)")
    description: str = Field("", description="what the suite measures")
    data: DataSpec = Field(default_factory=DataSpec, description="dataset and how to build it")
    split: str = Field("verify", description="split of the items view to evaluate")
    first: int | None = Field(None, ge=1, description="evaluate only the first N minutes of the split (chronological)")
    limit: int | None = Field(None, ge=1, description="evaluate at most N items (after `first`)")
    mode: str = Field("generate", description="generate (constrained decoding) or loglik (option log-probs)")
    concurrency: int = Field(1, ge=1, description="requests in flight per model")
    baselines: list[str] = Field(default_factory=lambda: ["majority", "prior", "random", "momentum", "persistence"],
                                 description="baselines evaluated beside every run (baseline:NAME)")
    baseline_options: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                        description="options per baseline, e.g. momentum: {lookback: 10}")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="metric settings")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="LLM request settings")
    backtest: dict[str, Any] = Field(default_factory=dict, description="atm.eval.backtest.BacktestConfig fields")


def suites_dir() -> Path:
    root = repo_root()
    if root is None:
        raise AtmError("eval/suites not found: run from an ATM checkout or set ATM_ROOT")
    return root / "eval" / "suites"


def resolve_suite(path: str | Path | None) -> Path:
    if path is None:
        return suites_dir() / DEFAULT_SUITE
    p = Path(path)
    if p.exists():
        return p
    cand = suites_dir() / (p.name if p.suffix else f"{p.name}.yaml")
    if cand.exists():
        return cand
    names = sorted(x.stem for x in suites_dir().glob("*.yaml"))
    raise AtmError(f"suite {path!s} not found; shipped suites: {', '.join(names)}")


def load_suite(path: str | Path | None, overrides: Iterable[str] = ()) -> SuiteConfig:
    return SuiteConfig.load(resolve_suite(path), overrides=list(overrides))


def _abs(p: str | Path) -> Path:
    q = Path(p)
    if q.is_absolute() or q.exists():
        return q
    root = repo_root()
    return (root / q) if root is not None else q


# ---------------------------------------------------------------------------------- data
def items_path(dataset_dir: Path, split: str) -> Path:
    return dataset_dir / "items" / "data" / f"{split}-00000-of-00001.parquet"


def ensure_dataset(suite: SuiteConfig, data: str | None = None) -> Path:
    """The dataset dir to evaluate: ``--data``, else the suite's, built on the spot when missing."""
    if data:
        d = _abs(data)
        if not (d / "items").is_dir():
            raise AtmError(f"{d}: not a built dataset (no items/ view); build one with `atm prompts build`")
        return d
    if not suite.data.dataset:
        raise AtmError(f"suite {suite.name!r} names no dataset; pass --data datasets/build/NAME")
    d = _abs(suite.data.dataset)
    if (d / "items").is_dir() and (d / "dataset.json").exists():
        return d
    if not suite.data.raw:
        raise AtmError(f"{d}: dataset missing and suite {suite.name!r} gives no `data.raw` to build it from")
    return build_suite_dataset(suite, d)


def build_suite_dataset(suite: SuiteConfig, out: Path) -> Path:
    """Build klines + dataset for a suite (the default suite builds from the shipped sample)."""
    from atm.market.klines import build_klines
    from atm.prompting.dataset import BuildConfig, build_dataset

    raw = _abs(suite.data.raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    kl = out.parent / f"{out.name}.klines.parquet"
    print(f"building dataset {out} from {raw} ({suite.data.symbol}) ...", flush=True)
    build_klines(raw, suite.data.symbol, interval=suite.data.interval, out=kl)
    fields = dict(suite.data.build)
    if "template" in fields:
        fields["template"] = str(_abs(fields["template"]))
    cfg = BuildConfig(**{**fields, "klines": str(kl), "out": str(out)})
    return Path(build_dataset(cfg))


def load_items(dataset_dir: Path, split: str, columns: Sequence[str] | None = None):
    import pandas as pd

    p = items_path(dataset_dir, split)
    if not p.exists():
        avail = sorted(x.name.split("-")[0] for x in (dataset_dir / "items" / "data").glob("*.parquet"))
        raise AtmError(f"{p}: no {split!r} split in {dataset_dir} (available: {', '.join(avail) or 'none'})")
    df = pd.read_parquet(p, columns=list(columns) if columns else None)
    return df


def select_items(df, suite: SuiteConfig, limit: int | None):
    """Chronological order (so shared prompt prefixes are reused), then `first`, then `limit`."""
    sort_col = "open_time" if "open_time" in df.columns else "row"
    df = df.sort_values(sort_col, kind="stable").reset_index(drop=True)
    unlabeled = ~df["label"].isin(ADVICES)
    if unlabeled.any():  # items without a label cannot be scored: say so, never mix them in
        print(f"note: {int(unlabeled.sum())} items without a BUY/NOOP/SELL label are not evaluated")
        df = df[~unlabeled].reset_index(drop=True)
    if suite.first:
        df = df.iloc[:suite.first]
    lim = limit or suite.limit
    if lim:
        df = df.iloc[:lim]
    if df.empty:
        raise AtmError("no items to evaluate after selection")
    if df["id"].duplicated().any():
        raise DataError(f"duplicate item ids in the items view, e.g. {df['id'][df['id'].duplicated()].iloc[0]!r}")
    return df.reset_index(drop=True)


def prompt_hash(prompt: Any) -> str:
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    return sha256_text(json.dumps(_plain(prompt), sort_keys=True, ensure_ascii=False))[:16]


def _plain(x: Any) -> Any:
    """numpy/pyarrow containers from parquet -> plain Python (lists of dicts of str)."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        x = x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            return x.item()
        except (ValueError, AttributeError):
            return x
    return x


def model_items(df) -> list[dict[str, Any]]:
    """Rows as dicts for providers, without the label or any realized return."""
    cols = [c for c in df.columns if c not in HIDDEN_COLUMNS]
    out = []
    for rec in df[cols].to_dict("records"):
        rec = {k: _plain(v) for k, v in rec.items()}
        rec["id"] = str(rec["id"])
        if "open_time" in rec:
            rec["open_time"] = str(rec["open_time"])
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------- results file
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


# ---------------------------------------------------------------------------------- running
def model_kind(spec: str) -> str:
    try:
        prefix, _ = parse_spec(spec)
    except AtmError:
        return "llm"
    return prefix if prefix in ("baseline", "classic") else "llm"


def _expand_models(models: Sequence[str], suite: SuiteConfig, with_baselines: bool) -> list[str]:
    out: list[str] = []
    for m in models:
        if m not in out:
            out.append(m)
    if with_baselines:
        for b in suite.baselines:
            spec = b if b.startswith("baseline:") else f"baseline:{b}"
            if spec not in out:
                out.append(spec)
    return out


def run_eval(models: Sequence[str], suite: SuiteConfig, out: str | Path, *, data: str | None = None,
             split: str | None = None, limit: int | None = None, mode: str | None = None,
             concurrency: int | None = None, with_baselines: bool = True, retry_failed: bool = False,
             report: bool = True, quiet: bool = False) -> dict[str, Any]:
    """Evaluate ``models`` (plus the suite's baselines) on the same items; resumable. Returns metrics."""
    import pandas as pd

    if not models:
        raise AtmError("give at least one --model (e.g. --model atm:q8 or --model baseline:majority)")
    for m in models:  # unknown names fail before any work, listing the valid forms
        if parse_spec(m)[0] == "atm":
            resolve_registry(m)
    split = split or suite.split
    mode = mode or suite.mode
    if mode not in ("generate", "loglik"):
        raise AtmError(f"--mode {mode!r}: expected generate or loglik")
    concurrency = concurrency or suite.concurrency
    out = Path(out)
    dataset_dir = ensure_dataset(suite, data)
    ipath = items_path(dataset_dir, split)
    df = select_items(load_items(dataset_dir, split), suite, limit)
    ids = df["id"].astype(str).tolist()
    data_info = {"path": str(dataset_dir), "split": split, "items_file": str(ipath),
                 "items_sha256": sha256_file(ipath), "n_items": len(ids),
                 "ids_sha256": sha256_text("\n".join(ids)),
                 "klines_sha256": sha256_file(dataset_dir / "klines.parquet") if (dataset_dir / "klines.parquet").exists() else None,
                 "first_open_time": str(df["open_time"].iloc[0]) if "open_time" in df else None,
                 "last_open_time": str(df["open_time"].iloc[-1]) if "open_time" in df else None}
    meta_path = dataset_dir / "dataset.json"
    dataset_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}

    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "manifest.json"
    manifest: dict[str, Any]
    if mpath.exists():
        manifest = json.loads(mpath.read_text())
        old = manifest.get("data", {})
        if old.get("ids_sha256") != data_info["ids_sha256"] or old.get("items_sha256") != data_info["items_sha256"]:
            raise AtmError(
                f"{out} holds a run on other items ({old.get('path')}, split {old.get('split')}, "
                f"{old.get('n_items')} items; now {dataset_dir}, {split}, {len(ids)}): use another --out")
    else:
        manifest = {"format": 1, "suite": suite.to_dict(), "data": data_info, "models": {},
                    "dataset_config": dataset_meta.get("config", {}),
                    "label_config": _label_cfg(dataset_meta),
                    "template_sha256": (dataset_meta.get("template") or {}).get("sha256"),
                    "provenance": provenance(suite)}
    manifest["last_command"] = provenance(None)["command"]
    truth_cols = [c for c in TRUTH_COLUMNS if c in df.columns]
    truth = df[truth_cols].copy()
    truth["id"] = truth["id"].astype(str)
    if not (out / "truth.parquet").exists():
        from atm.utils import atomic_path

        with atomic_path(out / "truth.parquet", suffix=".parquet") as tmp:
            truth.to_parquet(tmp, index=False)
    write_json_atomic(mpath, manifest)

    specs = _expand_models(models, suite, with_baselines)
    m_items = model_items(df)
    phashes = [prompt_hash(it.get("prompt")) for it in m_items]
    train_cache: list[dict] | None = None

    for spec in specs:
        kind = model_kind(spec)
        opts: dict[str, Any] = {"generation": suite.generation.to_dict(), "concurrency": concurrency,
                                "dataset_meta": dataset_meta, "dataset_dir": str(dataset_dir)}
        if kind == "baseline":
            opts.update(suite.baseline_options.get(spec.split(":", 1)[1], {}))
        entry = manifest["models"].get(spec, {})
        rpath = out / "predictions" / f"{model_slug(spec)}.jsonl"
        done = read_results(rpath, repair=True)
        todo_idx = [i for i, id_ in enumerate(ids)
                    if id_ not in done or (retry_failed and done[id_].get("failed"))]
        if not todo_idx and entry.get("status") == "done":
            entry["user"] = bool(entry.get("user")) or spec in models
            write_json_atomic(mpath, manifest)
            if not quiet:
                print(f"{spec}: all {len(ids)} items already done ({rpath})")
            continue
        provider = get_provider(spec, **opts)
        try:
            used_mode = mode
            note = None
            if mode == "loglik" and not provider.supports_loglik:
                used_mode = "generate"
                note = f"{spec} cannot give log-probabilities; fell back to generate"
                print(f"note: {note}")
            if entry.get("mode") and entry["mode"] != used_mode and done:
                raise AtmError(f"{out}: {spec} was run in {entry['mode']} mode; this run asks {used_mode}. "
                               "Use another --out to compare modes.")
            if provider.needs_fit:
                if train_cache is None:
                    train_cache = _train_items(dataset_dir)
                provider.fit(str(dataset_dir), train_cache)
            entry.update({"file": str(rpath.relative_to(out)), "kind": kind, "mode": used_mode,
                          "user": bool(entry.get("user")) or spec in models,
                          "note": note, "status": "running", "describe": provider.describe()})
            manifest["models"][spec] = entry
            write_json_atomic(mpath, manifest)
            t0 = time.monotonic()
            n_new = _predict_into(provider, [m_items[i] for i in todo_idx], [phashes[i] for i in todo_idx],
                                  used_mode, rpath, suite.generation, spec, quiet)
            extra_note = getattr(provider, "mode_note", None)
            if extra_note:
                entry["note"] = "; ".join(x for x in (entry.get("note"), extra_note) if x)
            done = read_results(rpath)
            missing = [i for i in ids if i not in done]
            entry.update({"status": "done" if not missing else "incomplete", "n_done": len(ids) - len(missing),
                          "wall_s_last": round(time.monotonic() - t0, 3), "n_new_last": n_new,
                          "describe": provider.describe()})
            write_json_atomic(mpath, manifest)
        finally:
            provider.close()

    metrics = evaluate_run(out)
    if report:
        from atm.eval.report import write_report

        paths = write_report([out], out_dir=out, metrics=[metrics])
        metrics["report"] = {"md": str(paths["md"]), "html": str(paths["html"])}
    return metrics


def _label_cfg(meta: dict[str, Any]) -> dict[str, Any]:
    from atm.eval.baselines import label_config

    return label_config(meta)


def _train_items(dataset_dir: Path) -> list[dict]:
    cols = ["id", "row", "label", "open_time"]
    df = load_items(dataset_dir, "train", columns=cols)
    df["id"] = df["id"].astype(str)
    return df.to_dict("records")


def _predict_into(provider: Provider, items: list[dict], phashes: list[str], mode: str, rpath: Path,
                  gen: GenerationSpec, spec: str, quiet: bool) -> int:
    """Ask ``provider`` about ``items`` chunk by chunk; append each result as it finishes.

    A chunk that raises is retried with exponential backoff; after ``gen.retries`` retries each of its
    items is recorded as a failure (kept, counted invalid), never dropped.
    """
    from atm.utils import progress

    if not items:
        return 0
    by_id = {it["id"]: h for it, h in zip(items, phashes)}
    writer = ResultWriter(rpath)
    written = 0
    chunk = max(1, int(getattr(provider, "batch_size", 64)))
    bar = progress(total=len(items), desc=spec, unit="item") if not quiet else None
    try:
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            pending = {it["id"] for it in part}
            attempt = 0
            while pending:
                todo = [it for it in part if it["id"] in pending]
                try:
                    for pred in provider.predict_iter(todo, mode):
                        if pred.id not in pending:
                            continue  # a provider answering twice is ignored, not doubled
                        writer.write(record_of(pred, by_id[pred.id]))
                        pending.discard(pred.id)
                        written += 1
                        if bar is not None:
                            bar.update(1)
                    if pending:
                        raise AtmError(f"provider returned no prediction for {len(pending)} items")
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # noqa: BLE001 - recorded, never dropped
                    attempt += 1
                    if attempt > gen.retries:
                        for id_ in sorted(pending):
                            writer.write(record_of(failure(id_, f"{type(exc).__name__}: {exc}"[:300], attempt),
                                                   by_id[id_]))
                            written += 1
                            if bar is not None:
                                bar.update(1)
                        pending.clear()
                    else:
                        time.sleep(gen.backoff * (2 ** (attempt - 1)))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return written


# ---------------------------------------------------------------------------------- metrics of a run
def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """Metrics of every model in a run dir (recomputed from the per-item files; works mid-run)."""
    import numpy as np
    import pandas as pd

    from atm.eval import metrics as M

    run_dir = Path(run_dir)
    mpath = run_dir / "manifest.json"
    if not mpath.exists():
        raise AtmError(f"{run_dir}: not an eval run (no manifest.json)")
    manifest = json.loads(mpath.read_text())
    truth = pd.read_parquet(run_dir / "truth.parquet")
    truth["id"] = truth["id"].astype(str)
    suite = SuiteConfig.model_validate(manifest["suite"])
    ms = suite.metrics
    lcfg = manifest.get("label_config") or {}
    horizon = _horizon(lcfg)
    ids = truth["id"].tolist()
    t_all = M.encode_true(truth["label"].tolist())
    change_col = next((c for c in ("true_change", "change") if c in truth.columns), None)

    preds: dict[str, dict[str, dict]] = {}
    for spec, entry in manifest["models"].items():
        preds[spec] = read_results(run_dir / entry["file"])
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
        if len(have):
            res.update(M.classification(t, p))
            res["ci"] = M.bootstrap_ci(t, p, boot)
            lat = np.array([float(r.get("latency") or 0.0) for r in rlist])
            res["latency"] = {"mean_s": float(lat.mean()), "p50_s": float(np.median(lat)),
                              "p99_s": float(np.percentile(lat, 99)), "total_s": float(lat.sum())}
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
    write_json_atomic(run_dir / "metrics.json", out)
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
