"""``ollama:NAME``: an Ollama(-compatible) server at ``$OLLAMA_HOST`` through the ``ollama`` client;
``format`` = the answer contract's schema (generate only: Ollama returns no log-probs)."""

from __future__ import annotations

import os
import time
from typing import Any

from atm.errors import AtmError, require
from atm.eval.providers import (Prediction, RequestProvider, Transient, item_messages, model_contract,
                                parsed_prediction, token_counts)


class OllamaProvider(RequestProvider):
    """``ollama:NAME``: an Ollama(-compatible) server at ``$OLLAMA_HOST`` via the ``ollama`` client."""

    supports_loglik = False

    def __init__(self, spec: str, arg: str, **options: Any):
        super().__init__(spec, arg, **options)
        ollama = require("ollama", "eval")
        if not arg:
            raise AtmError("ollama:NAME needs a model name, e.g. ollama:atm:q8")
        self.name = arg
        self.host = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
        self.client = ollama.Client(host=self.host, timeout=float(self.gen.timeout))
        self._ollama = ollama
        self.contract = model_contract(options)
        self.schema = self.contract.schema

    def _attempt(self, item: dict, mode: str) -> Prediction:
        import httpx

        t0 = time.perf_counter()
        try:
            resp = self.client.chat(model=self.name, messages=item_messages(item), format=self.schema, stream=False,
                                    options={"temperature": float(self.gen.temperature),
                                             "num_predict": int(self.gen.max_tokens), "seed": 0})
        except self._ollama.ResponseError as exc:
            if exc.status_code >= 500 or exc.status_code == 429:
                raise Transient(f"HTTP {exc.status_code}: {exc.error}") from None
            raise
        except (httpx.TimeoutException, httpx.TransportError, ConnectionError) as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from None
        lat = time.perf_counter() - t0
        # Ollama's prompt_eval_count is "the number of tokens in the prompt" (what its cache saved
        # is not reported)
        prompt, completion = getattr(resp, "prompt_eval_count", None), getattr(resp, "eval_count", None)
        tokens = token_counts(prompt, None, completion) if prompt is not None or completion is not None else None
        return parsed_prediction(item["id"], resp.message.content, lat, tokens=tokens)

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "host": self.host, "model": self.name, "concurrency": self.concurrency,
                "constraint": "format = prompts/advice.schema.json"}
