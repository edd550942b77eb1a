"""Errors users see. Every message says what was wrong and where."""

from __future__ import annotations

import importlib
from types import ModuleType


class AtmError(Exception):
    """A user-facing error: the CLI prints its message (no traceback) and exits 2."""


class DataError(AtmError):
    """Bad input data; the message names the file and line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ConfigError(AtmError):
    """A config file or --set override that does not validate."""


class MissingDependency(AtmError):
    """An optional dependency is not installed; the message names the install command."""


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import ``module`` lazily, or raise MissingDependency naming ``pip install 'atm[extra]'``.

    Heavy dependencies (torch, trl, llama_cpp, gradio, ...) live in extras and are only
    imported where they are used, so ``atm --help`` and the data stage stay light.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        pkg = package or module.split(".")[0]
        raise MissingDependency(
            f"{pkg} is needed for this command but is not installed ({exc}). "
            f"Install it with: pip install 'atm[{extra}]' -c constraints.txt"
        ) from exc
