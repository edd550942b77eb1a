"""A proxy to a remote OpenAI-compatible server (``…/v1``) or an Ollama server.

Over the OpenAI API the request passes as it is (``OpenAIUpstreamEngine``); over the Ollama API it
is translated by ``atm.serve.ollama_codec`` to ``/api/chat`` / ``/api/generate`` and back.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any, AsyncIterator

from atm.errors import AtmError
from atm.serve import ollama_codec
from atm.serve.engines.base import Capabilities, EngineError, EngineRequest
from atm.serve.engines.http import HTTPUpstream, OpenAIUpstreamEngine


class RemoteEngine(OpenAIUpstreamEngine):
    kind = "remote"
    serves = "url"

    def __init__(self, name: str, url: str, *, api: str = "openai", api_key: str | None = None, **kw: Any):
        super().__init__(name, **kw)
        self.url = url.rstrip("/")
        self.api = api
        self.api_key = api_key or os.environ.get("ATM_UPSTREAM_API_KEY")
        # an OpenAI upstream takes token-id prompts (or answers 4xx itself); Ollama's API cannot
        self.capabilities = Capabilities(logprobs=api == "openai", token_prompts=api == "openai")

    @classmethod
    def from_settings(cls, spec: Any, settings: Any, path: Any) -> "RemoteEngine":
        if not spec.upstream:
            raise AtmError(f"model {spec.name!r}: the remote engine needs `upstream:` (a base URL)")
        return cls(spec.name, spec.upstream, api=spec.upstream_api, upstream_model=spec.upstream_model,
                   api_key=spec.upstream_api_key, **cls.common_options(spec, settings))

    async def _start(self) -> None:
        self.http = HTTPUpstream(self.url, who=f"remote {self.api} server {self.url}",
                                 api_key=self.api_key, timeout=self.request_timeout)
        self.state = "ready"
        try:
            if self.api == "openai":
                await self.http.get_json("/models", timeout=10.0)
            else:
                await self.http.get_json("/api/version", timeout=10.0)
        except EngineError as exc:
            await self.http.aclose()
            self.http = None
            raise AtmError(f"remote model {self.name!r}: {self.url} does not answer: {exc.message}") from None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": self.url, "api": self.api}

    # --- Ollama upstream -----------------------------------------------------------------------
    async def _ollama(self, req: EngineRequest) -> dict[str, Any]:
        path = "/api/chat" if req.chat else "/api/generate"
        obj = await self._http().post_json(path, ollama_codec.upstream_payload(req, self.upstream_model, False))
        return ollama_codec.openai_response(obj, self.name, req.chat)

    async def _ollama_stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        path = "/api/chat" if req.chat else "/api/generate"
        lines = await self._http().open_lines(path, ollama_codec.upstream_payload(req, self.upstream_model, True))
        cid = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        async def gen():
            async for line in lines:
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise EngineError(f"{self.url} sent an invalid NDJSON line", 502, "upstream_error") from None
                if obj.get("error"):
                    raise EngineError(f"{self.url}: {obj['error']}", 502, "upstream_error")
                yield ollama_codec.openai_chunk(obj, self.name, req.chat, cid, created)
                if obj.get("done"):
                    return
        return gen()

    async def chat(self, req: EngineRequest) -> dict[str, Any]:
        return await (super().chat(req) if self.api == "openai" else self._ollama(req))

    async def completion(self, req: EngineRequest) -> dict[str, Any]:
        return await (super().completion(req) if self.api == "openai" else self._ollama(req))

    async def chat_stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        return await (super().chat_stream(req) if self.api == "openai" else self._ollama_stream(req))

    async def completion_stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        return await (super().completion_stream(req) if self.api == "openai" else self._ollama_stream(req))
