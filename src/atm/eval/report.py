"""``report.md`` and a self-contained ``report.html`` (figures inlined as base64 PNG) for eval runs.

The report is built from the run directories alone (manifest, truth, per-item predictions), so
``atm-eval report RUN`` works on a finished run, a killed one (marked INCOMPLETE) or several runs
on the same items. Sections that depend on parts not yet present (the backtest, classic models)
say what is missing instead of disappearing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from atm.errors import AtmError
from atm.eval import rundir
from atm.eval.scoring import evaluate_run
from atm.utils import write_text_atomic

HOW_TO_READ = [
    "Balanced accuracy (the mean of per-class recalls) is the headline metric: raw accuracy rewards "
    "always answering the most common class (in the original experiment always-NOOP scored 86.9% raw "
    "accuracy while the model scored 9.12%).",
    "Invalid answers (unparseable or off-schema JSON, requests that failed after their retries) count as "
    "WRONG everywhere: they sit in the INVALID column of the confusion matrix and are never dropped.",
    "Intervals are {level}% circular moving-block bootstrap percentiles ({n_boot} replicates, blocks of "
    "{block} minutes = max(label look-ahead {horizon}, sqrt(n)); the look-ahead is how many minutes past t "
    "the label rule actually reads, which can differ from the label config's `horizon` field shown above): "
    "neighbouring minutes share their future window, so an i.i.d. bootstrap would be too narrow.",
    "A model is called better than a reference only when the paired block-bootstrap interval of the "
    "difference (same resampled minutes for both) lies entirely above 0, for every reference. McNemar's "
    "p-value is shown too but assumes independent minutes; it is not used for the verdict.",
    "Several comparisons are made; with many references one will look better by chance now and then. "
    "Treat a difference whose interval barely excludes 0 as a lead to re-test on another period, not a result.",
]


class Doc:
    """Blocks rendered to both markdown and HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, head: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> None:
        self.blocks.append(("table", (list(head), [list(map(str, r)) for r in rows], align)))

    def img(self, png: bytes, alt: str, filename: str) -> None:
        self.blocks.append(("img", (png, alt, filename)))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self, assets: Path | None) -> str:
        out: list[str] = []
        for kind, val in self.blocks:
            if kind == "h":
                out.append("#" * val[0] + " " + val[1])
            elif kind == "p":
                out.append(val)
            elif kind == "ul":
                out.append("\n".join(f"- {x}" for x in val))
            elif kind == "table":
                head, rows, align = val
                al = align or ("l" + "r" * (len(head) - 1))
                out.append("| " + " | ".join(head) + " |")
                out[-1] += "\n|" + "|".join("---:" if a == "r" else "---" for a in al) + "|"
                out[-1] += "".join("\n| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)
            elif kind == "img":
                png, alt, fname = val
                if assets is not None:
                    assets.mkdir(parents=True, exist_ok=True)
                    (assets / fname).write_bytes(png)
                    out.append(f"![{alt}]({assets.name}/{fname})")
            elif kind == "pre":
                out.append("```\n" + val + "\n```")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body: list[str] = []
        for kind, val in self.blocks:
            if kind == "h":
                body.append(f"<h{val[0]}>{html.escape(val[1])}</h{val[0]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(val)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in val) + "</ul>")
            elif kind == "table":
                head, rows, align = val
                al = align or ("l" + "r" * (len(head) - 1))
                th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
                trs = "".join("<tr>" + "".join(
                    f"<td class='{'r' if al[i] == 'r' else 'l'}'>{_inline(c)}</td>" for i, c in enumerate(r)) + "</tr>"
                    for r in rows)
                body.append(f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "img":
                png, alt, _ = val
                b64 = base64.b64encode(png).decode()
                body.append(f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'>")
            elif kind == "pre":
                body.append(f"<pre>{html.escape(val)}</pre>")
        css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
               "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;"
               "padding:3px 8px}th{background:#f3f3f3}td.r{text-align:right;font-variant-numeric:tabular-nums}"
               "img{max-width:100%}code{background:#f3f3f3;padding:0 3px}.verdict{font-weight:bold}"
               "pre{background:#f6f6f6;padding:0.6em;overflow-x:auto}")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{css}</style></head><body>{''.join(body)}</body></html>\n")


def _inline(text: str) -> str:
    """Escape, then render `code` and **bold** (the only inline markdown used here)."""
    import re

    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
    return s


def _f(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _s_per_item(r: dict[str, Any]) -> str:
    """Wall seconds per item (the per-request latency for runs that did not record the wall time)."""
    spi = (r.get("speed") or {}).get("s_per_item")
    if spi is None and r.get("latency"):
        spi = r["latency"]["mean_s"]
    return "n/a" if spi is None else f"{spi:.4f}"


def _tok(x: Any) -> str:
    return "n/a" if x is None else f"{x:,.1f}"


def _cost(d: "Doc", models: dict[str, Any]) -> None:
    """Token cost per item: what decides how many minutes a model can be asked about."""
    rows = []
    for spec, r in models.items():
        t = r.get("tokens") or {}
        if r.get("kind") != "llm" or not t.get("n"):
            continue
        sp = r.get("speed") or {}
        reused = t.get("reused")
        rows.append([f"`{spec}`", r.get("mode") or "", _tok(t.get("prompt")),
                     "n/a" if reused is None else f"{100 * reused:.1f}%", _tok(t.get("prompt_eval")),
                     _tok(t.get("completion")), _tok(t.get("scored")), _tok(t.get("per_item")),
                     _tok(t.get("evaluated")), _s_per_item(r),
                     "n/a" if sp.get("items_per_s") is None else f"{sp['items_per_s']:.3f}"])
    if not rows:
        return
    d.h(3, "Token cost per item")
    d.table(["model", "mode", "prompt", "from prefix cache", "prompt evaluated", "generated", "scored",
             "tokens/item", "evaluated/item", "s/item", "items/s"], rows, align="llrrrrrrrrr")
    d.p("Means per item, as the engine counted them. prompt = tokens of the item's prompt; from prefix cache = "
        "the share of them the engine reused from the previous item (the system prompt, instruction and k-shot "
        "examples every item starts with); generated = tokens decoded; scored = answer tokens scored "
        "teacher-forced (loglik: the advice options); tokens/item = prompt + generated + scored (an engine "
        "without prefix reuse); evaluated/item = what was evaluated here. s/item = wall time of the model's "
        "prediction loop per item. Set `generation.prefix_cache=false` to measure the cost without reuse.")


def _ci(ci: Sequence[Any] | None) -> str:
    if not ci or ci[0] is None:
        return ""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]"


# ---------------------------------------------------------------------------------- figures
def _plt():
    from atm.errors import require

    mpl = require("matplotlib", "eval")
    mpl.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    return buf.getvalue()


def fig_confusions(models: dict[str, Any]) -> bytes:
    import numpy as np

    plt = _plt()
    specs = [s for s, r in models.items() if r.get("confusion")]
    n = len(specs)
    cols = min(3, n)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, spec in zip(axes.flat, specs):
        cm = models[spec]["confusion"]
        m = np.array(cm["matrix"], dtype=float)
        norm = m / np.clip(m.sum(axis=1, keepdims=True), 1, None)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(cm["cols"])), cm["cols"], fontsize=7)  # full names: INVALID, not INVA
        ax.set_yticks(range(len(cm["rows"])), cm["rows"], fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(spec, fontsize=9)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.6 else "black")
    fig.tight_layout()
    return _png(fig)


def fig_calibration(models: dict[str, Any]) -> bytes | None:
    plt = _plt()
    specs = [s for s, r in models.items() if r.get("calibration", {}).get("n")]
    if not specs:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="perfect")
    for spec in specs:
        cal = models[spec]["calibration"]
        pts = [(b["confidence"], b["accuracy"]) for b in cal["bins"] if b["n"]]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{spec} (ECE {cal['ece']:.3f})")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def fig_equity(results: dict[str, Any]) -> bytes:
    import pandas as pd

    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    for name, r in results.items():
        style = {"color": "black", "linestyle": "--", "linewidth": 1.0} if name == "buy-and-hold" else {"linewidth": 1.1}
        eq = r.equity
        if len(eq):
            eq = pd.concat([pd.Series([1.0], index=[eq.index[0]]), eq])
        tr = r.metrics.get("total_return")
        ax.plot(eq.index, eq.to_numpy(), label=f"{name} ({'n/a' if tr is None else f'{100 * tr:+.2f}%'})", **style)
    ax.axhline(1.0, color="grey", linewidth=0.6)
    ax.set_ylabel("equity (start = 1), net of costs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.autofmt_xdate()
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------- backtest
def run_backtest(run_dir: Path, metrics: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """Backtest every model of a run with ``atm.eval.backtest`` (the comparator issue's module)."""
    try:
        from atm.eval import backtest as bt
    except ImportError as exc:
        return None, f"the backtest is not available in this install (atm.eval.backtest: {exc})"
    import pandas as pd

    manifest = rundir.read_manifest(run_dir)
    kpath = Path(manifest["data"]["path"]) / "klines.parquet"
    if not kpath.exists():
        return None, f"klines not found at {kpath}; backtest skipped"
    truth = rundir.read_truth(run_dir)
    preds = {spec: rows for spec, rows in rundir.advice_by_model(run_dir, manifest).items() if rows}
    if not preds:
        return None, "no predictions to backtest"
    cfg_fields = rundir.backtest_fields(manifest)
    try:
        cfg = bt.BacktestConfig(**cfg_fields)
        res = bt.backtest_many(preds, pd.read_parquet(kpath), cfg, items=truth[["id", "open_time"]])
    except Exception as exc:  # noqa: BLE001 - the report must still be written
        return None, f"backtest failed: {type(exc).__name__}: {exc}"
    return res, None


# ---------------------------------------------------------------------------------- report
def build_doc(metrics: dict[str, Any], run_dir: Path, bt: dict[str, Any] | None, bt_note: str | None) -> Doc:
    """The report of one run, section by section."""
    d = Doc()
    for section in (_header, _verdicts, _missing, _results, _comparisons, _per_class, _figures, _backtest, _models):
        section(d, metrics, run_dir, bt, bt_note)
    return d


def _header(d: Doc, metrics: dict[str, Any], run_dir: Path, bt: dict[str, Any] | None,
            bt_note: str | None) -> None:
    """Title, data, class balance."""
    models = metrics["models"]
    data = metrics["data"]
    suite = metrics["suite"]
    d.h(1, f"ATM evaluation: {suite.get('name', '?')} ({data.get('split')} split)")
    lc = metrics.get("label_config") or {}
    lc_s = ", ".join(f"{k}={v}" for k, v in lc.items()) or "unknown"
    d.p(f"Dataset `{data.get('path')}`, split `{data.get('split')}`, {data.get('n_items'):,} items "
        f"({data.get('first_open_time')} to {data.get('last_open_time')}); label rule: {lc_s}. "
        f"Items file sha256 `{str(data.get('items_sha256'))[:16]}`. Run directory `{run_dir}`.")
    support = next((r["per_class"] for r in models.values() if r.get("per_class")), None)
    if support:
        counts = {c: v["support"] for c, v in support.items()}
        tot = sum(counts.values()) or 1
        d.p("True classes in these items: " + ", ".join(f"{c} {n:,} ({100 * n / tot:.1f}%)" for c, n in counts.items())
            + f". Always answering the most common class scores {100 * max(counts.values()) / tot:.1f}% raw accuracy.")
        rare = [c for c, n in counts.items() if n < 10]
        if rare:
            d.p(f"**Warning: {', '.join(rare)} occur{'s' if len(rare) == 1 else ''} fewer than 10 times here; "
                "balanced accuracy and per-class figures rest on very few minutes (a class absent from the items "
                "is left out of balanced accuracy). Evaluate more minutes before concluding anything.**")


def _verdicts(d: Doc, metrics: dict[str, Any], run_dir: Path, bt: dict[str, Any] | None,
              bt_note: str | None) -> None:
    """The verdicts and how to read them."""
    d.h(2, "Verdict")
    verdicts = metrics.get("verdicts") or []
    d.ul([f"**{v}**" for v in verdicts] or ["no model with references to compare against"])
    d.h(2, "How to read this report")
    d.ul([s.format(level=int(100 * metrics["level"]), n_boot=metrics["n_boot"], block=metrics["block"],
                   horizon=metrics["horizon"]) for s in HOW_TO_READ])


def _missing(d: Doc, metrics: dict[str, Any], run_dir: Path, bt: dict[str, Any] | None,
             bt_note: str | None) -> None:
    """What the run lacks or has only in part."""
    models = metrics["models"]
    missing: list[str] = []
    if not any(r["kind"] == "classic" for r in models.values()):
        try:
            import atm.eval.classic  # noqa: F401

            missing.append("No classic model in this run: add e.g. `--model classic:lgbm` to see one beside the LLM.")
        except ImportError:
            missing.append("Classic models (`classic:lgbm` ...) are not available in this install yet.")
    if bt_note:
        missing.append(f"Backtest: {bt_note}.")
    incomplete = [s for s, r in models.items() if not r.get("complete")]
    if incomplete:
        missing.append("INCOMPLETE models (run again to finish; figures cover answered items only): "
                       + ", ".join(f"{s} ({models[s]['n']}/{models[s]['n_expected']})" for s in incomplete))
    if missing:
        d.h(2, "Missing or partial")
        d.ul(missing)


def _results(d: Doc, metrics: dict[str, Any], run_dir: Path, bt: dict[str, Any] | None,
             bt_note: str | None) -> None:
    """The results table."""
    models = metrics["models"]
    d.h(2, "Results")
    head = ["model", "mode", "n", "valid", "balanced acc [95% CI]", "accuracy [CI]", "macro-F1 [CI]",
            "score bps [CI]", "Brier", "ECE", "s/item"]
    rows = []
    for spec, r in models.items():
        ci = r.get("ci", {})
        sc = r.get("score", {})
        cal = r.get("calibration", {})
        mode = (r.get("mode") or "") if r["kind"] == "llm" else "-"
        rows.append([f"`{spec}`", mode, f"{r['n']:,}", _f(r["validity"]["rate"], pct=True),
                     _f(r.get("balanced_accuracy")) + _ci(ci.get("balanced_accuracy")),
                     _f(r.get("accuracy")) + _ci(ci.get("accuracy")),
                     _f(r.get("macro_f1")) + _ci(ci.get("macro_f1")),
                     (f"{sc['mean_bps']:+.2f}" + (f" [{sc['ci'][0]:+.2f}, {sc['ci'][1]:+.2f}]" if sc.get("ci") and sc["ci"][0] is not None else ""))
                     if "mean_bps" in sc else "n/a",
                     _f(cal.get("brier")), _f(cal.get("ece")),
                     _s_per_item(r)])
    d.table(head, rows, align="llrrrrrrrrr")
    d.p("score = mean of `atm.prompting.advice.score_advice` per item (the DAPO reward): realized return of "
        "the advice net of fees in basis points, clipped to +-100; invalid answers score -100. "
        "Brier/ECE only where the model gives class probabilities (loglik mode, baselines, classic models).")
    notes = [f"`{s}`: {r['note']}" for s, r in models.items() if r.get("note")]
    if notes:
        d.ul(notes)
    _scale_out(d, metrics)
    _cost(d, models)


def _comparisons(d: Doc, metrics: dict[str, Any], run_dir: Path, bt: dict[str, Any] | None,
                 bt_note: str | None) -> None:
    """Paired comparisons with the references."""
    models = metrics["models"]
    d.h(2, "Paired comparisons")
    for spec, r in models.items():
        comps = r.get("comparisons") or {}
        if not comps or not (r.get("user") or r["kind"] != "baseline"):
            continue
        d.h(3, f"{spec} vs references ({metrics['primary'].replace('_', ' ')})")
        crow = []
        for ref, c in comps.items():
            mc = c["mcnemar"]
            crow.append([f"`{ref}`", _f(c["a"]), _f(c["b"]), f"{c['diff']:+.3f}" + _ci(c["ci"]),
                         _f(c.get("p_not_better")), f"{mc['a_only']}/{mc['b_only']}", f"{mc['p_value']:.3g}"])
        d.table(["reference", "model", "reference", "difference [CI]", "P(not better)", "McNemar a-only/b-only",
                 "McNemar p"], crow)


def _per_class(d: Doc, metrics: dict[str, Any], run_dir: Path, bt: dict[str, Any] | None,
               bt_note: str | None) -> None:
    """Per-class figures and confusion matrices."""
    models = metrics["models"]
    d.h(2, "Per class")
    for spec, r in models.items():
        if not r.get("per_class"):
            continue
        pc = r["per_class"]
        d.h(3, spec)
        d.table(["class", "support", "predicted", "precision", "recall", "F1"],
                [[c, v["support"], v["predicted"], _f(v["precision"]), _f(v["recall"]), _f(v["f1"])]
                 for c, v in pc.items()])
        cm = r["confusion"]
        d.table(["true \\ predicted", *cm["cols"]], [[cm["rows"][i], *row] for i, row in enumerate(cm["matrix"])])
        val = r["validity"]
        if val["reasons"]:
            d.p("Invalid answers by reason: " + ", ".join(f"{k}: {v}" for k, v in val["reasons"].items()) + ".")
        ch = r.get("change") or {}
        if ch.get("n"):
            d.p(f"Predicted change: MAE {ch['mae']:.6g} over {ch['n']:,} items ({100 * ch['coverage']:.1f}% coverage), "
                f"direction accuracy {_f(ch.get('direction_accuracy'))}.")
        elif ch.get("note"):
            d.p(f"Predicted change: {ch['note']}.")
        else:
            d.p("Predicted change: none given by this model (class-only answers or loglik mode); MAE not computed.")


def _figures(d: Doc, metrics: dict[str, Any], run_dir: Path, bt: dict[str, Any] | None,
             bt_note: str | None) -> None:
    """Confusion and calibration figures."""
    models = metrics["models"]
    try:
        d.h(2, "Confusion matrices")
        d.img(fig_confusions(models), "confusion matrices (rows: true class, normalized per row)", "confusion.png")
        cal_png = fig_calibration(models)
        d.h(2, "Calibration")
        if cal_png:
            d.img(cal_png, "reliability diagram", "calibration.png")
        else:
            d.p("No model in this run gives class probabilities (run with `--mode loglik`).")
    except Exception as exc:  # noqa: BLE001 - missing matplotlib must not lose the report
        d.p(f"Figures not drawn: {exc}")


def _backtest(d: Doc, metrics: dict[str, Any], run_dir: Path, bt: dict[str, Any] | None,
              bt_note: str | None) -> None:
    """The backtest table and equity curves."""
    d.h(2, "Backtest")
    if bt:
        from atm.eval.backtest import summary

        d.p("From each model's advice with `atm.eval.backtest` (invalid answers place no trade), over the same minutes:")
        table = summary(bt)
        d.table(table["head"], table["rows"])
        if table["note"]:
            d.p(table["note"])
        try:
            d.img(fig_equity(bt), "equity curves", "equity.png")
        except Exception as exc:  # noqa: BLE001
            d.p(f"Equity figure not drawn: {exc}")
    else:
        d.p(f"Not shown: {bt_note}.")


def _models(d: Doc, metrics: dict[str, Any], run_dir: Path, bt: dict[str, Any] | None,
            bt_note: str | None) -> None:
    """What each model was (the manifest's describe)."""
    d.h(2, "Models")
    d.pre(json.dumps({s: r.get("describe", {}) for s, r in _describes(run_dir).items()}, indent=1, default=str)[:20000])



def _scale_out(d: Doc, metrics: dict[str, Any]) -> None:
    """Which shards a merged run joins, and which endpoint of a fan-out answered how many items."""
    shards = (metrics.get("data") or {}).get("merged_from")
    if shards:
        d.p(f"Merged from {len(shards)} shards (`atm-eval run --shard K/N`): " + "; ".join(
            f"{s['shard']} {s['n_items']:,} items (`{s['dir']}`)" for s in shards) + ".")
    rows = [[f"`{spec}`", f"`{ep}`", f"{c['items']:,}", f"{c['failed']:,}"]
            for spec, r in metrics["models"].items() for ep, c in (r.get("endpoints") or {}).items()]
    if rows:
        d.h(3, "Endpoints")
        d.table(["model", "endpoint", "items answered", "of them failed"], rows, align="llrr")
        d.p("Each item's record names the endpoint that answered it (`endpoint`); `none` counts items that "
            "failed on every endpoint.")


def _describes(run_dir: Path) -> dict[str, Any]:
    return rundir.read_manifest(run_dir).get("models", {})


def write_report(runs: Sequence[str | Path], out_dir: str | Path | None = None,
                 metrics: Sequence[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Write report.md + report.html for one or more run dirs (each its own section)."""
    if not runs:
        raise AtmError("give at least one run directory")
    run_dirs = [Path(r) for r in runs]
    for r in run_dirs:
        rundir.read_manifest(r)  # an AtmError naming the directory when it is not an eval run
    out = Path(out_dir) if out_dir else run_dirs[0]
    mets = list(metrics) if metrics else [evaluate_run(r) for r in run_dirs]
    docs = []
    for r, m in zip(run_dirs, mets):
        bt, note = run_backtest(r, m)
        docs.append(build_doc(m, r, bt, note))
    merged = Doc()
    for doc in docs:
        merged.blocks.extend(doc.blocks)
    md_path, html_path = out / "report.md", out / "report.html"
    write_text_atomic(md_path, merged.markdown(out / "report_files"))
    write_text_atomic(html_path, merged.html("ATM evaluation report"))
    verdicts = [v for m in mets for v in (m.get("verdicts") or [])]
    return {"md": md_path, "html": html_path, "verdicts": verdicts}  # type: ignore[dict-item]
