"""Served models: registry name -> engine + what the model was trained with.

A registry model (``atm:q8``) carries the prompt template, answer schema and encoder it was
trained with (``atm_model.json`` copied into the registry by ``atm export``). ``/v1/advice`` uses
exactly those, so a served model is prompted the way it was trained (the original experiment
trained on one prompt format and served another).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from atm.errors import AtmError
from atm.serve.engines import Engine, engine_class
from atm.serve.settings import ModelSpec, ServeSettings


@dataclass
class ServedModel:
    name: str
    engine: Engine
    kind: str
    path: str | None = None
    template_yaml: str | None = None
    schema: dict[str, Any] | None = None
    encoder: dict[str, Any] = field(default_factory=dict)  # {"name": ..., **config}
    info: dict[str, Any] = field(default_factory=dict)  # size, digest, quant, family, modified
    _template: Any = None
    _encoder: Any = None

    def template(self):
        """The prompt template saved with the model (``atm.prompting.template.Template``)."""
        if self._template is None:
            if not self.template_yaml:
                raise AtmError(f"model {self.name!r} has no prompt template saved with it; "
                               "give `template:` in the serve config")
            from atm.prompting.template import Template

            self._template = Template.from_yaml(self.template_yaml, source=f"{self.name} template")
        return self._template

    def advice_schema(self) -> dict[str, Any]:
        if self.schema:
            return self.schema
        return self.template().schema()

    def get_encoder(self):
        if self._encoder is None:
            from atm.prompting.encoders import get_encoder

            cfg = dict(self.encoder or {})
            name = cfg.pop("name", None)
            if not name:
                t = self.template()
                name = t.spec.encoder or "seed-json"
                cfg = {**t.spec.encoder_config, **cfg}
            self._encoder = get_encoder(name, **cfg)
        return self._encoder


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


def _meta_from_entry(entry: Any) -> dict[str, Any]:
    """Template / schema / encoder / info from a registry entry (or an atm_model.json dict)."""
    tpl = _get(entry, "template", "template_yaml")
    if tpl is not None and not isinstance(tpl, str):
        import yaml

        tpl = yaml.safe_dump(tpl, sort_keys=False, allow_unicode=True)
    schema = _get(entry, "schema")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            schema = None
    enc = _get(entry, "encoder", default={}) or {}
    if isinstance(enc, str):
        enc = {"name": enc}
    src = _get(entry, "source", "source_config", default=None)
    if not enc and isinstance(src, dict):
        enc = src.get("encoder") or {}
        if isinstance(enc, str):
            enc = {"name": enc}
    return {"template_yaml": tpl, "schema": schema if isinstance(schema, dict) else None,
            "encoder": dict(enc) if isinstance(enc, dict) else {}}


def _file_info(path: Path, entry: Any = None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        st = path.stat()
        info["size"] = st.st_size
        info["modified_at"] = datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat()
    except OSError:
        pass
    digest = _get(entry, "sha256", "digest") if entry is not None else None
    info["digest"] = f"sha256:{digest}" if digest and not str(digest).startswith("sha256:") else digest
    quant = _get(entry, "quant", "quantization") if entry is not None else None
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
    entry = None
    meta: dict[str, Any] = {"template_yaml": None, "schema": None, "encoder": {}}
    path: Path | None = Path(spec.path).expanduser() if spec.path else None

    if cls.serves != "url" and path is None and not spec.upstream:
        from atm.export.registry import Registry

        try:
            entry = Registry().resolve(spec.name)
        except KeyError as exc:
            raise AtmError(str(exc)) from None
        meta = _meta_from_entry(entry)
        path = Path(str(_get(entry, "path")))
        if cls.serves == "hf":
            # an HF engine serves the merged HF dir the GGUF was converted from
            src = _get(entry, "source_dir", "model_dir", "hf_dir")
            if not src:
                raise AtmError(f"{spec.name}: the registry entry names no HF model dir; "
                               f"give `path:` for the {kind} engine")
            path = Path(str(src))
    elif path is not None and path.is_dir() and (path / "atm_model.json").is_file():
        meta = _meta_from_entry(json.loads((path / "atm_model.json").read_text()))
    elif path is not None and path.suffix == ".gguf":
        side = path.with_name("atm_model.json")
        if side.is_file():
            meta = _meta_from_entry(json.loads(side.read_text()))
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
