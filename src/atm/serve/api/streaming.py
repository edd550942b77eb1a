"""Streamed answers: OpenAI server-sent events and Ollama NDJSON, from an engine's chunk stream.

A streamed response holds the engine's admission for its whole life and releases it exactly once,
however it ends (finished, engine error mid-stream, client gone, even before the first chunk:
the body generator never starts then). The stream is opened (and admitted) before answering 200,
so an engine error before the first token gets a real status.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator, Callable

from starlette.responses import StreamingResponse

from atm.serve import ollama_codec
from atm.serve.api.errors import dumps
from atm.serve.api.metrics import Metrics
from atm.serve.engines import EngineError, EngineRequest


class Admission:
    """An engine admission held for the life of a streamed response; released exactly once."""

    def __init__(self, engine):
        self.cm = engine.admit()
        self.held = False

    async def enter(self):
        await self.cm.__aenter__()
        self.held = True

    async def release(self):
        if self.held:
            self.held = False
            await self.cm.__aexit__(None, None, None)


class Stream(StreamingResponse):
    """Releases the admission and closes the engine stream however the response ends."""

    def __init__(self, content, stream, adm: Admission, **kw):
        super().__init__(content, **kw)
        self._engine_stream, self._adm = stream, adm

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(BaseException):
                await self._engine_stream.aclose()
            await self._adm.release()


async def open_stream(m, call: Callable, ereq: EngineRequest):
    """Admit and open the engine stream (``call(ereq)``) before answering 200."""
    adm = Admission(m.engine)
    await adm.enter()
    try:
        stream = await call(ereq)
    except BaseException:
        await adm.release()
        raise
    return stream, adm


def sse(metrics: Metrics, m, stream, adm: Admission, t0: float) -> StreamingResponse:
    """OpenAI ``data: {chunk}`` events, ``data: [DONE]`` at the end; an engine error mid-stream is
    an error event (the status line is already sent)."""
    async def body() -> AsyncIterator[bytes]:
        first = True
        try:
            async for chunk in stream:
                if first:
                    metrics.ttft.labels(m.name).observe(time.perf_counter() - t0)
                    first = False
                if chunk.get("usage"):
                    metrics.usage(m.name, chunk["usage"])
                yield b"data: " + dumps(chunk) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except EngineError as exc:
            yield b"data: " + dumps({"error": {"message": exc.message, "type": exc.type,
                                               "code": exc.status}}) + b"\n\n"
        finally:
            with contextlib.suppress(BaseException):
                await stream.aclose()
            await adm.release()
    return Stream(body(), stream, adm, media_type="text/event-stream",
                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def ndjson(metrics: Metrics, m, stream, adm: Admission, t_start: float, chat: bool,
           as_chat: bool | None = None) -> StreamingResponse:
    """Ollama NDJSON from an engine stream; ``chat``: the engine stream is chat chunks (delta),
    ``as_chat``: answer /api/chat shapes (message) rather than /api/generate (response)."""
    as_chat = chat if as_chat is None else as_chat

    async def body() -> AsyncIterator[bytes]:
        last: dict[str, Any] = {}
        finish = None
        try:
            async for chunk in stream:
                if chunk.get("usage"):
                    last["usage"] = chunk["usage"]
                    metrics.usage(m.name, chunk["usage"])
                if chunk.get("timings"):
                    last["timings"] = chunk["timings"]
                for ch in chunk.get("choices") or []:
                    finish = ch.get("finish_reason") or finish
                    text = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                    if text:
                        yield dumps(ollama_codec.piece(m.name, text, as_chat)) + b"\n"
            final = ollama_codec.final(m.name, {**last, "choices": [{"finish_reason": finish}]}, t_start,
                                       ollama_codec.answer("", as_chat))
            yield dumps(final) + b"\n"
        except EngineError as exc:
            yield dumps({"error": exc.message}) + b"\n"
        finally:
            with contextlib.suppress(BaseException):
                await stream.aclose()
            await adm.release()
    return Stream(body(), stream, adm, media_type="application/x-ndjson")
