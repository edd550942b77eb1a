"""``/v1/completions`` with several prompts: one engine request per prompt, one OpenAI answer.

OpenAI, vLLM and llama-server accept ``prompt`` as a text, a list of texts, token ids or a list
of token-id lists, and answer a list with one choice per prompt (``index`` = the prompt's
position). ATM fans a list out into one ``EngineRequest`` per prompt, so every engine serves
lists the same way (llama-server's own multi-prompt answer reports the usage of the first prompt
only); token ids go only to engines that declare ``capabilities.token_prompts`` (others: 400).
The whole list holds one admission and runs at most ``engine.parallel`` prompts at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from atm.serve.api.errors import ApiError
from atm.serve.engines import EngineRequest

MAX_PROMPTS = 256  # prompts in one request (OpenAI allows 2048 token arrays; lm-eval batches far fewer)

Prompt = str | list[int]


def completion_prompts(prompt: Any, engine) -> list[Prompt]:
    """The prompts of a validated ``CompletionRequest.prompt``, each a text or a list of token ids
    (400 for an empty list or prompt, too many prompts, or token ids to an engine without them)."""
    if isinstance(prompt, str):
        prompts: list[Prompt] = [prompt]
    elif not prompt:
        raise ApiError(400, "prompt is an empty list: send a text, token ids or a list of them", param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request (got {len(prompts)})", param="prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, list):
            if not p:
                raise ApiError(400, f"prompt {i} is an empty list of token ids", param="prompt")
            if not engine.capabilities.token_prompts:
                raise ApiError(400, f"model {engine.name!r} ({engine.kind} engine) cannot take a prompt "
                               "given as token ids; send the prompt as text", param="prompt")
    return prompts


def _add_usage(total: dict[str, int] | None, usage: dict[str, Any] | None) -> dict[str, int] | None:
    if not usage:
        return total
    total = dict(total or {})
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        if isinstance(usage.get(k), int):
            total[k] = total.get(k, 0) + usage[k]
    return total


def merge_completions(responses: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One ``text_completion`` from one response per prompt: choice ``index`` = prompt position,
    usage summed."""
    out = {k: v for k, v in responses[0].items() if k not in ("choices", "usage")}
    choices, usage = [], None
    for i, resp in enumerate(responses):
        for c in resp.get("choices") or []:
            choices.append({**c, "index": i})
        usage = _add_usage(usage, resp.get("usage"))
    out["choices"] = choices
    if usage:
        out["usage"] = usage
    return out


async def gather_completions(call: Callable[[EngineRequest], Awaitable[dict[str, Any]]],
                             reqs: Sequence[EngineRequest], limit: int) -> dict[str, Any]:
    """``call`` on every request, at most ``limit`` at a time; the first error cancels the rest."""
    sem = asyncio.Semaphore(max(1, limit))

    async def one(r: EngineRequest) -> dict[str, Any]:
        async with sem:
            return await call(r)

    tasks = [asyncio.ensure_future(one(r)) for r in reqs]
    try:
        return merge_completions(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)


async def merged_stream(call: Callable[[EngineRequest], Awaitable[AsyncIterator[dict[str, Any]]]],
                        reqs: Sequence[EngineRequest]) -> AsyncIterator[dict[str, Any]]:
    """One chunk stream from one stream per prompt (each chunk's choice ``index`` = its prompt's
    position, in the order chunks arrive); the streams are opened before this returns, so an
    engine error is an HTTP status. Usage chunks are summed into one, sent last."""
    streams: list[AsyncIterator[dict[str, Any]]] = []
    try:
        for r in reqs:
            streams.append(await call(r))
    except BaseException:
        for s in streams:
            with contextlib.suppress(BaseException):
                await s.aclose()
        raise
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, s: AsyncIterator[dict[str, Any]]) -> None:
        try:
            async for chunk in s:
                await queue.put((i, chunk))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    async def gen() -> AsyncIterator[dict[str, Any]]:
        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        usage, last, open_ = None, None, len(tasks)
        try:
            while open_:
                i, item = await queue.get()
                if item is done:
                    open_ -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                usage = _add_usage(usage, item.get("usage"))
                last = item
                choices = [{**c, "index": i} for c in item.get("choices") or []]
                if choices:
                    yield {**{k: v for k, v in item.items() if k != "usage"}, "choices": choices}
            if usage and last is not None:
                yield {**{k: v for k, v in last.items() if k != "usage"}, "choices": [], "usage": usage}
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                with contextlib.suppress(BaseException):
                    await s.aclose()
    return gen()
