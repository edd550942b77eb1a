"""Engines reached over HTTP: the client every upstream shares and the OpenAI-API engine base.

``HTTPUpstream`` maps transport failures to 503 (unreachable, died mid-request) or 504 (timed
out) and upstream error statuses to what ATM answers (503/429 pass through, 404 is a gateway
problem: 502, other 4xx a 400 with the upstream's message, 5xx 502). ``sse_json`` reads an
OpenAI server-sent-event stream. ``OpenAIUpstreamEngine`` is every engine that speaks the OpenAI
API upstream (llama-server, vLLM, a remote server): it maps an ``EngineRequest`` to the upstream's
body (``map_request``, overridden per engine) and renames the upstream's model to the served name.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from atm.serve.engines.base import (Capabilities, Engine, EngineBusy, EngineError, EngineRequest,
                                    EngineUnavailable)


def error_message(body: bytes | str) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        obj = json.loads(text)
    except ValueError:
        return text.strip()[:500] or "(empty body)"
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    if err:
        return str(err)
    if isinstance(obj, dict) and "detail" in obj:
        return str(obj["detail"])
    return text.strip()[:500]


def upstream_error(status: int, body: bytes | str, who: str) -> EngineError:
    msg = error_message(body)
    if status == 503:
        return EngineUnavailable(f"{who}: {msg}")
    if status == 429:
        return EngineBusy(f"{who}: {msg}")
    if status == 404:
        # the upstream does not know the model (remote) or the route: a gateway problem for us
        return EngineError(f"{who}: {msg}", 502, "upstream_error")
    if 400 <= status < 500:
        return EngineError(msg, 400, "invalid_request_error")
    return EngineError(f"{who} failed ({status}): {msg}", 502, "upstream_error")


class HTTPUpstream:
    """An HTTP client to one upstream, mapping transport failures to 503."""

    def __init__(self, base_url: str, who: str, api_key: str | None = None,
                 timeout: float = 600.0, max_connections: int = 512):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.who = who
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            trust_env=False)  # never route 127.0.0.1 through a proxy from the environment
        self._httpx = httpx

    async def aclose(self) -> None:
        await self.client.aclose()

    def _transport_error(self, exc: Exception) -> EngineError:
        httpx = self._httpx
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return EngineError(f"{self.who} did not answer in time ({type(exc).__name__})", 504,
                               "timeout")
        return EngineUnavailable(f"{self.who} is unreachable or died during the request "
                                 f"({type(exc).__name__}); retry shortly")

    async def get_json(self, path: str, timeout: float | None = None) -> Any:
        try:
            r = await self.client.get(path, timeout=timeout) if timeout else await self.client.get(path)
        except self._httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if r.status_code != 200:
            raise upstream_error(r.status_code, r.content, self.who)
        return r.json()

    async def post_json(self, path: str, payload: dict[str, Any]) -> Any:
        try:
            r = await self.client.post(path, json=payload)
        except self._httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if r.status_code != 200:
            raise upstream_error(r.status_code, r.content, self.who)
        try:
            return r.json()
        except ValueError:
            raise EngineError(f"{self.who} answered with invalid JSON", 502, "upstream_error") from None

    async def open_lines(self, path: str, payload: dict[str, Any]) -> AsyncIterator[str]:
        """POST and return an iterator over the response lines, after checking the status.

        The request is sent (and its status checked) before this returns, so an upstream error
        becomes an HTTP error status rather than an error in the middle of a stream.
        """
        req = self.client.build_request("POST", path, json=payload)
        try:
            resp = await self.client.send(req, stream=True)
        except self._httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if resp.status_code != 200:
            body = await resp.aread()
            await resp.aclose()
            raise upstream_error(resp.status_code, body, self.who)

        async def lines() -> AsyncIterator[str]:
            try:
                async for line in resp.aiter_lines():
                    if line:
                        yield line
            except self._httpx.HTTPError as exc:
                raise self._transport_error(exc) from None
            finally:
                await resp.aclose()  # closing early (client gone) makes the upstream stop

        return lines()


def sse_json(lines: AsyncIterator[str], who: str) -> AsyncIterator[dict[str, Any]]:
    async def gen():
        async for line in lines:
            if line.startswith("data:"):
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    obj = json.loads(data)
                except ValueError:
                    raise EngineError(f"{who} sent an invalid stream chunk", 502, "upstream_error") from None
                if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
                    raise EngineError(f"{who}: {error_message(data)}", 502, "upstream_error")
                yield obj
            elif line.startswith("error:"):
                raise EngineError(f"{who}: {line[6:].strip()}", 502, "upstream_error")
    return gen()


class OpenAIUpstreamEngine(Engine):
    """An engine reached over the OpenAI API (``{base}/chat/completions`` …)."""

    kind = "openai"
    capabilities = Capabilities(logprobs=True)

    def __init__(self, name: str, *, upstream_model: str | None = None, **kw: Any):
        super().__init__(name, **kw)
        self.upstream_model = upstream_model or name
        self.http: HTTPUpstream | None = None

    # request mapping (overridden per engine) ----------------------------------------------------
    def map_request(self, req: EngineRequest) -> dict[str, Any]:
        """The upstream's request body: OpenAI fields, the constraint as ``response_format``."""
        out = req.openai_body()
        out["model"] = self.upstream_model
        if req.json_schema is not None:
            out["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "answer", "schema": req.json_schema,
                                                      "strict": True}}
        elif req.json_object:
            out["response_format"] = {"type": "json_object"}
        return out

    def _rename(self, obj: dict[str, Any]) -> dict[str, Any]:
        if isinstance(obj, dict) and "model" in obj:
            obj["model"] = self.name
        return obj

    def _http(self) -> HTTPUpstream:
        self.check_ready()
        assert self.http is not None
        return self.http

    async def chat(self, req: EngineRequest) -> dict[str, Any]:
        return self._rename(await self._http().post_json("/chat/completions", self.map_request(req)))

    async def completion(self, req: EngineRequest) -> dict[str, Any]:
        return self._rename(await self._http().post_json("/completions", self.map_request(req)))

    async def _stream(self, path: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        payload = {**payload, "stream": True}
        lines = await self._http().open_lines(path, payload)
        src = sse_json(lines, self.http.who if self.http else self.name)

        async def gen():
            async for obj in src:
                yield self._rename(obj)
        return gen()

    async def chat_stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        return await self._stream("/chat/completions", self.map_request(req))

    async def completion_stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        return await self._stream("/completions", self.map_request(req))

    async def _stop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None
