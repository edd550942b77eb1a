"""The model registry: ``name:tag`` -> a GGUF file and everything needed to use it honestly.

Layout under ``$ATM_HOME`` (default: the user's data dir, ``atm.utils.atm_home()``)::

    models/<name>/<tag>.gguf     the weights (tags: f16, q8, q4; other quant types use their name)
    models/<name>/<tag>.json     the manifest of that tag (one file per tag, written atomically)

A manifest carries what a consumer needs so that nothing is re-typed downstream: the prompt
template YAML the model was trained with, the answer schema, the chat template inside the GGUF,
the source model's config, the llama.cpp version, the file's sha256 and size, and the fidelity
figures of ``atm export check``. The server and the eval harness resolve names only through
``Registry.resolve``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from atm.errors import AtmError
from atm.utils import atm_home, sha256_file, write_json_atomic

MANIFEST_VERSION = 1
# quant (llama.cpp file type name, lower case) -> registry tag
TAGS: dict[str, str] = {"f16": "f16", "q8_0": "q8", "q4_k_m": "q4"}
DEFAULT_TAG_ORDER = ("q8", "q4", "f16")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def tag_for(quant: str) -> str:
    """``q8_0`` -> ``q8``, ``q4_k_m`` -> ``q4``, ``f16`` -> ``f16``; other types keep their name."""
    return TAGS.get(quant.lower(), quant.lower())


def valid_name(name: str) -> bool:
    """Whether ``name`` can be a registry name or tag (``qwen2.5``, ``fam-phi-3``, ``q8``)."""
    return bool(_NAME_RE.match(name or ""))


def check_name(name: str, what: str = "model name") -> str:
    if not _NAME_RE.match(name or ""):
        raise AtmError(f"{what} {name!r} is not valid: use lower-case letters, digits, '.', '_' or '-' "
                       "(1-64 characters, starting with a letter or digit)")
    return name


class UnknownModel(AtmError):
    """A registry name that is not registered (the message lists the registered ones)."""


@dataclass
class Entry:
    """One registered model file (``name:tag``) and its manifest."""

    name: str
    tag: str
    path: str  # absolute path of the GGUF file
    sha256: str
    size: int  # bytes
    quant: str  # llama.cpp file type: F16, Q8_0, Q4_K_M
    template: str | None = None  # prompt template YAML text (atm.prompting.template.Template.from_yaml)
    schema: dict[str, Any] | None = None  # JSON Schema of the answer
    chat_template: str | None = None  # the Jinja chat template stored in the GGUF
    context_length: int | None = None  # the model's trained context (max_position_embeddings)
    eos_token: str | None = None
    bos_token: str | None = None
    add_bos_token: bool | None = None  # whether llama.cpp prepends bos when tokenizing (GGUF flag)
    source: dict[str, Any] = field(default_factory=dict)  # model_dir, config.json, atm_model.json extras
    llamacpp: dict[str, Any] = field(default_factory=dict)  # llama-cpp-python / llama.cpp / ggml versions
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type -> number of tensors
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # tensors quantized to a fallback type
    tokenizer_check: dict[str, Any] | None = None  # HF vs llama.cpp tokenization of sample prompts
    fidelity: dict[str, Any] | None = None  # figures from `atm export check`
    created: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    manifest_version: int = MANIFEST_VERSION

    @property
    def ref(self) -> str:
        """``name:tag``, the string users type."""
        return f"{self.name}:{self.tag}"

    @property
    def file(self) -> Path:
        return Path(self.path)

    @property
    def model_dir(self) -> str | None:
        """The merged HF model dir the GGUF was converted from (the transformers engine serves it)."""
        return self.source.get("model_dir")

    @property
    def encoder(self) -> dict[str, Any]:
        """The encoder config the model was trained with (from atm_model.json)."""
        enc = (self.source.get("atm_model") or {}).get("encoder")
        return enc if isinstance(enc, dict) else ({"name": enc} if isinstance(enc, str) else {})

    def template_obj(self):
        """The prompt template as an ``atm.prompting.template.Template`` (None when not recorded):
        the entry's answer contract's (``atm.prompting.contract.resolve_contract``)."""
        from atm.prompting.contract import resolve_contract

        return resolve_contract(self).template()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> "Entry":
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("name", "tag", "path", "sha256", "size", "quant") if k not in data]
        if missing:
            raise AtmError(f"{where}: manifest is missing {missing}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> dict[str, Any]:
        """One row of ``atm models list``."""
        fid = self.fidelity or {}
        return {"name": self.ref, "quant": self.quant, "size_mb": round(self.size / 2**20, 2),
                "sha256": self.sha256[:12], "created": self.created,
                "valid_rate": fid.get("valid_rate"), "agree_hf": fid.get("advice_agreement_hf"),
                "path": self.path}


def split_ref(ref: str) -> tuple[str, str | None]:
    """``atm:q8`` -> (``atm``, ``q8``); ``atm`` -> (``atm``, None)."""
    name, sep, tag = ref.strip().partition(":")
    return name, (tag or None) if sep else None


class Registry:
    """Manifest store under ``$ATM_HOME/models``. Cheap to create; reads the disk on each call."""

    def __init__(self, home: str | Path | None = None):
        self.home = Path(home).expanduser() if home is not None else atm_home()
        self.root = self.home / "models"

    # ---------------------------------------------------------------- paths
    def model_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def gguf_path(self, name: str, tag: str) -> Path:
        return self.model_dir(name) / f"{check_name(tag, 'tag')}.gguf"

    def manifest_path(self, name: str, tag: str) -> Path:
        return self.model_dir(name) / f"{check_name(tag, 'tag')}.json"

    # ---------------------------------------------------------------- reading
    def _load(self, path: Path) -> Entry:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AtmError(f"{path}: unreadable manifest ({exc}); remove it with `atm models rm`") from None
        return Entry.from_dict(data, where=str(path))

    def list(self) -> list[Entry]:
        """Every registered entry, sorted by name then tag (broken manifests are skipped)."""
        out: list[Entry] = []
        if not self.root.is_dir():
            return out
        for mdir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for mpath in sorted(mdir.glob("*.json")):
                if mpath.name.startswith("."):
                    continue
                try:
                    out.append(self._load(mpath))
                except AtmError:
                    continue
        return out

    def names(self) -> list[str]:
        return [e.ref for e in self.list()]

    def _unknown(self, ref: str) -> "UnknownModel":
        known = self.names()
        listing = ", ".join(known) if known else "none (export one with `atm export gguf`)"
        return UnknownModel(f"unknown model {ref!r} in registry {self.root}; known models: {listing}")

    def resolve(self, ref: str, verify: bool = False) -> Entry:
        """``name:tag`` -> Entry. A bare ``name`` picks q8, then q4, then f16.

        Raises AtmError listing the known names when ``ref`` is not registered, and when its file is
        gone. ``verify=True`` also recomputes the sha256.
        """
        name, tag = split_ref(ref)
        if not _NAME_RE.match(name or "") or (tag is not None and not _NAME_RE.match(tag)):
            raise self._unknown(ref)
        if tag is None:
            for t in DEFAULT_TAG_ORDER + tuple(e.tag for e in self.list() if e.name == name):
                if self.manifest_path(name, t).is_file():
                    tag = t
                    break
            else:
                raise self._unknown(ref)
        mpath = self.manifest_path(name, tag)
        if not mpath.is_file():
            raise self._unknown(ref)
        entry = self._load(mpath)
        if not entry.file.is_file():
            raise AtmError(f"{entry.ref}: its file {entry.path} is missing; re-export it with "
                           f"`atm export gguf` or remove the entry with `atm models rm {entry.ref}`")
        if entry.file.stat().st_size != entry.size:
            raise AtmError(f"{entry.ref}: {entry.path} has {entry.file.stat().st_size} bytes, the manifest "
                           f"says {entry.size}: the file was truncated or replaced; re-export it")
        if verify:
            self.verify(entry)
        return entry

    def verify(self, entry: Entry) -> Entry:
        digest = sha256_file(entry.path)
        if digest != entry.sha256:
            raise AtmError(f"{entry.ref}: sha256 of {entry.path} is {digest[:12]}..., the manifest says "
                           f"{entry.sha256[:12]}...: the file changed since export")
        return entry

    # ---------------------------------------------------------------- writing
    def add(self, entry: Entry) -> Entry:
        """Write (or replace) the manifest of ``entry.ref``. The GGUF must already be in place."""
        check_name(entry.name)
        check_name(entry.tag, "tag")
        if not Path(entry.path).is_file():
            raise AtmError(f"{entry.ref}: cannot register {entry.path}: no such file")
        write_json_atomic(self.manifest_path(entry.name, entry.tag), entry.to_dict())
        return entry

    def update(self, ref: str, **changes: Any) -> Entry:
        """Change fields of a registered entry (e.g. ``fidelity``) and rewrite its manifest."""
        entry = self.resolve(ref)
        for k, v in changes.items():
            if not hasattr(entry, k):
                raise AtmError(f"manifest has no field {k!r}")
            setattr(entry, k, v)
        return self.add(entry)

    def remove(self, ref: str) -> list[Entry]:
        """Remove ``name:tag`` (its manifest and its GGUF when inside the registry), or every tag of
        a bare ``name``. Returns what was removed."""
        name, tag = split_ref(ref)
        if tag is None:
            targets = [e for e in self.list() if e.name == name]
        else:
            mpath = self.manifest_path(name, tag) if _NAME_RE.match(name or "") and _NAME_RE.match(tag) else None
            targets = [self._load(mpath)] if mpath is not None and mpath.is_file() else []
        if not targets:
            raise self._unknown(ref)
        for e in targets:
            f = Path(e.path)
            # only delete files the registry owns; a manifest may point at a user's file
            if f.is_file() and f.resolve().parent == self.model_dir(e.name).resolve():
                f.unlink()
            self.manifest_path(e.name, e.tag).unlink(missing_ok=True)
        mdir = self.model_dir(name)
        try:
            os.rmdir(mdir)  # only succeeds when nothing else is left in it
        except OSError:
            pass
        return targets

    def find(self, refs: Iterable[str]) -> list[Entry]:
        return [self.resolve(r) for r in refs]


def resolve(ref: str, home: str | Path | None = None) -> Entry:
    """Shortcut: ``Registry(home).resolve(ref)``."""
    return Registry(home).resolve(ref)
