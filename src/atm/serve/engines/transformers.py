"""An HF causal LM in this process, requests with equal sampling settings decoded together.

GPU machines mostly (a plain CPU path works). The model is loaded by ``atm.runtime.hf``; schemas
are enforced token by token by ``atm.prompting.hf_constraint`` (lm-format-enforcer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from atm.errors import AtmError, MissingDependency
from atm.runtime.hf import load_causal_lm
from atm.serve.engines.base import Capabilities, Engine, EngineError, EngineRequest


class TransformersEngine(Engine):
    """An HF causal LM in this process; requests with equal sampling settings share a batch.

    A worker task drains the queue: it takes the oldest request and every waiting request with
    the same (max_tokens, temperature, top_p, seed, schema) up to ``parallel``, left-pads them into
    one batch and calls ``generate`` in a thread (the event loop keeps serving). ``json_schema`` and
    ``json_object`` are enforced token by token (``atm.prompting.hf_constraint``, lm-format-enforcer),
    as llama-server does natively. Streaming sends the whole answer as one chunk.
    """

    kind = "transformers"
    serves = "hf"
    capabilities = Capabilities(token_prompts=True)

    def __init__(self, name: str, model_dir: str | Path, *, ctx_size: int = 2048,
                 device: str | None = None, **kw: Any):
        super().__init__(name, **kw)
        self.model_dir = Path(model_dir)
        self.ctx_size = ctx_size
        self.device = device
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.model = None
        self.tok = None

    @classmethod
    def from_settings(cls, spec: Any, settings: Any, path: Any) -> "TransformersEngine":
        ctx = spec.ctx_size if spec.ctx_size is not None else settings.ctx_size
        return cls(spec.name, path, ctx_size=ctx, **cls.common_options(spec, settings))

    async def _start(self) -> None:
        if not self.model_dir.is_dir():
            raise AtmError(f"{self.model_dir}: HF model directory not found (model {self.name!r})")
        await asyncio.to_thread(self._load)
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._work(), name=f"hf-{self.name}")

    def _load(self) -> None:
        lm = load_causal_lm(self.model_dir, self.device)
        self.model, self.tok, self.device = lm.model, lm.tokenizer, lm.device
        trained = getattr(self.model.config, "max_position_embeddings", None) or self.ctx_size
        self.n_ctx = min(self.ctx_size, trained) if self.ctx_size else trained
        with contextlib.suppress(MissingDependency):  # the schema table: one vocab pass, done before requests
            from atm.prompting.hf_constraint import token_table

            token_table(self.tok)

    async def _stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self.model = None

    def _prompt_ids(self, req: EngineRequest) -> list[int]:
        if req.chat:
            ids = self.tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            return list(ids)
        if isinstance(req.prompt, list):  # token ids, used as they are
            n = len(self.tok)
            bad = next((t for t in req.prompt if not 0 <= t < n), None)
            if bad is not None:
                raise EngineError(f"prompt token id {bad} is outside the model's vocabulary of {n}",
                                  400, "invalid_request_error", param="prompt")
            return list(req.prompt)
        return list(self.tok(req.prompt, add_special_tokens=False)["input_ids"])

    async def _submit(self, req: EngineRequest) -> dict[str, Any]:
        self.check_ready()
        chat = req.chat
        ids = self._prompt_ids(req)
        max_new = int(req.max_tokens or 16)
        if self.n_ctx and len(ids) + 1 > self.n_ctx:
            raise EngineError(f"the prompt has {len(ids)} tokens; the context is {self.n_ctx}",
                              400, "invalid_request_error", param="messages" if chat else "prompt")
        if self.n_ctx:
            max_new = max(1, min(max_new, self.n_ctx - len(ids)))
        fut = asyncio.get_running_loop().create_future()
        schema = None
        if req.constrained:
            schema = json.dumps(req.json_schema, sort_keys=True)  # "null" = any JSON object
        key = (max_new, float(req.temperature if req.temperature is not None else 1.0),
               float(req.top_p or 1.0), req.seed, schema)
        assert self._queue is not None
        await self._queue.put((key, ids, fut))
        text, n_out, finish = await fut
        stops = req.stop or []
        for s in [stops] if isinstance(stops, str) else stops:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out}
        created = int(time.time())
        if chat:
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                    "model": self.name, "usage": usage,
                    "choices": [{"index": 0, "finish_reason": finish,
                                 "message": {"role": "assistant", "content": text}}]}
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created,
                "model": self.name, "usage": usage,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            first = await self._queue.get()
            batch = [first]
            rest = []
            while not self._queue.empty():
                item = self._queue.get_nowait()
                (batch if item[0] == first[0] and len(batch) < self.parallel else rest).append(item)
            for item in rest:  # different settings: next round
                self._queue.put_nowait(item)
            live = [b for b in batch if not b[2].done()]  # cancelled (client gone) are skipped
            if not live:
                continue
            try:
                outs = await asyncio.to_thread(self._generate, first[0], [b[1] for b in live])
            except Exception as exc:  # noqa: BLE001 - reported to each waiting request
                for _, _, fut in live:
                    if not fut.done():
                        fut.set_exception(EngineError(f"generation failed: {exc}", 500))
                continue
            for (_, _, fut), out in zip(live, outs):
                if not fut.done():
                    fut.set_result(out)

    def _generate(self, key, batch_ids: list[list[int]]) -> list[tuple[str, int, str]]:
        import torch

        max_new, temperature, top_p, seed, schema = key
        if seed is not None:
            torch.manual_seed(int(seed))
        width = max(len(x) for x in batch_ids)
        pad = self.tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch_ids], device=self.device)
        kw: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": pad}
        if schema is not None:
            from atm.prompting.hf_constraint import schema_processor

            kw["logits_processor"] = [schema_processor(self.tok, json.loads(schema))]
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kw.update(do_sample=False)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kw)
        results = []
        eos = self.tok.eos_token_id
        for row in out[:, width:].tolist():
            n = len(row)
            finish = "length"
            if eos in row:
                row, finish = row[: row.index(eos)], "stop"
                n = len(row) + 1
            results.append((self.tok.decode(row, skip_special_tokens=True), n, finish))
        return results

    async def chat(self, req: EngineRequest) -> dict[str, Any]:
        return await self._submit(req)

    async def completion(self, req: EngineRequest) -> dict[str, Any]:
        return await self._submit(req)

    async def _one_chunk(self, resp: dict[str, Any], chat: bool) -> AsyncIterator[dict[str, Any]]:
        ch = resp["choices"][0]
        if chat:
            yield {"id": resp["id"], "object": "chat.completion.chunk", "created": resp["created"],
                   "model": self.name, "choices": [{"index": 0, "delta": {
                       "role": "assistant", "content": ch["message"]["content"]}, "finish_reason": None}]}
            yield {"id": resp["id"], "object": "chat.completion.chunk", "created": resp["created"],
                   "model": self.name, "usage": resp["usage"],
                   "choices": [{"index": 0, "delta": {}, "finish_reason": ch["finish_reason"]}]}
        else:
            yield {**resp, "choices": [{**ch}]}

    async def chat_stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        return self._one_chunk(await self._submit(req), True)

    async def completion_stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        return self._one_chunk(await self._submit(req), False)
