"""What a training run reads of its dataset and checks before it trains: the split files, a split
as a ``datasets.Dataset``, the dataset's card, and whether the rows fit ``max_length``.

``train.py`` and the ORPO trainer (``orpo.py``) both use these (so neither imports the other).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atm.artifacts import DatasetDir
from atm.errors import ConfigError, DataError, require
from atm.finetune.config import FinetuneConfig


def split_file(data: str | Path, view: str, split: str = "train") -> Path:
    """The parquet file of one split of one view of an ATM dataset."""
    return DatasetDir(data).view_path(view, split)


def load_split(data: str | Path, view: str, split: str = "train", columns: list[str] | None = None):
    """One split of one view of an ATM dataset as a `datasets.Dataset`."""
    datasets = require("datasets", "train")
    f = split_file(data, view, split)
    if not f.exists():
        raise DataError(f"missing {view}/{split} split (build the dataset with `atm prompts build`)",
                        str(f))
    ds = datasets.load_dataset("parquet", data_files={split: str(f)}, split=split)
    if columns:
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise DataError(f"missing columns {missing} (has {ds.column_names})", str(f))
        ds = ds.select_columns(columns)
    if len(ds) == 0:
        raise DataError("no rows", str(f))
    return ds


def dataset_summary(data: str | Path) -> dict[str, Any]:
    """The dataset's `dataset.json` (its full config and provenance), or just the path."""
    return DatasetDir(data).summary()


def check_lengths(method: str, cfg: FinetuneConfig, model, tok, ds, sample: int = 2000,
                  measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refuse a run whose rows would not fit: TRL cuts rows longer than ``max_length`` from the
    end, which removes the answer the row exists to teach (a real tokenizer that splits digits
    makes the seed prompt 2-3x longer than the tiny one). Counts tokens of up to ``sample`` rows,
    rendered with the model's chat template, and returns the figures for atm_run.json.
    ``measured``: figures already counted on every row (ORPO's tokenized rows: checked, max,
    mean, over), used instead of counting a sample."""
    n_ctx = getattr(model.config, "max_position_embeddings", None)
    if n_ctx and cfg.max_length > n_ctx:
        raise ConfigError(f"max_length={cfg.max_length} is longer than the context of {cfg.model} "
                          f"({n_ctx} tokens); set max_length <= {n_ctx}")
    if measured is not None:
        _refuse_long_rows(method, cfg, n_ctx, measured["over"], measured["checked"], measured["max"])
        return {"checked": measured["checked"], "max": measured["max"], "mean": measured["mean"],
                "max_length": cfg.max_length, "model_context": n_ctx}
    idx = range(len(ds)) if len(ds) <= sample else [round(i * (len(ds) - 1) / (sample - 1))
                                                     for i in range(sample)]
    rows = ds.select(idx)
    extra = cfg.dapo.max_completion_length if method == "dapo" else 0

    def n_tokens(messages, gen=False) -> int:
        out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return len(ids)

    lengths = []
    for row in rows:
        if method == "sft":
            lengths.append(n_tokens(row["messages"]))
        elif method == "orpo":
            lengths.append(max(n_tokens(row["prompt"] + row[k]) for k in ("chosen", "rejected")))
        else:
            lengths.append(n_tokens(row["prompt"], gen=True) + extra)
    longest = max(lengths) if lengths else 0
    _refuse_long_rows(method, cfg, n_ctx, sum(n > cfg.max_length for n in lengths), len(lengths), longest)
    return {"checked": len(lengths), "max": longest,
            "mean": round(sum(lengths) / len(lengths), 1) if lengths else None,
            "max_length": cfg.max_length, "model_context": n_ctx}


def _refuse_long_rows(method: str, cfg: FinetuneConfig, n_ctx, over: int, checked: int, longest: int) -> None:
    if over:
        what = "prompt + max_completion_length" if method == "dapo" else "rows"
        raise ConfigError(
            f"{over} of {checked} {what} checked are longer than max_length={cfg.max_length} "
            f"tokens with {cfg.model}'s tokenizer and chat template (longest {longest}); TRL would "
            f"cut their answers off. Raise max_length (the model allows {n_ctx or 'unknown'}), or "
            "use a shorter encoder or fewer k-shot examples")
