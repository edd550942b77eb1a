"""Build a prompt dataset: klines -> labelled minutes -> prompts -> preference / SFT / RL / items.

``build_dataset(BuildConfig(...))`` writes ``datasets/build/NAME/`` (docs/architecture.md)::

    preference/data/{train,verify}-00000-of-00001.parquet   prompt, chosen, rejected, margin, id
    sft/data/...                                            messages, id
    rl/data/...                                             prompt, ret_BUY, ret_NOOP, ret_SELL, id
    items/data/...                                          one row per minute (eval harness)
    klines.parquet  dataset.json  README.md

so ``datasets.load_dataset("parquet", data_dir=NAME / "preference")`` gives splits ``train`` and
``verify`` in TRL's conversational preference format, which TRL's trainers read unchanged.

Pairs:

* ``random`` (the original experiment's rule): chosen = the label's answer, rejected = one of the
  two other advices drawn at random (seeded).
* ``reward``: every advice is scored with the realized return of acting on it, net of fees, in
  the same clipped basis points as ``atm.prompting.advice.score_advice`` (the DAPO reward and the
  eval score); chosen = best, rejected = worst (or every worse one with ``all_worse``). The score
  difference is stored as ``margin``; pairs whose margin is 0 or below ``min_margin`` are dropped
  and counted in ``dataset.json``.

Speed and memory: labels, returns and splits are computed once with numpy; the text (the bulk)
is built and written chunk by chunk (``chunk_rows`` minutes at a time) through pyarrow
``ParquetWriter``s, so memory stays bounded whatever the number of minutes. The whole build
happens in a temporary folder next to ``out`` that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from atm.artifacts import DATASET_CARD, VIEWS, DatasetDir
from atm.config import AtmConfig
from atm.constants import ADVICES
from atm.errors import AtmError, ConfigError, DataError

log = logging.getLogger(__name__)


class BuildConfig(AtmConfig):
    """``atm prompts build``: which klines, encoder, template, label and pairs make a dataset."""

    klines: str = Field(description="klines parquet built by `atm data build`")
    out: str = Field(description="output folder, e.g. datasets/build/NAME")
    name: str | None = Field(default=None, description="dataset name (default: the out folder's name)")
    symbol: str | None = Field(default=None, description="symbol recorded in items (default: from the parquet's metadata)")
    encoder: str | None = Field(default=None, description="context encoder: seed-json, seed-json-compat, compact, natural, digits "
                                "(default: the template's, else seed-json)")
    encoder_config: dict[str, Any] = Field(default_factory=dict, description="encoder settings (window, columns, precision, ...)")
    template: str = Field(default="prompts/seed.yaml", description="prompt template YAML (path, or a name in prompts/)")
    fewshot_k: int | None = Field(default=None, ge=0, le=12, description="override the template's fewshot.k")
    fewshot_seed: int | None = Field(default=None, description="override the template's fewshot.seed")
    label: Literal["seed", "entry", "fee-aware"] = Field(default="seed", description="label rule (atm.market.labels)")
    horizon: int = Field(default=10, ge=1, description="label horizon / seed lookback, and the realized-return horizon (minutes)")
    threshold: float = Field(default=0.002, ge=0, description="label threshold (seed: 0.002 = the original's 0.2%)")
    fee: float = Field(default=0.001, ge=0, description="fee per side (fraction) for realized returns and fee-aware labels")
    slippage_bps: float = Field(default=0.0, ge=0, description="slippage per side in basis points for realized returns")
    pairs: Literal["random", "reward"] = Field(default="random", description="random: chosen = label, rejected = random other; "
                                               "reward: chosen = best realized advice, rejected = worst")
    all_worse: bool = Field(default=False, description="reward pairs: one pair per strictly worse advice, not just the worst")
    min_margin: float = Field(default=0.0, ge=0, description="reward pairs: drop pairs whose margin (bps) is below this")
    split: dict[str, Any] = Field(default_factory=dict, description="atm.market.splits.SplitConfig settings "
                                  "(default: last 20% = verify, embargo 180 minutes)")
    seed: int = Field(default=0, description="random seed (rejected advices of random pairs)")
    views: list[Literal["preference", "sft", "rl", "items"]] = Field(
        default_factory=lambda: list(VIEWS), description="views to write (default all four)")
    compression: Literal["zstd", "snappy", "none"] = Field(default="zstd", description="parquet compression")
    chunk_rows: int = Field(default=50_000, ge=100, description="minutes encoded and written per chunk (bounds memory)")
    token_families: list[str] = Field(default_factory=lambda: list(_families()),
                                      description="model families whose real tokenizer and chat template count the "
                                      "prompts of the card's token table ([] = none); built by `atm doctor --build`")
    tokenizer: str | None = Field(default=None, description="also count with this HF tokenizer / model dir "
                                  "(an error if it cannot be loaded)")
    token_sample: int = Field(default=100, ge=0, description="items per split whose tokens are counted: evenly "
                              "spaced, first and last included (0 = no counting)")
    overwrite: bool = Field(default=False, description="replace an existing output folder")

    @field_validator("token_families")
    @classmethod
    def _fams(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if f.strip().lower() not in _families()]
        if bad:
            raise ValueError(f"unknown model families {bad}; known: {', '.join(_families())}")
        return [f.strip().lower() for f in v]

    @field_validator("encoder")
    @classmethod
    def _enc(cls, v: str | None) -> str | None:
        from atm.prompting.encoders import ENCODERS

        if v is not None and v not in ENCODERS:
            raise ValueError(f"unknown encoder {v!r}; available: {', '.join(sorted(ENCODERS))}")
        return v


def _families() -> tuple[str, ...]:
    from atm.prompting.tokens import FAMILIES

    return FAMILIES


# ----------------------------------------------------------------------------------- arrow
def _msg_type():
    import pyarrow as pa

    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def messages_array(prefix: list[dict[str, str]], per_row: list, roles_after: list[str]):
    """A ``list<struct<role, content>>`` array: ``prefix`` + one message per ``per_row`` column.

    Built column-wise in Arrow (no per-row dicts or Python strings): ``per_row[j]`` (a pyarrow
    string array or a list of str) holds the content of every row's j-th message after the shared
    prefix, with role ``roles_after[j]``. The prefix strings are gathered with one ``take``.
    """
    import pyarrow as pa

    cols = [c if isinstance(c, (pa.Array, pa.ChunkedArray)) else pa.array(c, pa.string()) for c in per_row]
    cols = [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in cols]
    n = len(cols[0]) if cols else 0
    P, width = len(prefix), len(prefix) + len(cols)
    pool = pa.concat_arrays([pa.array([m["content"] for m in prefix], pa.string()), *[c.cast(pa.string()) for c in cols]])
    idx = np.empty((n, width), dtype=np.int64)
    idx[:, :P] = np.arange(P)
    for j in range(len(cols)):
        idx[:, P + j] = P + j * n + np.arange(n)
    contents = pool.take(pa.array(idx.reshape(-1)))
    roles = [m["role"] for m in prefix] + list(roles_after)
    role_arr = pa.DictionaryArray.from_arrays(
        pa.array(np.tile(np.arange(width, dtype=np.int32), n)), pa.array(roles)).cast(pa.string())
    struct = pa.StructArray.from_arrays([role_arr, contents], names=["role", "content"])
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, struct)


def _schemas():
    import pyarrow as pa

    m = _msg_type()
    ts = pa.timestamp("ns", tz="UTC")
    return {
        "preference": pa.schema([("id", pa.string()), ("prompt", m), ("chosen", m), ("rejected", m),
                                 ("margin", pa.float64()), ("chosen_advice", pa.string()),
                                 ("rejected_advice", pa.string())]),
        "sft": pa.schema([("id", pa.string()), ("messages", m)]),
        "rl": pa.schema([("id", pa.string()), ("prompt", m), ("ret_BUY", pa.float64()),
                         ("ret_NOOP", pa.float64()), ("ret_SELL", pa.float64())]),
        "items": pa.schema([("id", pa.string()), ("row", pa.int64()), ("open_time", ts),
                            ("symbol", pa.string()), ("label", pa.string()), ("answer", pa.string()),
                            ("change", pa.string()), ("ret_BUY", pa.float64()),
                            ("ret_NOOP", pa.float64()), ("ret_SELL", pa.float64()),
                            ("prompt", m), ("context", pa.string())]),
    }


def view_file(root: Path, view: str, split: str) -> Path:
    return DatasetDir(root).view_path(view, split)


# ----------------------------------------------------------------------------------- pieces
def score_matrix(ret: np.ndarray) -> np.ndarray:
    """Scores (n, 3) of BUY/NOOP/SELL: ``score_advice``'s rule for a valid answer, vectorized."""
    from atm.prompting.advice import CLIP_BPS

    return np.clip(ret * 1e4, -CLIP_BPS, CLIP_BPS)


def choose_pairs(cfg: BuildConfig, label_idx: np.ndarray, ret: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """(minute index, chosen idx, rejected idx, margin) of every pair, plus drop counts."""
    n = len(label_idx)
    scores = score_matrix(ret)
    counts: dict[str, int] = {}
    if cfg.pairs == "random":
        rng = np.random.default_rng(cfg.seed)
        chosen = label_idx.astype(np.int64)
        rejected = (chosen + 1 + rng.integers(0, 2, n)) % 3
        minute = np.arange(n, dtype=np.int64)
    else:
        # best: NOOP wins ties (as the fee-aware label), then BUY, then SELL
        pref = np.array([1, 0, 2])
        best = pref[np.argmax(scores[:, pref], axis=1)]
        if cfg.all_worse:
            mins, rej = [], []
            for k in range(3):
                mins.append(np.arange(n, dtype=np.int64))
                rej.append(np.full(n, k, dtype=np.int64))
            minute = np.concatenate(mins)
            rejected = np.concatenate(rej)
            chosen = best[minute]
            keep = scores[minute, rejected] < scores[minute, chosen]
            minute, chosen, rejected = minute[keep], chosen[keep], rejected[keep]
            order = np.lexsort((rejected, minute))
            minute, chosen, rejected = minute[order], chosen[order], rejected[order]
        else:
            worst = np.argmin(scores, axis=1)
            minute = np.arange(n, dtype=np.int64)
            chosen, rejected = best, worst
            tie = scores[minute, chosen] <= scores[minute, rejected]
            counts["pairs_dropped_no_margin"] = int(tie.sum())
            minute, chosen, rejected = minute[~tie], chosen[~tie], rejected[~tie]
    margin = scores[minute, chosen] - scores[minute, rejected]
    if cfg.pairs == "reward" and cfg.min_margin > 0:
        low = margin < cfg.min_margin
        counts["pairs_dropped_below_min_margin"] = int(low.sum())
        minute, chosen, rejected, margin = minute[~low], chosen[~low], rejected[~low], margin[~low]
    return minute, chosen, rejected, margin, counts


def _symbol(cfg: BuildConfig, path: Path) -> tuple[str, dict[str, Any]]:
    import pyarrow.parquet as pq

    meta: dict[str, Any] = {}
    try:
        md = pq.read_schema(path).metadata or {}
        if b"atm.klines" in md:
            meta = json.loads(md[b"atm.klines"])
    except Exception:  # noqa: BLE001 - metadata is optional; the read below reports real errors
        meta = {}
    sidecar = path.with_name(path.name + ".meta.json")
    if sidecar.exists():
        try:
            meta = {**meta, **json.loads(sidecar.read_text())}
        except json.JSONDecodeError as exc:
            raise DataError(f"sidecar is not valid JSON: {exc}", str(sidecar)) from None
    symbol = cfg.symbol or meta.get("symbol") or path.stem.split("-")[0].split(".")[0].upper()
    return str(symbol), meta


def _stats(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {}
    q = np.percentile(x, [50, 95])
    return {"min": int(x.min()), "mean": round(float(x.mean()), 1), "p50": float(q[0]),
            "p95": float(q[1]), "max": int(x.max())}


def _iso(t) -> str | None:
    import pandas as pd

    return None if t is None else pd.Timestamp(t).isoformat()


# ----------------------------------------------------------------------------------- build
# build_dataset runs these stages in order: settings (_settings), per-minute arrays (_minutes),
# usable minutes and why the others are dropped (_usable), splits with their embargo (_splits),
# what each minute is taught and the k-shot examples (_teaching), pairs (choose_pairs), then the
# views written chunk by chunk (_write_views), the card (_card) and the atomic swap (_publish).


@dataclass
class _Settings:
    template: Any  # atm.prompting.template.Template (k-shot examples filled in by _teaching)
    encoder: Any
    label_cfg: Any  # atm.market.labels.LabelConfig
    split_cfg: Any  # atm.market.splits.SplitConfig
    n_shots: int
    fewshot_seed: int


@dataclass
class _Minutes:
    """One value per kline row."""

    labels: np.ndarray  # "BUY" | "NOOP" | "SELL" | None
    ret: np.ndarray  # (n, 3) realized return of acting on each advice
    features: Any  # the encoder's features (None when it needs none)
    change: np.ndarray  # the answer's predicted change (NaN past the data)


@dataclass
class _Selection:
    """Which minutes become items, in which split, taught what."""

    split_names: list[str]
    split_of: np.ndarray  # split index per kline row (-1: outside every split)
    parts: dict[str, np.ndarray]
    rows: np.ndarray  # kline rows that become items, in time order
    teach_idx: np.ndarray  # index of the advice taught per kline row
    label_idx: np.ndarray  # index of the label per kline row (-1: none)
    examples_rows: np.ndarray  # rows used as k-shot examples
    drops: dict[str, int] = field(default_factory=dict)


def _settings(cfg: BuildConfig) -> _Settings:
    from atm.market.labels import LabelConfig, label_horizon
    from atm.market.splits import SplitConfig
    from atm.prompting.encoders import get_encoder
    from atm.prompting.template import Template

    template = Template.load(cfg.template)
    fs = template.spec.fewshot
    enc_name = cfg.encoder or template.spec.encoder or "seed-json"
    enc_cfg = {**template.spec.encoder_config, **cfg.encoder_config} if template.spec.encoder in (None, enc_name) \
        else dict(cfg.encoder_config)
    encoder = get_encoder(enc_name, **enc_cfg)
    label_cfg = LabelConfig(rule=cfg.label, horizon=cfg.horizon, threshold=cfg.threshold, fee=cfg.fee)
    split_cfg = SplitConfig(**cfg.split)
    need = max(label_horizon(label_cfg), cfg.horizon) + encoder.lookback
    if split_cfg.embargo < need:
        raise ConfigError(f"split.embargo={split_cfg.embargo} minutes is shorter than the label/return horizon "
                          f"({max(label_horizon(label_cfg), cfg.horizon)}) plus the {enc_name} lookback "
                          f"({encoder.lookback}) = {need}: train answers would overlap verify contexts")
    return _Settings(template=template, encoder=encoder, label_cfg=label_cfg, split_cfg=split_cfg,
                     n_shots=fs.k if cfg.fewshot_k is None else cfg.fewshot_k,
                     fewshot_seed=fs.seed if cfg.fewshot_seed is None else cfg.fewshot_seed)


def _minutes(cfg: BuildConfig, df, st: _Settings) -> _Minutes:
    from atm.market.labels import compute_labels, realized_returns

    ret_df = realized_returns(df, cfg.horizon, fee=cfg.fee, slippage_bps=cfg.slippage_bps)
    return _Minutes(labels=compute_labels(df, st.label_cfg).to_numpy(dtype=object),
                    ret=ret_df[list(ADVICES)].to_numpy(dtype=np.float64),
                    features=st.encoder.compute_features(df) if st.encoder.needs_features else None,
                    change=st.encoder.target_changes(df, np.arange(len(df))))


def _usable(cfg: BuildConfig, df, st: _Settings, mins: _Minutes) -> tuple[np.ndarray, dict[str, int]]:
    """The minutes that can be items, and how many each reason dropped (first reason wins)."""
    import pandas as pd

    n = len(df)
    lookback = st.encoder.lookback
    drops: dict[str, int] = {}
    valid = np.ones(n, dtype=bool)

    def drop(mask: np.ndarray, reason: str) -> None:
        nonlocal valid
        newly = valid & mask
        if newly.any():
            drops[reason] = int(newly.sum())
        valid &= ~mask

    drop(np.arange(n) < lookback, f"no full {lookback}-minute lookback")
    drop(pd.isna(mins.labels), "no label (lookback/horizon past the data or a gap)")
    drop(np.isnan(mins.ret).any(axis=1), "no realized return (horizon past the data or a gap)")
    drop(np.isnan(mins.change), "no answer change (past the data)")
    if mins.features is not None:
        cols = st.encoder.columns(mins.features)
        drop(mins.features[cols].isna().to_numpy().any(axis=1), "features not available (warm-up or zero division)")
    if "filled" in df.columns:
        filled = df["filled"].to_numpy(dtype=bool)
        near = np.convolve(filled.astype(np.int64), np.ones(lookback + max(cfg.horizon, 1) + 1, dtype=np.int64),
                           mode="full")[lookback:lookback + n] > 0
        drop(near, "filled (synthetic) bars in the window or horizon")
    return valid, drops


def _splits(df, st: _Settings, valid: np.ndarray, drops: dict[str, int]
            ) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Chronological parts; minutes in the embargo between them stop being usable (counted)."""
    from atm.market.splits import chronological_split

    parts = chronological_split(df["open_time"], st.split_cfg)
    names = list(parts)
    split_of = np.full(len(df), -1, dtype=np.int8)
    for i, s in enumerate(names):
        split_of[parts[s]] = i
    in_embargo = valid & (split_of < 0)
    if in_embargo.any():
        drops["in the embargo between splits"] = int(in_embargo.sum())
    valid &= split_of >= 0
    return names, split_of, parts


def _teaching(cfg: BuildConfig, df, st: _Settings, mins: _Minutes, valid: np.ndarray, names: list[str],
              split_of: np.ndarray, drops: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label index, taught advice index, k-shot example rows) per kline row. The examples come from
    the train split only, are written into ``st.template`` and stop being training rows."""
    from atm.prompting.template import Example, choose_examples

    label_idx = np.full(len(df), -1, dtype=np.int64)
    for j, a in enumerate(ADVICES):
        label_idx[mins.labels == a] = j
    if cfg.pairs == "reward":  # the advice the model is taught: best realized (NOOP on ties)
        pref = np.array([1, 0, 2])
        teach_idx = pref[np.argmax(score_matrix(np.nan_to_num(mins.ret))[:, pref], axis=1)]
    else:
        teach_idx = label_idx
    examples_rows = np.empty(0, dtype=np.int64)
    template, enc = st.template, st.encoder
    if st.n_shots > 0 and not template.spec.examples:
        train_valid = np.flatnonzero(valid & (split_of == names.index("train")))
        teach_labels = np.array([ADVICES[i] if i >= 0 else None for i in teach_idx], dtype=object)
        examples_rows = choose_examples(teach_labels, train_valid, st.n_shots, st.fewshot_seed,
                                        template.spec.fewshot.balanced)
        ctx = enc.encode(df, examples_rows, mins.features)
        chg = enc.answer_changes(df, examples_rows)
        ot = df["open_time"].to_numpy()
        st.template = template.with_examples([
            Example(context=c, advice=ADVICES[teach_idx[r]], change=ch, row=int(r),
                    open_time=_iso(ot[r]), split="train")
            for r, c, ch in zip(examples_rows.tolist(), ctx, chg)])
        if len(examples_rows):
            drops["used as few-shot examples"] = len(examples_rows)
            valid[examples_rows] = False
    elif st.n_shots > 0 and len(template.spec.examples) != st.n_shots:
        raise ConfigError(f"{cfg.template}: the template has {len(template.spec.examples)} written-in examples "
                          f"but fewshot.k is {st.n_shots}")
    return label_idx, teach_idx, examples_rows


def _select(cfg: BuildConfig, df, st: _Settings, mins: _Minutes, src: Path) -> _Selection:
    valid, drops = _usable(cfg, df, st, mins)
    names, split_of, parts = _splits(df, st, valid, drops)
    label_idx, teach_idx, examples_rows = _teaching(cfg, df, st, mins, valid, names, split_of, drops)
    rows = np.flatnonzero(valid)
    if len(rows) == 0:
        raise DataError(f"no usable minutes ({len(df)} rows; dropped: {drops})", str(src))
    for i, split in enumerate(names):
        if not (split_of[rows] == i).any():
            raise DataError(f"split {split!r} has no usable minutes (dropped: {drops})", str(src))
    return _Selection(split_names=names, split_of=split_of, parts=parts, rows=rows, teach_idx=teach_idx,
                      label_idx=label_idx, examples_rows=examples_rows, drops=drops)


def build_dataset(cfg: BuildConfig) -> Path:
    """Build the dataset described by ``cfg``; returns the output folder (written atomically)."""
    from atm.market.klines import read_klines_parquet

    out = Path(cfg.out)
    name = cfg.name or out.name
    if out.exists() and not cfg.overwrite:
        raise AtmError(f"{out}: already exists (pass --overwrite / overwrite=true to replace it)")
    src = Path(cfg.klines)
    df = read_klines_parquet(src)
    symbol, src_meta = _symbol(cfg, src)
    st = _settings(cfg)
    mins = _minutes(cfg, df, st)
    sel = _select(cfg, df, st, mins, src)
    ret = mins.ret[sel.rows]
    pairs = choose_pairs(cfg, sel.label_idx[sel.rows], ret)

    # --- where to write: a temp folder beside out, renamed at the end
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        stats = _write_views(cfg, tmp, df, st, mins, sel, pairs, symbol, name)
        shutil.copyfile(src, tmp / "klines.parquet")
        info = _card(cfg, tmp, df, st, mins, sel, stats, pairs[4], symbol, name, src, src_meta)
        _publish(tmp, out, info)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_views(cfg: BuildConfig, tmp: Path, df, st: _Settings, mins: _Minutes, sel: _Selection, pairs,
                 symbol: str, name: str) -> dict[str, dict[str, Any]]:
    """Every view of every split, written chunk by chunk; returns per-split counts for the card."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from atm.utils import progress

    p_minute, p_chosen, p_rejected, p_margin, _ = pairs
    rows, split_names, split_of = sel.rows, sel.split_names, sel.split_of
    ret = mins.ret[rows]
    template, encoder, features, labels, teach_idx = st.template, st.encoder, mins.features, mins.labels, sel.teach_idx
    schemas = _schemas()
    writers: dict[tuple[str, str], Any] = {}
    try:
        for view in cfg.views:
            for split in split_names:
                f = view_file(tmp, view, split)
                f.parent.mkdir(parents=True, exist_ok=True)
                writers[(view, split)] = pq.ParquetWriter(f, schemas[view], compression=cfg.compression)

        prefix = template.prefix()
        prefix_chars = sum(len(m["content"]) for m in prefix)
        ids_all_ot = df["open_time"].to_numpy(dtype="datetime64[ns]")
        stats: dict[str, dict[str, Any]] = {s: {"items": 0, "pairs": 0, "labels": {a: 0 for a in ADVICES},
                                                 "chosen": {a: 0 for a in ADVICES}, "margin_sum": 0.0,
                                                 "prompt_chars": []} for s in split_names}
        pair_start = np.searchsorted(p_minute, np.arange(len(rows) + 1))
        advice_arr = pa.array(list(ADVICES), pa.string())
        symbol_prefix = f"{symbol}-"
        head, tail = template.user_parts()
        views = set(cfg.views)
        bar = progress(total=len(rows), desc=f"building {name}", unit="min")
        for c0 in range(0, len(rows), cfg.chunk_rows):
            c1 = min(len(rows), c0 + cfg.chunk_rows)
            r = rows[c0:c1]
            contexts = encoder.encode_arrow(df, r, features)
            users = pc.binary_join_element_wise(head, contexts, tail, "")
            changes = encoder.answer_changes_arrow(df, r)
            rejected_changes = encoder.rejected_changes_arrow(changes)
            ot = pa.array(ids_all_ot[r], pa.timestamp("ns"))
            ids = pc.binary_join_element_wise(
                symbol_prefix, pc.strftime(ot.cast(pa.timestamp("s")), format="%Y-%m-%dT%H:%M:%S"), "")
            lab = labels[r]
            teach = teach_idx[r]
            answers = template.answers_arrow(advice_arr.take(pa.array(teach)), changes)
            # minutes are in time order and splits are consecutive time ranges: each split is a slice
            sp = split_of[r]
            for si, split in enumerate(split_names):
                a0, a1 = np.searchsorted(sp, [si, si + 1])
                if a1 <= a0:
                    continue
                m = np.arange(a0, a1)
                k = int(a1 - a0)
                u = users.slice(a0, k)
                ids_m = ids.slice(a0, k)
                rr = ret[c0 + a0:c0 + a1]
                prompt = messages_array(prefix, [u], ["user"]) if views & {"items", "rl"} else None
                if "items" in views:
                    writers[("items", split)].write_table(pa.table({
                        "id": ids_m, "row": pa.array(r[a0:a1], pa.int64()),
                        "open_time": ot.slice(a0, k).cast(pa.timestamp("ns", tz="UTC")),
                        "symbol": pa.array(np.full(k, symbol, dtype=object), pa.string()),
                        "label": pa.array(lab[a0:a1], pa.string()), "answer": answers.slice(a0, k),
                        "change": changes.slice(a0, k), "ret_BUY": rr[:, 0], "ret_NOOP": rr[:, 1],
                        "ret_SELL": rr[:, 2], "prompt": prompt, "context": contexts.slice(a0, k)},
                        schema=schemas["items"]))
                if "rl" in views:
                    writers[("rl", split)].write_table(pa.table({
                        "id": ids_m, "prompt": prompt, "ret_BUY": rr[:, 0], "ret_NOOP": rr[:, 1],
                        "ret_SELL": rr[:, 2]}, schema=schemas["rl"]))
                if "sft" in views:
                    writers[("sft", split)].write_table(pa.table({
                        "id": ids_m, "messages": messages_array(prefix, [u, answers.slice(a0, k)],
                                                                ["user", "assistant"])},
                        schema=schemas["sft"]))
                # pairs of these minutes (several per minute with all_worse, none when dropped)
                g = c0 + m
                lo, hi = pair_start[g], pair_start[g + 1]
                cnt = hi - lo
                total = int(cnt.sum())
                stt = stats[split]
                if total:
                    pidx = np.repeat(lo, cnt) + (np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt))
                    loc = pa.array(np.repeat(m, cnt))  # chunk-local minute of each pair
                    ch_i, rj_i = p_chosen[pidx], p_rejected[pidx]
                    ch_adv, rj_adv = advice_arr.take(pa.array(ch_i)), advice_arr.take(pa.array(rj_i))
                    if "preference" in views:
                        writers[("preference", split)].write_table(pa.table({
                            "id": ids.take(loc),
                            "prompt": messages_array(prefix, [users.take(loc)], ["user"]),
                            "chosen": messages_array([], [template.answers_arrow(ch_adv, changes.take(loc))], ["assistant"]),
                            "rejected": messages_array([], [template.answers_arrow(rj_adv, rejected_changes.take(loc))],
                                                       ["assistant"]),
                            "margin": p_margin[pidx], "chosen_advice": ch_adv, "rejected_advice": rj_adv},
                            schema=schemas["preference"]))
                    stt["pairs"] += total
                    stt["margin_sum"] += float(p_margin[pidx].sum())
                    counts = np.bincount(ch_i, minlength=3)
                    for j, a in enumerate(ADVICES):
                        stt["chosen"][a] += int(counts[j])
                stt["items"] += k
                for a in ADVICES:
                    stt["labels"][a] += int((lab[a0:a1] == a).sum())
                stt["prompt_chars"].append(prefix_chars + pc.utf8_length(u).to_numpy(zero_copy_only=False))
            bar.update(len(r))
        bar.close()
    finally:
        for w in writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 - already failing; the temp dir is removed by the caller
                pass
    return stats


def _card(cfg: BuildConfig, tmp: Path, df, st: _Settings, mins: _Minutes, sel: _Selection,
          stats: dict[str, dict[str, Any]], pair_drops: dict[str, int], symbol: str, name: str, src: Path,
          src_meta: dict[str, Any]) -> dict[str, Any]:
    """``dataset.json``: the config, template, encoder, labels, splits, counts and hashes."""
    from atm.market.labels import label_horizon
    from atm.utils import provenance, sha256_file

    rows, split_of = sel.rows, sel.split_of
    split_info: dict[str, Any] = {}
    ot_all = df["open_time"]
    for si, split in enumerate(sel.split_names):
        s = stats[split]
        srows = rows[split_of[rows] == si]
        chars = np.concatenate(s.pop("prompt_chars")) if s["prompt_chars"] else np.zeros(0, np.int64)
        part = sel.parts[split]
        split_info[split] = {
            "minutes_in_range": int(len(part)),
            "first_open_time": _iso(ot_all.iloc[part[0]]), "last_open_time": _iso(ot_all.iloc[part[-1]]),
            "items": s["items"], "pairs": s["pairs"],
            "first_item": _iso(ot_all.iloc[srows[0]]) if len(srows) else None,
            "last_item": _iso(ot_all.iloc[srows[-1]]) if len(srows) else None,
            "label_balance": s["labels"], "chosen_balance": s["chosen"],
            "mean_margin_bps": round(s["margin_sum"] / s["pairs"], 3) if s["pairs"] else None,
            "prompt_chars": _stats(chars),
        }
    tokens = count_tokens(cfg, st.template, st.encoder, df, mins.features, rows, split_of, sel.split_names,
                          sel.teach_idx)
    files = {}
    for view in cfg.views:
        for split in sel.split_names:
            f = view_file(tmp, view, split)
            files[str(f.relative_to(tmp))] = sha256_file(f)
    files["klines.parquet"] = sha256_file(tmp / "klines.parquet")
    template, label_cfg = st.template, st.label_cfg
    return {
        "kind": "atm.dataset", "name": name, "symbol": symbol,
        "config": cfg.to_dict(),
        "encoder": st.encoder.config(),
        "template": {"name": template.name, "path": str(cfg.template), "sha256": template.sha256,
                     "yaml": template.to_yaml(), "fewshot_k": st.n_shots, "fewshot_seed": st.fewshot_seed,
                     "example_rows": [int(x) for x in sel.examples_rows]},
        "schema": template.schema(),  # ordered as the template's answer: decoders follow it
        "label": {**label_cfg.to_dict(), "label_horizon": label_horizon(label_cfg)},
        "returns": {"horizon": cfg.horizon, "fee": cfg.fee, "slippage_bps": cfg.slippage_bps,
                    "entry": "open(t)", "exit": f"open(t+{cfg.horizon})"},
        "pairs": {"rule": cfg.pairs, "all_worse": cfg.all_worse, "min_margin": cfg.min_margin,
                  "dropped": pair_drops},
        "split": {**st.split_cfg.to_dict(), "parts": sel.split_names},
        "splits": split_info,
        "rows": {"klines": len(df), "items": int(len(rows)), "dropped": sel.drops},
        "tokens": tokens,
        "source": {"klines": str(src), "sha256": sha256_file(src), "rows": len(df),
                   "first_open_time": _iso(ot_all.iloc[0]), "last_open_time": _iso(ot_all.iloc[-1]),
                   "interval": src_meta.get("interval"), "market": src_meta.get("market"),
                   "files": [{"path": f.get("path"), "sha256": f.get("sha256"), "rows": f.get("rows")}
                             for f in src_meta.get("files", [])]},
        "files": files,
        "provenance": provenance(cfg),
    }


def _publish(tmp: Path, out: Path, info: dict[str, Any]) -> None:
    """Write the card and README into the finished temp folder and swap it in for ``out``."""
    from atm.utils import write_json_atomic, write_text_atomic

    write_json_atomic(tmp / DATASET_CARD, info)
    write_text_atomic(tmp / "README.md", render_card(info))
    for f in (tmp / DATASET_CARD, tmp / "README.md"):
        f.chmod(0o644)  # atomic writes create 0600 temp files; a dataset is for sharing
    if out.exists():  # overwrite: swap in, then remove the old one
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def count_tokens(cfg: BuildConfig, template, encoder, df, features, rows: np.ndarray, split_of: np.ndarray,
                 split_names: list[str], teach_idx: np.ndarray) -> dict[str, Any]:
    """The card's token table: real token counts of a fixed sample of items (``token_sample`` per
    split, evenly spaced) with each of ``token_families`` and ``tokenizer`` (``atm.prompting.tokens``).

    A family whose tokenizer is not on this machine, or missing ``tokenizers``/``jinja2``, gives a
    note in the card instead of counts (the data does not depend on them); a ``tokenizer`` dir asked
    for explicitly that cannot be loaded is an error.
    """
    from atm.errors import MissingDependency
    from atm.prompting import tokens as tk

    sample: dict[str, Any] = {"per_split": cfg.token_sample, "rule": "evenly spaced over each split's items, "
                              "first and last included", "items": {}, "counted": {}, "rows": {}}
    picked = []
    for si, split in enumerate(split_names):
        srows = rows[split_of[rows] == si]
        pos = tk.sample_positions(len(srows), cfg.token_sample)
        sample["items"][split] = int(len(srows))
        sample["counted"][split] = int(len(pos))
        sample["rows"][split] = [int(r) for r in srows[pos]]
        picked.append(srows[pos])
    out: dict[str, Any] = {"sample": sample, "counters": {}, "note": None}
    specs = list(cfg.token_families) + ([cfg.tokenizer] if cfg.tokenizer else [])
    if not specs or cfg.token_sample == 0:
        out["note"] = "Token counting was off for this build (no token_families / tokenizer, or token_sample: 0)."
        return out
    missing = tk.missing_packages()
    if missing:
        log.warning("no token counts in the card: %s not installed (pip install 'atm[tokens]')", ", ".join(missing))
        if cfg.tokenizer:
            raise MissingDependency(f"counting tokens with {cfg.tokenizer} needs {', '.join(missing)}: "
                                    "pip install 'atm[tokens]' -c constraints.txt")
        out["note"] = (f"No token counts: {', '.join(missing)} not installed where this dataset was built. "
                       "Install them with: pip install 'atm[tokens]' -c constraints.txt, then rebuild.")
        return out
    all_rows = np.concatenate(picked)
    contexts = encoder.encode(df, all_rows, features)
    changes = encoder.answer_changes(df, all_rows)
    answers = [template.answer(ADVICES[teach_idx[r]], ch) for r, ch in zip(all_rows.tolist(), changes)]
    bounds = np.cumsum([0] + [len(p) for p in picked])
    unavailable = []
    for spec in specs:
        try:
            counter = tk.load_counter(spec)
        except AtmError as exc:
            if spec == cfg.tokenizer:
                raise
            out["counters"][spec] = {"error": str(exc)}
            unavailable.append(spec)
            log.warning("no %s token counts in the card: %s", spec, exc)
            continue
        c = tk.count_items(template, counter, contexts, answers)
        entry: dict[str, Any] = {"source": counter.source, "all": c.summary()}
        for si, split in enumerate(split_names):
            a, b = bounds[si], bounds[si + 1]
            part = tk.ItemCounts(c.counter, c.prefix, c.prompt[a:b], c.per_item[a:b], c.context[a:b], c.answer[a:b])
            entry[split] = part.summary()
        out["counters"][counter.name if spec != cfg.tokenizer else spec] = entry
    if unavailable:
        out["note"] = f"Not counted: {', '.join(unavailable)} (see the table); `atm doctor --build` builds the family tokenizers."
    return out


def render_card(info: dict[str, Any]) -> str:
    """The dataset card (README.md): HF config front matter + what the dataset is and how it was made."""
    import yaml

    splits = info["split"]["parts"]
    front = {"configs": [{"config_name": v, "data_files": [
        {"split": s, "path": f"{v}/data/{s}-*.parquet"} for s in splits]} for v in VIEWS],
        "tags": ["finance", "trading", "preference", "atm"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {info['name']}: {info['symbol']} market-advice prompts ({info['encoder']['name']} / {info['template']['name']})",
             "", "Built by `atm prompts build`. Load a view with",
             "", "```python", "from datasets import load_dataset",
             f'ds = load_dataset("parquet", data_dir="{info["name"]}/preference")  # splits: {", ".join(splits)}',
             "```", "",
             "| view | columns | use |", "|---|---|---|",
             "| `preference` | prompt, chosen, rejected, margin, id | ORPO / DPO (TRL conversational preference format) |",
             "| `sft` | messages, id | SFT warm-up (prompt + chosen answer) |",
             "| `rl` | prompt, ret_BUY, ret_NOOP, ret_SELL, id | DAPO/GRPO with `atm.prompting.advice.advice_reward` |",
             "| `items` | id, row, open_time, symbol, label, answer, change, ret_*, prompt, context | eval harness, backtest |",
             "", "## Source", ""]
    s = info["source"]
    lines += [f"- klines: `{s['klines']}` (sha256 `{s['sha256']}`), {s['rows']:,} rows, "
              f"{s['first_open_time']} .. {s['last_open_time']}, interval {s.get('interval')}, market {s.get('market')}"]
    if s["files"]:
        lines += ["", "| raw file | rows | sha256 |", "|---|---|---|"]
        lines += [f"| `{Path(str(f['path'])).name}` | {f['rows']} | `{f['sha256']}` |" for f in s["files"]]
    lab = info["label"]
    ret = info["returns"]
    tpl = info["template"]
    lines += ["", "## How it was made", "",
              f"- Encoder: `{info['encoder']['name']}` with `{json.dumps({k: v for k, v in info['encoder'].items() if k != 'name'})}`",
              f"- Template: `{tpl['name']}` (`{tpl['path']}`, sha256 `{tpl['sha256'][:16]}`), " + (
                  "zero-shot" if not tpl["fewshot_k"] else
                  f"{tpl['fewshot_k']} few-shot examples from the train split (rows {tpl['example_rows']})"
                  if tpl["example_rows"] else f"{tpl['fewshot_k']} few-shot examples written in the template"),
              f"- Label rule: `{lab['rule']}` (horizon {lab['horizon']}, threshold {lab['threshold']}, fee {lab['fee']})",
              f"- Realized returns: enter at {ret['entry']}, exit at {ret['exit']}, fee {ret['fee']} per side, "
              f"slippage {ret['slippage_bps']} bps per side; scored as in `score_advice` (bps, clipped)",
              f"- Pairs: `{info['pairs']['rule']}`" + (f" (all_worse={info['pairs']['all_worse']}, min_margin="
                                                       f"{info['pairs']['min_margin']} bps; dropped: {info['pairs']['dropped'] or 'none'})"
                                                       if info['pairs']['rule'] == 'reward' else
                                                       ": chosen = the label's answer, rejected = a random other advice"),
              f"- Split: `{info['split']['method']}`, embargo {info['split']['embargo']} minutes between parts",
              f"- Minutes dropped: {json.dumps(info['rows']['dropped'])}",
              "", "## Splits", "",
              "| split | range | items | pairs | labels BUY/NOOP/SELL | chosen BUY/NOOP/SELL | mean margin (bps) | prompt characters p50 / max |",
              "|---|---|---|---|---|---|---|---|"]
    for sp in splits:
        d = info["splits"][sp]
        lb, cb = d["label_balance"], d["chosen_balance"]
        ch = d["prompt_chars"]
        lines.append(f"| {sp} | {d['first_open_time']} .. {d['last_open_time']} | {d['items']:,} | {d['pairs']:,} | "
                     f"{lb['BUY']:,} / {lb['NOOP']:,} / {lb['SELL']:,} | {cb['BUY']:,} / {cb['NOOP']:,} / {cb['SELL']:,} | "
                     f"{d['mean_margin_bps']} | {ch.get('p50')} / {ch.get('max')} |")
    if info.get("tokens"):
        from atm.prompting.tokens import token_table_lines

        lines += ["", *token_table_lines(info["tokens"], splits)]
    lines += ["", "## Full config", "", "```yaml", yaml.safe_dump(info["config"], sort_keys=False).rstrip(), "```",
              "", "## Template (as rendered, with its examples)", "", "```yaml", tpl["yaml"].rstrip(), "```",
              "", f"Built {info['provenance']['created']} with `{info['provenance']['command']}`.", ""]
    return "\n".join(lines)
