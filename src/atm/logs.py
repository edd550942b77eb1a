"""Logging: library modules log to ``logging.getLogger(__name__)``; only the CLI shows it.

Every module of the package logs through its own named logger (``atm.serve.engines.supervisor``,
``atm.eval.harness`` ...), so a user embedding ATM picks what to see with the standard ``logging``
calls. ``atm/__init__.py`` gives the ``atm`` logger a ``NullHandler``: used as a library, ATM
prints nothing. The ``atm`` / ``atm-eval`` commands call :func:`configure`, which shows INFO and
above as plain lines: on stdout for the eval stage (its run narrative sits beside the summary it
prints, as before), on stderr for every other stage. ``ATM_LOG_LEVEL=debug|info|warning|error``
changes the level.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "atm"
# loggers whose records are part of their command's output (stdout), not diagnostics (stderr)
STDOUT_LOGGERS = ("atm.eval",)
_HANDLER_FLAG = "_atm_cli_handler"


class _CliHandler(logging.Handler):
    """Writes each record as one line to the stream its logger belongs on, looked up at emit
    time (so a replaced ``sys.stdout`` - a test's capture, a pager - is honoured)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            out = sys.stdout if _on_stdout(record.name) else sys.stderr
            out.write(self.format(record) + "\n")
            out.flush()
        except Exception:  # noqa: BLE001 - logging must never take the command down
            self.handleError(record)


def _on_stdout(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in STDOUT_LOGGERS)


def configure(level: str | int | None = None) -> logging.Logger:
    """Show ATM's log records on the terminal (the CLI's setting; idempotent)."""
    level = level or os.environ.get("ATM_LOG_LEVEL") or "info"
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    log = logging.getLogger(ROOT)
    log.setLevel(level)
    if not any(getattr(h, _HANDLER_FLAG, False) for h in log.handlers):
        handler = _CliHandler()
        setattr(handler, _HANDLER_FLAG, True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.propagate = False  # the command owns the terminal: no second copy via a root handler
    return log
