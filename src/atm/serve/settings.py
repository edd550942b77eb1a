"""``atm serve`` settings: one validated object, from ``serve/*.yaml`` + CLI flags + ``--set``.

Everything the server does is decided here (which models, which engine, where it binds, the
limits that keep it standing under bad input and overload), so a deployment is one YAML file.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from atm.config import AtmConfig

EngineKind = Literal["llama-server", "transformers", "vllm", "remote"]  # = atm.serve.engines.ENGINES


class ModelSpec(AtmConfig):
    """One served model. ``name`` is what clients send as ``model`` (a registry name like ``atm:q8``)."""

    name: str = Field(description="model name clients use: a registry name (atm:q8) or any alias "
                      "when `path` or `upstream` is given")
    path: str | None = Field(default=None, description="GGUF file (llama-server) or HF model dir "
                             "(transformers, vllm); None = resolve `name` in the registry")
    engine: EngineKind | None = Field(default=None, description="engine for this model (None = the "
                                      "server-wide `engine`)")
    template: str | None = Field(default=None, description="prompt template YAML for /v1/advice when "
                                 "the model has none saved with it (registry models carry their own)")
    upstream: str | None = Field(default=None, description="remote engine: base URL of the OpenAI-"
                                 "compatible (…/v1) or Ollama server to proxy to")
    upstream_api: Literal["openai", "ollama"] = Field(default="openai", description="remote engine: "
                                                      "which API the upstream speaks")
    upstream_model: str | None = Field(default=None, description="remote engine: the upstream's name "
                                       "for the model (default: `name`)")
    upstream_api_key: str | None = Field(default=None, description="remote engine: bearer key for the "
                                         "upstream (default: $ATM_UPSTREAM_API_KEY)")
    parallel: int | None = Field(default=None, ge=1, le=256, description="slots for this model "
                                 "(None = the server-wide `parallel`)")
    ctx_size: int | None = Field(default=None, ge=0, description="per-slot context for this model "
                                 "(None = the server-wide `ctx_size`)")
    extra_args: list[str] = Field(default_factory=list, description="extra command-line arguments "
                                  "for the engine process (llama-server / vllm serve)")


class ServeSettings(AtmConfig):
    """Settings of ``atm serve`` (YAML in ``serve/``; every key can be given with ``--set``)."""

    models: list[ModelSpec] = Field(default_factory=list, description="models to serve (several at "
                                    "once; each gets its own engine process)")
    engine: EngineKind = Field(default="llama-server", description="default engine: llama-server "
                               "(GGUF, CPU/GPU), transformers (HF dir), vllm (HF dir; CUDA, or a CPU "
                               "through `atm doctor --vllm`), remote (proxy)")
    host: str = Field(default="127.0.0.1", description="address to bind (127.0.0.1 = this machine "
                      "only; use 0.0.0.0 deliberately, with an api_key)")
    port: int = Field(default=8000, ge=0, le=65535, description="port to bind (0 = any free port)")
    api_key: str | None = Field(default=None, description="require `Authorization: Bearer KEY` on "
                                "every route but /health (default: $ATM_API_KEY; None = open)")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS "
                                    "(empty = CORS off)")
    parallel: int = Field(default=8, ge=1, le=256, description="engine slots per model: requests "
                          "decoded together (continuous batching)")
    ctx_size: int = Field(default=2048, ge=0, description="context per slot in tokens (prompt + "
                          "answer); 0 = the model's training context")
    threads: int | None = Field(default=None, ge=1, description="CPU threads per engine (None = engine default)")
    ubatch_size: int = Field(default=2048, ge=32, description="llama-server physical batch (-ub, and "
                             "-b at least as large): prompts are processed this many tokens at a time; "
                             "2048 served 1.5x the requests/s of the default 512 on the tiny model")
    max_queue: int = Field(default=64, ge=0, description="requests per model allowed to wait beyond "
                           "the busy slots; more get 429 with Retry-After")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="largest request body "
                                "accepted; larger gets 413")
    default_max_tokens: int = Field(default=512, ge=1, description="max_tokens when a chat request "
                                    "gives none (capped by the context)")
    request_timeout: float = Field(default=600.0, gt=0, description="seconds a request may take in "
                                   "the engine before it is cancelled (504)")
    startup_timeout: float = Field(default=180.0, gt=0, description="seconds to wait for an engine "
                                   "process to load its model")
    max_restarts: int = Field(default=5, ge=0, description="engine restarts allowed within "
                              "`restart_window` seconds before the model is marked failed")
    restart_window: float = Field(default=300.0, gt=0, description="window for `max_restarts`")
    top_logprobs: int = Field(default=10, ge=0, le=20, description="alternatives requested per token "
                              "by /v1/advice for class probabilities (0 = no probabilities)")
    klines: dict[str, str] = Field(default_factory=dict, description="symbol -> klines parquet, for "
                                   "/v1/advice requests that give a symbol and a time instead of klines")
    log_dir: str | None = Field(default=None, description="where engine process logs go (None = a "
                                "temp dir, printed at start)")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="warning",
                                                                    description="server log level")

    @field_validator("api_key")
    @classmethod
    def _empty_key(cls, v: str | None) -> str | None:
        return v or None

    @model_validator(mode="after")
    def _unique(self) -> "ServeSettings":
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique, repeated: {dup}")
        return self

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("ATM_API_KEY") or None
