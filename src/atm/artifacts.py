"""Typed readers of ATM's on-disk artifacts: a built dataset directory and a model card.

Every stage reads these through here, so a path or a field is spelled in one place:

- ``DatasetDir(path)``: ``atm prompts build``'s output (docs/architecture.md). ``view_path(view,
  split)`` is ``{view}/data/{split}-00000-of-00001.parquet``; ``load_view(view, split, columns)``
  reads one (an AtmError naming the available splits when it is missing); ``card()`` the typed
  ``dataset.json``; ``klines_path``.
- ``ModelCard``: ``atm_model.json`` beside a merged model (``atm finetune merge`` writes it; export,
  serve and eval read it): the prompt template's YAML text, the answer schema, the encoder, the
  dataset and training lineage, versioned (``version``; a card without one is version 1).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from atm.errors import AtmError, DataError
from atm.utils import write_json_atomic

DATASET_CARD = "dataset.json"
MODEL_CARD = "atm_model.json"
MODEL_CARD_VERSION = 1
VIEWS = ("preference", "sft", "rl", "items")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc}", str(path)) from None
    if not isinstance(data, dict):
        raise DataError("expected a JSON object", str(path))
    return data


# ---------------------------------------------------------------------------------------------
# datasets


@dataclass
class DatasetCard:
    """``dataset.json``: what built a dataset (full config, template, encoder, labels, splits)."""

    data: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        c = self.data.get("config")
        return c if isinstance(c, dict) else {}

    @property
    def name(self) -> str | None:
        return self.data.get("name")

    @property
    def template(self) -> dict[str, Any]:
        """``{"name", "path", "sha256", "yaml", ...}`` of the template the prompts were rendered with."""
        t = self.data.get("template")
        return t if isinstance(t, dict) else {}

    @property
    def template_yaml(self) -> str | None:
        return self.template.get("yaml")

    @property
    def encoder(self) -> dict[str, Any]:
        """``{"name": ..., **config}`` of the encoder the contexts were made with."""
        e = self.data.get("encoder")
        return e if isinstance(e, dict) else {}

    @property
    def schema(self) -> dict[str, Any] | None:
        s = self.data.get("schema")
        return s if isinstance(s, dict) else None

    @property
    def label(self) -> dict[str, Any]:
        """The label config the labels were computed with (rule, horizon, threshold ...; the
        builder's config when the card records only the rule's name)."""
        v = self.data.get("label")
        if isinstance(v, dict):
            return v
        rule = self.config.get("label")
        return {"rule": rule} if isinstance(rule, str) else {}

    @property
    def splits(self) -> dict[str, Any]:
        s = self.data.get("splits")
        return s if isinstance(s, dict) else {}

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)


class DatasetDir:
    """A built dataset directory (``datasets/build/NAME``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"DatasetDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def card_path(self) -> Path:
        return self.path / DATASET_CARD

    @property
    def klines_path(self) -> Path:
        return self.path / "klines.parquet"

    def has_card(self) -> bool:
        return self.card_path.is_file()

    def has_view(self, view: str) -> bool:
        return (self.path / view).is_dir()

    def view_dir(self, view: str) -> Path:
        return self.path / view / "data"

    def view_path(self, view: str, split: str) -> Path:
        return self.view_dir(view) / f"{split}-00000-of-00001.parquet"

    def splits(self, view: str) -> list[str]:
        """The splits the view has files for, sorted."""
        return sorted(p.name.split("-")[0] for p in self.view_dir(view).glob("*.parquet"))

    def require_view(self, view: str, split: str) -> Path:
        p = self.view_path(view, split)
        if not p.exists():
            avail = ", ".join(self.splits(view)) or "none"
            raise AtmError(f"{p}: no {split!r} split in {self.path} (available: {avail}); build the dataset "
                           "with `atm prompts build`")
        return p

    def load_view(self, view: str, split: str, columns: Sequence[str] | None = None):
        """One split of one view as a pandas DataFrame (``columns``: only those)."""
        import pandas as pd

        return pd.read_parquet(self.require_view(view, split), columns=list(columns) if columns else None)

    @cached_property
    def _card(self) -> DatasetCard:
        return DatasetCard(_read_json(self.card_path) if self.has_card() else {})

    def card(self) -> DatasetCard:
        """The typed ``dataset.json`` (empty when the directory has none)."""
        return self._card

    def summary(self, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """``{"path": ..., **dataset.json}`` (only ``keys`` of it when given): what a run records
        about the dataset it read."""
        d = self.card().data
        if keys is not None:
            d = {k: d[k] for k in keys if k in d}
        return {"path": str(self.path), **d}


# ---------------------------------------------------------------------------------------------
# models


@dataclass
class ModelCard:
    """``atm_model.json``: what a merged model was trained with."""

    template: str | None = None  # the prompt template's YAML text (atm.prompting.template)
    schema: dict[str, Any] | None = None  # the answer's JSON Schema
    encoder: dict[str, Any] = field(default_factory=dict)  # {"name": ..., **config}
    dataset: dict[str, Any] = field(default_factory=dict)  # {"path": ..., **dataset.json}
    training: list[dict[str, Any]] = field(default_factory=list)  # one entry per training run, newest first
    base_model: str | None = None
    adapter: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    version: int = MODEL_CARD_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MODEL_CARD) -> "ModelCard":
        version = int(data.get("version", 1))
        if version > MODEL_CARD_VERSION:
            raise AtmError(f"{where}: model card version {version} is newer than this ATM reads "
                           f"({MODEL_CARD_VERSION}); upgrade ATM")
        t = data.get("template")
        template = t.get("yaml") if isinstance(t, dict) else t if isinstance(t, str) else None
        enc = data.get("encoder")
        encoder = enc if isinstance(enc, dict) else ({"name": enc} if isinstance(enc, str) else {})
        schema = data.get("schema") if isinstance(data.get("schema"), dict) else None
        return cls(template=template, schema=schema, encoder=dict(encoder),
                   dataset=data.get("dataset") if isinstance(data.get("dataset"), dict) else {},
                   training=list(data.get("training") or []), base_model=data.get("base_model"),
                   adapter=data.get("adapter"), provenance=data.get("provenance") or {}, version=version)

    @classmethod
    def read(cls, model_dir: str | Path) -> "ModelCard | None":
        """The card of a model dir (or the card beside a GGUF file); None when there is none."""
        p = Path(model_dir)
        p = p / MODEL_CARD if p.is_dir() else p.with_name(MODEL_CARD)
        if not p.is_file():
            return None
        return cls.from_dict(_read_json(p), where=str(p))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, model_dir: str | Path) -> Path:
        p = Path(model_dir) / MODEL_CARD
        write_json_atomic(p, self.to_dict())
        return p

    @property
    def dataset_dir(self) -> Path | None:
        """The dataset the model was trained on, if it is still there."""
        cands: list[Any] = [self.dataset.get("path"), (self.dataset.get("config") or {}).get("out")]
        cands += [(run.get("config") or {}).get("data") for run in self.training if isinstance(run, dict)]
        for c in cands:
            if isinstance(c, str) and c and Path(c).is_dir():
                return Path(c)
        return None
