"""Served models: registry name -> engine + what the model was trained with.

A registry model (``atm:q8``) carries the prompt template, answer schema and encoder it was
trained with (``atm_model.json`` copied into the registry by ``atm export``). ``/v1/advice`` uses
exactly those, resolved by ``atm.prompting.contract.resolve_contract`` (``ServedModel.contract``),
so a served model is prompted the way it was trained (the original experiment trained on one
prompt format and served another).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from atm.artifacts import ModelCard
from atm.errors import AtmError
from atm.export.registry import Entry, Registry
from atm.serve.engines import Engine, engine_class
from atm.serve.settings import ModelSpec, ServeSettings


@dataclass
class ServedModel:
    name: str
    engine: Engine
    kind: str
    path: str | None = None
    template_yaml: str | None = None  # the template saved with the model (or the serve config's)
    schema: dict[str, Any] | None = None  # the schema saved with the model
    encoder: dict[str, Any] = field(default_factory=dict)  # {"name": ..., **config}
    info: dict[str, Any] = field(default_factory=dict)  # size, digest, quant, family, modified
    _encoder: Any = None
    _contract: Any = None

    def contract(self):
        """The model's answer contract (``atm.prompting.contract.resolve_contract``: the one chain)."""
        if self._contract is None:
            from atm.prompting.contract import resolve_contract

            self._contract = resolve_contract(template_yaml=self.template_yaml, schema=self.schema,
                                              encoder=self.encoder)
        return self._contract

    def template(self):
        """The prompt template saved with the model (``atm.prompting.template.Template``)."""
        t = self.contract().template()
        if t is None:
            raise AtmError(f"model {self.name!r} has no prompt template saved with it; "
                           "give `template:` in the serve config")
        return t

    def advice_schema(self) -> dict[str, Any]:
        return self.contract().schema

    def get_encoder(self):
        if self._encoder is None:
            self._encoder = self.contract().get_encoder()
        return self._encoder


def _meta(template: str | None, schema: Any, encoder: Any) -> dict[str, Any]:
    return {"template_yaml": template, "schema": schema if isinstance(schema, dict) else None,
            "encoder": dict(encoder) if isinstance(encoder, dict) else {}}


def _file_info(path: Path, entry: Entry | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        st = path.stat()
        info["size"] = st.st_size
        info["modified_at"] = datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat()
    except OSError:
        pass
    info["digest"] = f"sha256:{entry.sha256}" if entry is not None and entry.sha256 else None
    quant = entry.quant if entry is not None else None
    if quant is None and path.suffix == ".gguf":
        quant = path.stem.upper()
    info["quant"] = quant
    info["family"] = "llama"
    info["format"] = "gguf" if path.suffix == ".gguf" else "safetensors"
    return info


def resolve(spec: ModelSpec, settings: ServeSettings) -> ServedModel:
    """Build the engine for one model spec (not started)."""
    kind = spec.engine or settings.engine
    cls = engine_class(kind)
    entry: Entry | None = None
    meta = _meta(None, None, {})
    path: Path | None = Path(spec.path).expanduser() if spec.path else None

    if cls.serves != "url" and path is None and not spec.upstream:
        try:
            entry = Registry().resolve(spec.name)
        except KeyError as exc:
            raise AtmError(str(exc)) from None
        meta = _meta(entry.template, entry.schema, entry.encoder)
        path = Path(entry.path)
        if cls.serves == "hf":
            # an HF engine serves the merged HF dir the GGUF was converted from
            if not entry.model_dir:
                raise AtmError(f"{spec.name}: the registry entry names no HF model dir; "
                               f"give `path:` for the {kind} engine")
            path = Path(entry.model_dir)
    elif path is not None and (path.is_dir() or path.suffix == ".gguf"):
        card = ModelCard.read(path)  # a merged model's card, or the card beside a GGUF
        if card is not None:
            meta = _meta(card.template, card.schema, card.encoder)
    if spec.template:
        from atm.prompting.template import Template

        meta["template_yaml"] = Template.load(spec.template).to_yaml()

    engine = cls.from_settings(spec, settings, path)
    info = _file_info(path, entry) if path is not None and path.exists() else {"family": "llama"}
    return ServedModel(name=spec.name, engine=engine, kind=kind, path=str(path) if path else None,
                       template_yaml=meta["template_yaml"], schema=meta["schema"],
                       encoder=meta["encoder"], info=info)


def parse_model_arg(arg: str) -> ModelSpec:
    """``--model`` value: ``atm:q8`` (registry), ``NAME=PATH`` (a GGUF / HF dir under a name), a
    bare ``PATH`` (served under the file name), or ``NAME=http(s)://…`` (remote proxy)."""
    if "=" in arg:
        name, target = arg.split("=", 1)
        if target.startswith(("http://", "https://")):
            return ModelSpec(name=name, upstream=target, engine="remote")
        return ModelSpec(name=name, path=target)
    p = Path(arg).expanduser()
    if p.suffix == ".gguf" or p.is_dir():
        return ModelSpec(name=p.stem if p.suffix else p.name, path=str(p))
    return ModelSpec(name=arg)
