"""Ports and keys for the engine processes ATM starts."""

from __future__ import annotations

import secrets
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_api_key() -> str:
    """A fresh random bearer key (one per engine process): only its launcher can use the engine."""
    return "atm-" + secrets.token_urlsafe(24)
