"""``vllm serve MODEL_DIR`` as an engine (CUDA machines), launched like llama-server.

JSON Schemas go to vLLM's ``structured_outputs`` (vLLM >= 0.12; the old ``guided_json`` is removed
and ignored). ``upstream`` attaches to a vLLM server already running instead of launching one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atm.runtime import vllm
from atm.serve.engines.base import EngineError, EngineRequest
from atm.serve.engines.http import HTTPUpstream
from atm.serve.engines.supervisor import ManagedProcessEngine


class VLLMEngine(ManagedProcessEngine):
    kind = "vllm"
    serves = "hf"
    key_env = vllm.KEY_ENV

    def __init__(self, name: str, model_dir: str | Path, *, ctx_size: int = 2048,
                 upstream: str | None = None, binary: str | None = None, **kw: Any):
        self.model_dir = str(model_dir)
        self.ctx_size = ctx_size
        self.upstream_url = upstream
        self.binary = binary
        super().__init__(name, **kw)

    @classmethod
    def from_settings(cls, spec: Any, settings: Any, path: Any) -> "VLLMEngine":
        ctx = spec.ctx_size if spec.ctx_size is not None else settings.ctx_size
        return cls(spec.name, path or "", ctx_size=ctx, upstream=spec.upstream,
                   **cls.common_options(spec, settings), **cls.managed_options(spec, settings))

    def command(self, port: int) -> list[str]:
        return vllm.command(self.model_dir, port=port, served_name=self.name,
                            max_num_seqs=self.parallel, max_model_len=self.ctx_size or None, exe=self.binary,
                            extra_args=self.extra_args)

    async def _start(self) -> None:
        if self.upstream_url:
            self.http = HTTPUpstream(self.upstream_url, who=f"vllm for {self.name}", timeout=self.request_timeout)
            self.state = "ready"
            await self._after_ready()
            return
        await super()._start()

    async def _after_ready(self) -> None:
        try:
            models = await self._http().get_json("/models")
            for m in models.get("data", []):
                if m.get("id") == self.upstream_model and m.get("max_model_len"):
                    self.n_ctx = int(m["max_model_len"])
        except (EngineError, AttributeError, ValueError, TypeError):
            pass

    def map_request(self, req: EngineRequest) -> dict[str, Any]:
        out = req.openai_body()
        out["model"] = self.upstream_model
        if req.json_schema is not None:
            out["structured_outputs"] = {"json": req.json_schema}
        elif req.json_object:
            out["structured_outputs"] = {"json_object": True}
        return out
