"""The evaluation harness: many models, the same items, resumable per-item results.

``run_eval`` selects the items, writes the run directory (``atm.eval.rundir``: manifest, truth,
one predictions file per model), asks each provider (``atm.eval.providers``) about the items still
missing and scores the run (``atm.eval.scoring``). The report (``atm.eval.report``) is written
by its caller, the CLI.

Resume: rerunning the same command reads each predictions file, drops a torn last line (the one
being written when the process died), dedupes by id (last record wins, so ``--retry-failed`` can
replace failures) and only asks the models about the items still missing. Nothing is lost or
doubled. Items are never passed to a model with their label or realized returns.

Shards: ``shard="K/N"`` runs a deterministic 1/N of the selected items (``shard_rows``), so N
machines share one run; each shard directory is a run of its own (resumable as above) and
``atm.eval.rundir.merge_shards`` joins them into the run one machine would have written.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from pydantic import Field

from atm.config import AtmConfig
from atm.errors import AtmError, DataError
from atm.artifacts import DatasetDir
from atm.constants import ADVICES
from atm.eval import rundir
from atm.eval.providers import (GenerationSpec, Provider, get_provider, model_kind, parse_spec, retrying,
                                resolve_registry)
from atm.eval.rundir import ResultWriter, failure, read_results, record_of, shard_rows
from atm.eval.scoring import MetricsSpec, evaluate_run
from atm.utils import provenance, repo_root, sha256_file, sha256_text

log = logging.getLogger(__name__)

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


class SuiteConfig(AtmConfig):
    """An evaluation suite (``eval/suites/NAME.yaml``)."""

    name: str = Field("default", description="suite name (names the default --out)")
    description: str = Field("", description="what the suite measures")
    data: DataSpec = Field(default_factory=DataSpec, description="dataset and how to build it")
    split: str = Field("verify", description="split of the items view to evaluate")
    first: int | None = Field(None, ge=1, description="evaluate only the first N minutes of the split (chronological)")
    limit: int | None = Field(None, ge=1, description="evaluate N items evenly spaced over the selection (after `first`)")
    mode: str = Field("generate", description="generate (constrained decoding) or loglik (option log-probs)")
    concurrency: int = Field(1, ge=1, description="requests in flight per model")
    baselines: list[str] = Field(default_factory=lambda: ["majority", "prior", "random", "momentum", "persistence"],
                                 description="baselines evaluated beside every run (baseline:NAME)")
    baseline_options: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                        description="options per baseline, e.g. momentum: {lookback: 10}")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="metric settings")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="LLM request settings")
    backtest: dict[str, Any] = Field(default_factory=dict, description="atm.eval.backtest.BacktestConfig fields")
    context_ablation: Literal["none", "shuffle"] = Field(
        "none", description="control: 'shuffle' gives every item the prompt (so the context) of another "
        "item of the selection (a seeded permutation), labels unchanged; a model that reads its context "
        "drops to chance. Only prompt-reading models (LLMs) see it; baselines and classic models read "
        "the klines. Use its own --out.")
    ablation_seed: int = Field(0, description="seed of the context_ablation permutation")


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
def ensure_dataset(suite: SuiteConfig, data: str | None = None) -> Path:
    """The dataset dir to evaluate: ``--data``, else the suite's, built on the spot when missing."""
    if data:
        d = _abs(data)
        if not DatasetDir(d).has_view("items"):
            raise AtmError(f"{d}: not a built dataset (no items/ view); build one with `atm prompts build`")
        return d
    if not suite.data.dataset:
        raise AtmError(f"suite {suite.name!r} names no dataset; pass --data datasets/build/NAME")
    d = _abs(suite.data.dataset)
    if DatasetDir(d).has_view("items") and DatasetDir(d).has_card():
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
    log.info("building dataset %s from %s (%s) ...", out, raw, suite.data.symbol)
    build_klines(raw, suite.data.symbol, interval=suite.data.interval, out=kl)
    fields = dict(suite.data.build)
    if "template" in fields:
        fields["template"] = str(_abs(fields["template"]))
    cfg = BuildConfig(**{**fields, "klines": str(kl), "out": str(out)})
    return Path(build_dataset(cfg))


def load_items(dataset_dir: Path, split: str, columns: Sequence[str] | None = None):
    """One split of the dataset's ``items`` view (a DataFrame)."""
    return DatasetDir(dataset_dir).load_view("items", split, columns)


def select_items(df, suite: SuiteConfig, limit: int | None):
    """Chronological order (so shared prompt prefixes are reused), then `first` (the first N
    minutes), then `limit` (N items evenly spaced over what is left: ``rundir.spaced_rows``)."""
    sort_col = "open_time" if "open_time" in df.columns else "row"
    df = df.sort_values(sort_col, kind="stable").reset_index(drop=True)
    unlabeled = ~df["label"].isin(ADVICES)
    if unlabeled.any():  # items without a label cannot be scored: say so, never mix them in
        log.info("note: %d items without a BUY/NOOP/SELL label are not evaluated", int(unlabeled.sum()))
        df = df[~unlabeled].reset_index(drop=True)
    if suite.first:
        df = df.iloc[:suite.first]
    lim = limit or suite.limit
    if lim:
        df = df.iloc[rundir.spaced_rows(len(df), lim)]
    if df.empty:
        raise AtmError("no items to evaluate after selection")
    if df["id"].duplicated().any():
        raise DataError(f"duplicate item ids in the items view, e.g. {df['id'][df['id'].duplicated()].iloc[0]!r}")
    return df.reset_index(drop=True)


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"K/N"`` (1 <= K <= N) -> (K, N); None for no sharding. Which items: ``rundir.shard_rows``."""
    if shard is None:
        return None
    if isinstance(shard, tuple):
        k, n = shard
    else:
        a, sep, b = str(shard).partition("/")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise AtmError(f"--shard {shard!r}: expected K/N, e.g. --shard 1/4 (the first of 4 shards)")
        k, n = int(a), int(b)
    if not 1 <= k <= n:
        raise AtmError(f"--shard {k}/{n}: K must be between 1 and N")
    return k, n


def selection_hash(df, phashes: Sequence[str]) -> str:
    """A content hash of the selected items (not of a path or a file's bytes): each item's id, prompt
    hash, label and realized returns, in order. Shards of one run share it (``merge_shards`` checks)."""
    cols = [c for c in ("label", "ret_BUY", "ret_NOOP", "ret_SELL") if c in df.columns]
    vals = df[cols].to_numpy(dtype=object).tolist() if cols else [[]] * len(df)
    lines = (json.dumps([str(i), h, *[_plain(v) for v in row]], default=str)
             for i, h, row in zip(df["id"].tolist(), phashes, vals))
    return sha256_text("\n".join(lines))


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


def shuffle_contexts(items: list[dict[str, Any]], seed: int = 0) -> None:
    """Give each item another item's ``prompt`` (and ``context``), in place: a seeded permutation
    with no item keeping its own (when there are two or more): the context-ablation control."""
    import numpy as np

    n = len(items)
    if n < 2:
        return
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)  # one cycle through a random order: nobody keeps their own
    for key in ("prompt", "context"):
        if all(key in it for it in items):
            vals = [items[int(k)][key] for k in perm]
            for it, v in zip(items, vals):
                it[key] = v


# ---------------------------------------------------------------------------------- running
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
             quiet: bool = False, shard: str | tuple[int, int] | None = None) -> dict[str, Any]:
    """Evaluate ``models`` (plus the suite's baselines) on the same items; resumable. Returns the
    run's metrics (``atm.eval.scoring.evaluate_run``); the report is written by the caller
    (``atm.eval.report.write_report``; the CLI does it unless ``--no-report``). ``shard="K/N"``
    evaluates only shard K of N (``shard_rows``)."""
    from atm.market.labels import label_config_of

    if not models:
        raise AtmError("give at least one --model (e.g. --model atm:q8 or --model baseline:majority)")
    for m in models:  # unknown names fail before any work, listing the valid forms
        if parse_spec(m)[0] == "atm":
            resolve_registry(m)
    split_given = split is not None
    split = split or suite.split
    mode = mode or suite.mode
    if mode not in ("generate", "loglik"):
        raise AtmError(f"--mode {mode!r}: expected generate or loglik")
    concurrency = concurrency or suite.concurrency
    kn = parse_shard(shard)
    out = Path(out)
    dataset_dir = ensure_dataset(suite, data)
    ds = DatasetDir(dataset_dir)
    ipath = ds.require_view("items", split)
    every = ds.load_view("items", split)
    df = select_items(every, suite, limit)
    if not quiet:
        _say_selection(dataset_dir, data, suite, split, split_given, every, df, limit)
    all_ids = df["id"].astype(str).tolist()
    selection = {"selection_sha256": selection_hash(df, [prompt_hash(p) for p in df["prompt"]]
                                                    if "prompt" in df else [""] * len(df)),
                 "n_items_all": len(all_ids), "ids_sha256_all": sha256_text("\n".join(all_ids))}
    if kn is not None:
        rows = shard_rows(len(df), *kn)
        if not len(rows):
            raise AtmError(f"shard {kn[0]}/{kn[1]} has no items: the selection holds {len(df)}")
        df = df.iloc[list(rows)].reset_index(drop=True)
        selection["shard"] = {"k": kn[0], "n": kn[1], "rule": rundir.SHARD_RULE}
        if not quiet:
            log.info("shard %d/%d: %s of those items (every %d%s one, from the %d%s)", kn[0], kn[1],
                     f"{len(df):,}", kn[1], _ordinal(kn[1])[-2:], kn[0], _ordinal(kn[0])[-2:])
    ids = df["id"].astype(str).tolist()
    data_info = {"path": str(dataset_dir), "split": split, "items_file": str(ipath),
                 "items_sha256": sha256_file(ipath), "n_items": len(ids),
                 "ids_sha256": sha256_text("\n".join(ids)),
                 "klines_sha256": sha256_file(ds.klines_path) if ds.klines_path.exists() else None,
                 "first_open_time": str(df["open_time"].iloc[0]) if "open_time" in df else None,
                 "last_open_time": str(df["open_time"].iloc[-1]) if "open_time" in df else None,
                 **selection}
    card = ds.card()
    dataset_meta = card.to_dict()

    created = not out.exists()
    fresh = not rundir.is_run(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run(out, models, suite, df, ids, data_info, card, dataset_meta, dataset_dir, mode,
                    concurrency, with_baselines, retry_failed, quiet, label_config_of)
    except BaseException:
        if fresh:
            _remove_unstarted(out, created)
        raise


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def _say_selection(dataset_dir: Path, data: str | None, suite: SuiteConfig, split: str, split_given: bool,
                   every, df, limit: int | None) -> None:
    """The run's first lines: which dataset and split (and where each choice came from), which items."""
    src = "--data" if data else f"suite {suite.name!r} data.dataset (give --data to use another)"
    log.info("dataset: %s (from %s)", dataset_dir, src)
    log.info("split: %s (%s)", split, "--split" if split_given else f"suite {suite.name!r}; give --split to change")
    lim = limit or suite.limit
    how = "all labeled items"
    if suite.first:
        how = f"the first {suite.first} minutes"
    if lim and lim < len(every):
        how = (f"evenly spaced over {'those' if suite.first else 'the split'} (--limit {lim}; "
               "--set first=N takes the first N minutes instead)")
    first = str(df["open_time"].iloc[0]) if "open_time" in df else "?"
    last = str(df["open_time"].iloc[-1]) if "open_time" in df else "?"
    log.info("items: %s of %s, %s: %s .. %s", f"{len(df):,}", f"{len(every):,}", how, first, last)


def _remove_unstarted(out: Path, created: bool) -> None:
    """A new run that failed before any model answered (a mistyped model, a provider that cannot
    start) leaves nothing behind: its manifest, truth and empty prediction files go (and ``out``
    when this run created it)."""
    pdir = out / rundir.PREDICTIONS
    preds = list(pdir.glob("*.jsonl")) if pdir.is_dir() else []
    if any(p.stat().st_size for p in preds):
        return  # answers were written: keep the run (it resumes)
    for p in preds:
        p.unlink(missing_ok=True)
    if pdir.is_dir() and not any(pdir.iterdir()):
        pdir.rmdir()
    for name in (rundir.MANIFEST, rundir.TRUTH):
        (out / name).unlink(missing_ok=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _run(out: Path, models, suite: SuiteConfig, df, ids, data_info, card, dataset_meta, dataset_dir: Path,
         mode: str, concurrency: int, with_baselines: bool, retry_failed: bool, quiet: bool,
         label_config_of) -> dict[str, Any]:
    manifest: dict[str, Any]
    if rundir.is_run(out):
        manifest = rundir.read_manifest(out)
        old = manifest.get("data", {})
        if old.get("ids_sha256") != data_info["ids_sha256"] or old.get("items_sha256") != data_info["items_sha256"]:
            raise AtmError(
                f"{out} holds a run on other items ({old.get('path')}, split {old.get('split')}, "
                f"{old.get('n_items')} items; now {dataset_dir}, {data_info['split']}, {len(ids)}): use another --out")
    else:
        manifest = {"format": 1, "suite": suite.to_dict(), "data": data_info, "models": {},
                    "dataset_config": card.config,
                    "label_config": label_config_of(card.label),
                    "template_sha256": card.template.get("sha256"),
                    "provenance": provenance(suite)}
    manifest["last_command"] = provenance(None)["command"]
    truth_cols = [c for c in TRUTH_COLUMNS if c in df.columns]
    truth = df[truth_cols].copy()
    truth["id"] = truth["id"].astype(str)
    rundir.write_truth_once(out, truth)
    rundir.write_manifest(out, manifest)

    specs = _expand_models(models, suite, with_baselines)
    manifest["specs"] = list(dict.fromkeys([*manifest.get("specs", []), *specs]))  # every model asked, started or not
    rundir.write_manifest(out, manifest)
    m_items = model_items(df)
    if suite.context_ablation == "shuffle":
        shuffle_contexts(m_items, suite.ablation_seed)
        log.info("context ablation: every item's prompt is another item's (seed %d)", suite.ablation_seed)
    phashes = [prompt_hash(it.get("prompt")) for it in m_items]
    train_cache: list[dict] | None = None

    for spec in specs:
        kind = model_kind(spec)
        opts: dict[str, Any] = {"generation": suite.generation.to_dict(), "concurrency": concurrency,
                                "dataset_meta": dataset_meta, "dataset_dir": str(dataset_dir)}
        if kind == "baseline":
            opts.update(suite.baseline_options.get(spec.split(":", 1)[1], {}))
        entry = manifest["models"].get(spec, {})
        rpath = rundir.predictions_path(out, spec)
        done = read_results(rpath, repair=True)
        todo_idx = [i for i, id_ in enumerate(ids)
                    if id_ not in done or (retry_failed and done[id_].get("failed"))]
        if not todo_idx and entry.get("status") == "done":
            entry["user"] = bool(entry.get("user")) or spec in models
            rundir.write_manifest(out, manifest)
            if not quiet:
                log.info("%s: all %d items already done (%s)", spec, len(ids), rpath)
            continue
        provider = get_provider(spec, **opts)
        try:
            used_mode = mode
            note = None
            if mode == "loglik" and not provider.supports_loglik:
                used_mode = "generate"
                note = f"{spec} cannot give log-probabilities; fell back to generate"
                log.info("note: %s", note)
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
            rundir.write_manifest(out, manifest)
            provider.prepare(used_mode)
            t0 = time.monotonic()
            n_new = _predict_into(provider, [m_items[i] for i in todo_idx], [phashes[i] for i in todo_idx],
                                  used_mode, rpath, suite.generation, spec, quiet)
            extra_note = getattr(provider, "mode_note", None)
            if extra_note:
                entry["note"] = "; ".join(x for x in (entry.get("note"), extra_note) if x)
            done = read_results(rpath)
            missing = [i for i in ids if i not in done]
            wall = time.monotonic() - t0
            entry.update({"status": "done" if not missing else "incomplete", "n_done": len(ids) - len(missing),
                          "wall_s_last": round(wall, 3), "n_new_last": n_new,
                          # every run of this directory added up: seconds per item = wall_s / n_timed
                          "wall_s": round(float(entry.get("wall_s") or 0.0) + wall, 3),
                          "n_timed": int(entry.get("n_timed") or 0) + n_new,
                          "describe": provider.describe()})
            rundir.write_manifest(out, manifest)
        finally:
            provider.close()

    return evaluate_run(out)


def _train_items(dataset_dir: Path) -> list[dict]:
    cols = ["id", "row", "label", "open_time"]
    df = load_items(dataset_dir, "train", columns=cols)
    df["id"] = df["id"].astype(str)
    return df.to_dict("records")


def _predict_into(provider: Provider, items: list[dict], phashes: list[str], mode: str, rpath: Path,
                  gen: GenerationSpec, spec: str, quiet: bool) -> int:
    """Ask ``provider`` about ``items`` chunk by chunk; append each result as it finishes.

    A chunk that raises is retried by ``atm.eval.providers.retrying`` (the one retry loop) with
    ``gen``'s budget, except for a provider that already retried each request on that budget
    (``retries_requests``: once is enough); then each of its items still unanswered is recorded as
    a failure (kept, counted invalid), never dropped.
    """
    from atm.utils import progress

    if not items:
        return 0
    by_id = {it["id"]: h for it, h in zip(items, phashes)}
    writer = ResultWriter(rpath)
    written = 0
    chunk = max(1, int(getattr(provider, "batch_size", 64)))
    budget = gen.model_copy(update={"retries": 0}) if getattr(provider, "retries_requests", False) else gen
    bar = progress(total=len(items), desc=spec, unit="item") if not quiet else None
    try:
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            pending = {it["id"] for it in part}

            def ask(attempt: int) -> None:
                nonlocal written
                todo = [it for it in part if it["id"] in pending]
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

            try:
                retrying(ask, budget, retry_on=(Exception,))
            except Exception as exc:  # noqa: BLE001 - recorded, never dropped
                for id_ in sorted(pending):
                    writer.write(record_of(failure(id_, f"{type(exc).__name__}: {exc}"[:300], budget.retries + 1),
                                           by_id[id_]))
                    written += 1
                    if bar is not None:
                        bar.update(1)
                pending.clear()
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return written
