"""llama.cpp's native ``llama-server`` as the engine of one GGUF (a child process per model).

Like Ollama's runners: a private 127.0.0.1 port behind a fresh key, ``-np`` slots (continuous
batching, per-slot prompt cache), ``--metrics`` and the GGUF's own chat template. The stock Python
server serializes requests behind one lock; this one batches (1.4-1.75x its requests/s at 8
clients, ~4x with shared prefixes, FIELD-NOTES). A JSON Schema is sent as ATM's GBNF of it
(``grammar``), the grammar llama.cpp in process enforces, never llama-server's own schema grammar. Class probabilities for ``/v1/advice`` come from
one extra grammar-restricted token (``class_probs``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator

from atm.errors import AtmError
from atm.prompting.answer import probs_from_token_probs
from atm.prompting.llama_schema import answer_gbnf
from atm.runtime import llama_server
from atm.serve.engines.base import Capabilities, EngineError, EngineRequest
from atm.serve.engines.http import HTTPUpstream
from atm.serve.engines.supervisor import ManagedProcessEngine


class LlamaServerEngine(ManagedProcessEngine):
    """llama.cpp's ``llama-server`` on one GGUF (one process per served model)."""

    kind = "llama-server"
    capabilities = Capabilities(logprobs=True, class_probs=True, token_prompts=True)
    key_env = llama_server.KEY_ENV

    def __init__(self, name: str, gguf: str | Path, *, ctx_size: int = 2048, threads: int | None = None,
                 binary: str | Path | None = None, ubatch_size: int = 2048, **kw: Any):
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise AtmError(f"{self.gguf}: GGUF file not found (model {name!r})")
        self.ctx_size = ctx_size
        self.threads = threads
        self.ubatch_size = ubatch_size
        self.binary = Path(binary) if binary else None
        self.props: dict[str, Any] = {}
        self.root: HTTPUpstream | None = None
        super().__init__(name, **kw)

    @classmethod
    def from_settings(cls, spec: Any, settings: Any, path: Any) -> "LlamaServerEngine":
        ctx = spec.ctx_size if spec.ctx_size is not None else settings.ctx_size
        return cls(spec.name, path, ctx_size=ctx, threads=settings.threads, ubatch_size=settings.ubatch_size,
                   **cls.common_options(spec, settings), **cls.managed_options(spec, settings))

    def command(self, port: int) -> list[str]:
        return llama_server.command(self.gguf, port=port, alias=self.name,
                                    parallel=self.parallel, ctx_size=self.ctx_size, threads=self.threads,
                                    ubatch_size=self.ubatch_size, exe=self.binary, extra_args=self.extra_args)

    def chat_template(self) -> str | None:
        return self.props.get("chat_template") or None

    async def _after_ready(self) -> None:
        if self.root is not None:
            await self.root.aclose()
        # the server's own routes (/apply-template, /completion, /props), beside its /v1 API
        self.root = self.upstream()
        try:
            props = await self.root.get_json("/props", timeout=10.0)
        except EngineError:
            props = {}
        self.props = props if isinstance(props, dict) else {}
        gen = self.props.get("default_generation_settings") or {}
        self.n_ctx = gen.get("n_ctx") or self.n_ctx

    def map_request(self, req: EngineRequest) -> dict[str, Any]:
        out = req.openai_body()
        out["model"] = self.upstream_model
        if req.json_schema is not None:
            # ATM's grammar of the schema (atm.prompting.llama_schema.answer_gbnf), the one llama.cpp
            # in process enforces too, sent as ``grammar`` (honoured by both endpoints; its
            # /v1/completions ignores response_format). Not llama-server's own json_schema grammar:
            # that one must start with '{' and admits free whitespace, so the same model answered
            # differently here and in process (issue 21).
            try:
                out["grammar"] = answer_gbnf(req.json_schema)
            except ValueError as exc:
                raise EngineError(str(exc), 400, "invalid_request_error", param="response_format") from None
        elif req.json_object:
            # its json_object without a schema answers 500: any JSON object is this schema
            out["json_schema"] = {"type": "object"}
        return out

    # llama-server finishes a non-streamed request even after its client has gone: it notices a
    # closed connection only while streaming (measured: ~2,000 tokens ran to the end after the
    # socket closed). So ATM always streams from it and assembles the non-streamed answer
    # (``_collect``, for ``completion`` here and ``chat`` below); a client that leaves then stops
    # its generation within a token.
    async def completion(self, req: EngineRequest) -> dict[str, Any]:
        return await self._collect(await self.completion_stream(self._with_usage(req)), chat=False)

    @staticmethod
    def _with_usage(req: EngineRequest) -> EngineRequest:
        return req.replace(stream_options={"include_usage": True})

    async def _collect(self, chunks: AsyncIterator[dict[str, Any]], chat: bool) -> dict[str, Any]:
        """The OpenAI non-streamed response from llama-server's stream chunks (text, finish
        reason, per-token logprobs, usage, timings)."""
        first: dict[str, Any] | None = None
        text: list[str] = []
        logprobs: list[Any] = []
        has_logprobs = False
        finish = None
        tail: dict[str, Any] = {}
        async for ch in chunks:
            first = first or ch
            for key in ("usage", "timings"):
                if ch.get(key):
                    tail[key] = ch[key]
            for c in ch.get("choices") or []:
                piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
                if piece:
                    text.append(piece)
                lp = c.get("logprobs")
                if isinstance(lp, dict) and lp.get("content") is not None:
                    has_logprobs = True
                    logprobs.extend(lp["content"])
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
        if first is None:
            raise EngineError(f"{self.kind} for {self.name} sent an empty stream", 502, "upstream_error")
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish,
                                  "logprobs": {"content": logprobs} if has_logprobs else None}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return {"id": first.get("id"), "object": "chat.completion" if chat else "text_completion",
                "created": first.get("created"), "model": self.name,
                "system_fingerprint": first.get("system_fingerprint"), "choices": [choice], **tail}

    async def class_probs(self, messages: list[dict[str, str]], answer_prefix: str,
                          classes: tuple[str, ...]) -> dict[str, float] | None:
        """P(class) of the value that follows ``answer_prefix``, under the model's distribution
        restricted to the classes.

        One extra 1-token request on the same prompt (served from the slot's prompt cache): the
        grammar allows only the classes' first tokens, ``post_sampling_probs`` at temperature 1
        with no top-k/top-p returns the model's probabilities renormalized over exactly those
        tokens. (The log-probs of the generating request are taken before the grammar, so for
        an undertrained model the classes are often not even among the top alternatives.)
        """
        self.check_ready()
        assert self.root is not None
        prompt = await self.apply_template(messages)
        grammar = "root ::= (" + " | ".join(json.dumps(c) for c in classes) + ")"
        out = await self.root.post_json("/completion", {
            "prompt": prompt + answer_prefix, "n_predict": 1, "n_probs": 64,
            "post_sampling_probs": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "min_p": 0.0, "grammar": grammar, "cache_prompt": True})
        alts = (out.get("completion_probabilities") or [{}])[0].get("top_probs") or []
        probs = probs_from_token_probs(((a.get("token", ""), a.get("prob", 0.0)) for a in alts), classes)
        return {c: round(v, 6) for c, v in probs.items()} if probs else None

    async def apply_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of ``messages`` under the GGUF's chat template (llama-server renders it)."""
        self.check_ready()
        assert self.root is not None
        return (await self.root.post_json("/apply-template", {"messages": messages}))["prompt"]

    # Schema-constrained chat goes through /v1/completions on the templated prompt: llama-server's
    # chat endpoint re-parses a constrained answer after generation and answers 500 ("does not
    # match the expected ... format") when max_tokens cut it short; the completion endpoint
    # returns the cut text with finish_reason "length", as the OpenAI API does.
    @staticmethod
    def _as_completion(req: EngineRequest, prompt: str) -> EngineRequest:
        return req.replace(messages=None, prompt=prompt, top_logprobs=None,
                           logprobs=(req.top_logprobs or 1) if req.logprobs else None)

    async def chat(self, req: EngineRequest) -> dict[str, Any]:
        return await self._collect(await self.chat_stream(self._with_usage(req)), chat=True)

    async def chat_stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        if not req.constrained:
            return await super().chat_stream(req)
        prompt = await self.apply_template(req.messages or [])
        src = await self.completion_stream(self._as_completion(req, prompt))

        async def gen():
            first = True
            try:
                async for chunk in src:
                    choices = []
                    for c in chunk.get("choices") or []:
                        delta: dict[str, Any] = {"role": "assistant"} if first else {}
                        if c.get("text"):
                            delta["content"] = c["text"]
                        choices.append({"index": c.get("index", 0), "delta": delta,
                                        "finish_reason": c.get("finish_reason"),
                                        "logprobs": c.get("logprobs")})
                        first = False
                    yield {**chunk, "object": "chat.completion.chunk", "choices": choices}
            finally:
                await src.aclose()
        return gen()

    async def _stop(self) -> None:
        await super()._stop()
        if self.root is not None:
            await self.root.aclose()
            self.root = None
