"""Engines behind ``atm serve``: what actually runs a model, one module per engine.

``base`` holds the interface (``Engine``, the typed ``EngineRequest``, ``Capabilities``, the
errors); ``http`` the client of upstream servers and the OpenAI-API engine base; ``supervisor``
the child-process engines (on ``atm.runtime``). The engines:

- ``llama-server`` (``llama_server.py``): llama.cpp's native server per GGUF, batched slots.
- ``vllm`` (``vllm.py``): ``vllm serve`` launched the same way (or attached with ``upstream:``).
- ``remote`` (``remote.py``): a proxy to an OpenAI-compatible or an Ollama server.
- ``transformers`` (``transformers.py``): an HF model in this process, batched by settings.

``ENGINES`` maps a kind (the ``engine:`` setting) to ``"module:Class"``; a module is imported only
when its kind is served (the lm-eval registry style, as ``atm.eval.providers``). A new engine is a
module with an ``Engine`` subclass (``from_settings``, ``_start``, the four calls) and one line here
(and in ``atm.serve.settings.EngineKind``).
"""

from __future__ import annotations

import importlib

from atm.errors import AtmError
from atm.serve.engines.base import (Capabilities, Engine, EngineBusy, EngineError, EngineRequest,
                                    EngineUnavailable)

ENGINES: dict[str, str] = {
    "llama-server": "atm.serve.engines.llama_server:LlamaServerEngine",
    "transformers": "atm.serve.engines.transformers:TransformersEngine",
    "vllm": "atm.serve.engines.vllm:VLLMEngine",
    "remote": "atm.serve.engines.remote:RemoteEngine",
}


def engine_class(kind: str) -> type[Engine]:
    """The Engine subclass of ``kind`` (its module imported now)."""
    target = ENGINES.get(kind)
    if target is None:
        raise AtmError(f"unknown engine {kind!r}; valid: {', '.join(ENGINES)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["ENGINES", "Capabilities", "Engine", "EngineBusy", "EngineError", "EngineRequest",
           "EngineUnavailable", "engine_class"]
