"""One validated config object per command: YAML file + ``--set key=value`` overrides.

In the style of trl's Config dataclasses: every field has help text (``Field(description=...)``)
and unknown keys are rejected with the list of valid ones, so a typo in a recipe never trains
silently with a default.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from atm.errors import ConfigError

C = TypeVar("C", bound="AtmConfig")


class AtmConfig(BaseModel):
    """Base class: forbids unknown keys, validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def load(cls: type[C], path: str | Path | None = None, overrides: Iterable[str] = (),
             **values: Any) -> C:
        """Build the config from an optional YAML file, then ``key=value`` overrides, then kwargs."""
        data: dict[str, Any] = {}
        if path is not None:
            data = load_yaml(path)
        set_keys = []
        for item in overrides:
            key, value = parse_override(item)
            set_dotted(data, key, value)
            set_keys.append(key)
        for key, value in values.items():
            if value is not None:
                set_dotted(data, key, value)
        return validate(cls, data, source=str(path) if path else "config", set_keys=set_keys)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=3`` -> ("a.b", 3); the value is parsed as YAML so numbers, bools and lists work."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def validate(cls: type[C], data: dict[str, Any], source: str = "config", set_keys: Iterable[str] = ()) -> C:
    """``cls`` from ``data``; errors name their source: ``--set KEY`` for a key given in
    ``set_keys`` (the ``--set`` overrides), else ``source`` (the YAML file)."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(cls, exc, source, set_keys)) from None


def format_validation_error(cls: type[BaseModel], exc: ValidationError, source: str,
                            set_keys: Iterable[str] = ()) -> str:
    set_keys = set(set_keys)
    from_set, from_file = [], []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        given = loc in set_keys or any(loc.startswith(k + ".") for k in set_keys)
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(cls, err["loc"][:-1])
            hint = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
            parent = ".".join(str(x) for x in err["loc"][:-1])
            full = f"{parent}.{hint[0]}" if hint and parent else (hint[0] if hint else None)
            if given:
                msg = f"--set {loc}: unknown key {loc!r}"
                if full:
                    msg += f" (did you mean {full!r}?)"
            else:
                msg = f"unknown key {loc!r}"
                if full:
                    msg += f" (did you mean {full!r}?)"
            msg += f"; valid keys: {', '.join(valid)}"
        else:
            msg = f"{'--set ' if given else ''}{loc}: {err['msg']} (got {err.get('input')!r})"
        (from_set if given else from_file).append("  - " + msg)
    lines = []
    if from_set:
        lines += [f"--set: invalid {cls.__name__}:", *from_set]
    if from_file:
        lines += [f"{source}: invalid {cls.__name__}:", *from_file]
    return "\n".join(lines)


def _valid_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    model: Any = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return []
    return sorted(getattr(model, "model_fields", {}).keys())


def describe(cls: type[BaseModel]) -> str:
    """Human-readable list of fields with defaults and help (used in ``--help`` epilogs)."""
    out = []
    for name, field in cls.model_fields.items():
        if field.is_required():
            out.append(f"  {name} (required): {field.description or ''}")
            continue
        default = field.get_default(call_default_factory=True)  # a default_factory's value too
        default = default if default is not None else "None"
        out.append(f"  {name} (default {default!r}): {field.description or ''}")
    return "\n".join(out)
