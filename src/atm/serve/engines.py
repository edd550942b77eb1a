"""Engines behind ``atm serve``: what actually runs the model.

Every engine speaks one internal protocol: an OpenAI-shaped request dict in (``model``,
``messages`` or ``prompt``, ``max_tokens``, ``temperature``, ``seed``, ``stop``, ``json_schema``
(already a plain JSON Schema or None), ``logprobs``/``top_logprobs``), an OpenAI-shaped response
dict (or chunk dicts when streaming) out. The API layer (``atm.serve.app``) validates requests,
translates the Ollama API to this protocol and back, and counts; engines only run models.

- ``LlamaServerEngine``: llama.cpp's native ``llama-server`` as a child process per model (like
  Ollama's runners), on a private 127.0.0.1 port, with ``-np`` slots (continuous batching, per-slot
  prompt cache), ``--metrics`` and the GGUF's own chat template. The stock Python server
  serializes requests behind one lock; this one batches (1.4-1.75x its requests/s at 8 clients,
  ~4x with shared prefixes, FIELD-NOTES). A process that dies is restarted; requests in flight
  get 503 (their connection drops), requests arriving meanwhile get 503 + Retry-After at once.
- ``VLLMEngine``: ``vllm serve`` launched the same way (CUDA only); schemas go to its
  ``structured_outputs``.
- ``RemoteEngine``: a proxy to any OpenAI-compatible server (``…/v1``) or an Ollama server.
- ``TransformersEngine``: an HF model dir in this process, requests with the same sampling
  settings decoded together in one padded batch (GPU machines; a plain CPU path works).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from atm.errors import AtmError, MissingDependency

# ---------------------------------------------------------------------------------------------
# errors an engine raises; the API layer turns them into HTTP statuses


class EngineError(Exception):
    """An error with the HTTP status and OpenAI error type the API should answer with."""

    def __init__(self, message: str, status: int = 500, type: str = "server_error",
                 retry_after: float | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.retry_after = retry_after
        self.param = param


class EngineUnavailable(EngineError):
    """The engine is starting, restarting or its process died under the request: 503."""

    def __init__(self, message: str, retry_after: float = 2.0):
        super().__init__(message, 503, "service_unavailable", retry_after=retry_after)


class EngineBusy(EngineError):
    """All slots busy and the queue full: 429 with Retry-After."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message, 429, "rate_limit_error", retry_after=retry_after)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when atm serve dies, even by SIGKILL (Linux), so no
    orphaned engine keeps a port and memory."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# JSON Schema preparation

def llama_safe_schema(schema: Any) -> Any:
    """A copy of ``schema`` whose regexes (``pattern``, ``patternProperties``) llama.cpp enforces.

    llama.cpp's schema-to-grammar converter knows few regex escapes: on ``\\d``, ``\\w``, ``\\s``
    it logs a warning and **accepts any string**, so a pattern like ``^\\d+\\.\\d{8}$`` would
    silently not constrain anything; its Python twin emits ``\\.`` in a form its grammar parser
    rejects (the stock server segfaults, FIELD-NOTES). Rewritten here into forms it handles:
    ``\\.`` -> ``[.]``, ``\\d`` -> ``[0-9]``, ``\\w`` -> ``[0-9A-Za-z_]``, ``\\s`` -> ``[ \\t\\n\\r]``
    (and their negations), escaped punctuation to the literal. A regex feature it cannot enforce
    (``\\b``, back-references, ``\\p{..}`` ...) raises ``ValueError`` rather than being ignored.
    """
    if isinstance(schema, dict):
        out = {}
        for k, v in schema.items():
            if k == "pattern" and isinstance(v, str):
                out[k] = llama_regex(v)
            elif k == "patternProperties" and isinstance(v, dict):
                out[k] = {llama_regex(pk): llama_safe_schema(pv) for pk, pv in v.items()}
            else:
                out[k] = llama_safe_schema(v)
        return out
    if isinstance(schema, list):
        return [llama_safe_schema(x) for x in schema]
    return schema


_CLASS_OUT = {"d": "[0-9]", "D": "[^0-9]", "w": "[0-9A-Za-z_]", "W": "[^0-9A-Za-z_]",
              "s": "[ \\t\\n\\r]", "S": "[^ \\t\\n\\r]"}
_CLASS_IN = {"d": "0-9", "w": "0-9A-Za-z_", "s": " \\t\\n\\r"}
_GBNF_ESCAPES = set("trn\\\"[]-xuU")  # escapes llama.cpp's grammar parser reads itself
_REGEX_SPECIAL = set("^$.[]()|{}*+?")  # escaped outside a class, kept escaped


def llama_regex(rx: str) -> str:
    out: list[str] = []
    i, in_class = 0, False
    while i < len(rx):
        c = rx[i]
        if c == "\\" and i + 1 < len(rx):
            nxt = rx[i + 1]
            i += 2
            if in_class:
                if nxt == ".":
                    out.append(".")
                elif nxt in _CLASS_IN:
                    out.append(_CLASS_IN[nxt])
                elif nxt in _GBNF_ESCAPES:
                    out.append("\\" + nxt)
                elif not nxt.isalnum():
                    out.append(nxt)  # \/ \: \. ... are the plain character in a class
                else:
                    raise ValueError(f"pattern {rx!r}: \\{nxt} inside [...] cannot be enforced by llama.cpp")
            else:
                if nxt == ".":
                    out.append("[.]")
                elif nxt in _CLASS_OUT:
                    out.append(_CLASS_OUT[nxt])
                elif nxt in _REGEX_SPECIAL or nxt in _GBNF_ESCAPES:
                    out.append("\\" + nxt)
                elif not nxt.isalnum():
                    out.append(nxt)
                else:
                    raise ValueError(f"pattern {rx!r}: \\{nxt} cannot be enforced by llama.cpp's grammar")
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# the interface


class Engine:
    """One served model. Subclasses implement ``_start``/``_stop`` and the four calls."""

    kind = "engine"
    supports_logprobs = False
    supports_json_schema = True

    def __init__(self, name: str, *, parallel: int = 8, max_queue: int = 64,
                 request_timeout: float = 600.0):
        self.name = name
        self.parallel = parallel
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.inflight = 0
        self.state = "stopped"  # stopped | starting | ready | restarting | failed
        self.error: str | None = None
        self.restarts = 0
        self.n_ctx: int | None = None  # per-request context (prompt + answer), when known

    # lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.state = "starting"
        try:
            await self._start()
        except Exception as exc:
            self.state = "failed"
            self.error = str(exc)
            raise
        self.state = "ready"

    async def stop(self) -> None:
        self.state = "stopped"
        await self._stop()

    async def _start(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    async def _stop(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def check_ready(self) -> None:
        if self.state != "ready":
            detail = f": {self.error}" if self.error and self.state == "failed" else ""
            raise EngineUnavailable(f"model {self.name!r} is {self.state}{detail}",
                                    retry_after=2.0 if self.state != "failed" else 30.0)

    @contextlib.asynccontextmanager
    async def admit(self):
        """Admission control: at most ``parallel + max_queue`` requests in the engine at once."""
        self.check_ready()
        if self.inflight >= self.parallel + self.max_queue:
            raise EngineBusy(f"model {self.name!r} is at capacity ({self.parallel} slots busy and "
                             f"{self.max_queue} requests queued); retry later")
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "engine": self.kind, "state": self.state, "error": self.error,
                "restarts": self.restarts, "inflight": self.inflight, "parallel": self.parallel,
                "n_ctx": self.n_ctx}

    # calls ------------------------------------------------------------------------------------
    async def chat(self, req: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    async def chat_stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError

    async def completion(self, req: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    async def completion_stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# HTTP upstream (llama-server, vllm serve, remote OpenAI / Ollama)


def _error_message(body: bytes | str) -> str:
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


def _upstream_error(status: int, body: bytes | str, who: str) -> EngineError:
    msg = _error_message(body)
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
            raise _upstream_error(r.status_code, r.content, self.who)
        return r.json()

    async def post_json(self, path: str, payload: dict[str, Any]) -> Any:
        try:
            r = await self.client.post(path, json=payload)
        except self._httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if r.status_code != 200:
            raise _upstream_error(r.status_code, r.content, self.who)
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
            raise _upstream_error(resp.status_code, body, self.who)

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


def _sse_json(lines: AsyncIterator[str], who: str) -> AsyncIterator[dict[str, Any]]:
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
                    raise EngineError(f"{who}: {_error_message(data)}", 502, "upstream_error")
                yield obj
            elif line.startswith("error:"):
                raise EngineError(f"{who}: {line[6:].strip()}", 502, "upstream_error")
    return gen()


class OpenAIUpstreamEngine(Engine):
    """An engine reached over the OpenAI API (``{base}/chat/completions`` …)."""

    kind = "openai"
    supports_logprobs = True

    def __init__(self, name: str, *, upstream_model: str | None = None, **kw: Any):
        super().__init__(name, **kw)
        self.upstream_model = upstream_model or name
        self.http: HTTPUpstream | None = None

    # request mapping (overridden per engine) ----------------------------------------------------
    def map_request(self, req: dict[str, Any], chat: bool) -> dict[str, Any]:
        out = {k: v for k, v in req.items() if v is not None and k not in ("json_schema", "json_object")}
        out["model"] = self.upstream_model
        if req.get("json_schema") is not None:
            out["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "answer", "schema": req["json_schema"],
                                                      "strict": True}}
        elif req.get("json_object"):
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

    async def chat(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._rename(await self._http().post_json("/chat/completions", self.map_request(req, True)))

    async def completion(self, req: dict[str, Any]) -> dict[str, Any]:
        return self._rename(await self._http().post_json("/completions", self.map_request(req, False)))

    async def _stream(self, path: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        payload = {**payload, "stream": True}
        lines = await self._http().open_lines(path, payload)
        src = _sse_json(lines, self.http.who if self.http else self.name)

        async def gen():
            async for obj in src:
                yield self._rename(obj)
        return gen()

    async def chat_stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return await self._stream("/chat/completions", self.map_request(req, True))

    async def completion_stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return await self._stream("/completions", self.map_request(req, False))

    async def _stop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None


# ---------------------------------------------------------------------------------------------
# managed child processes (llama-server, vllm serve)


class ManagedProcessEngine(OpenAIUpstreamEngine):
    """An OpenAI-speaking server run as a child process on a private 127.0.0.1 port.

    Supervision: a watcher task awaits the process; if it exits while we did not stop it, the
    engine goes to ``restarting`` (new requests get 503 + Retry-After at once; in-flight requests
    see their connection drop and get 503), a new process is spawned and health-waited, and the
    engine is ``ready`` again. More than ``max_restarts`` deaths within ``restart_window`` seconds
    mark it ``failed`` (503 with the reason) instead of looping forever.
    """

    health_path = "/health"

    def __init__(self, name: str, *, startup_timeout: float = 180.0, max_restarts: int = 5,
                 restart_window: float = 300.0, log_dir: str | Path | None = None,
                 extra_args: list[str] | None = None, **kw: Any):
        super().__init__(name, **kw)
        self.startup_timeout = startup_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.extra_args = list(extra_args or [])
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "atm-serve-logs"
        self.log_path = self.log_dir / f"{safe}-{os.getpid()}-{uuid.uuid4().hex[:6]}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.port: int | None = None
        self._watcher: asyncio.Task | None = None
        self._deaths: list[float] = []
        self._stopping = False

    def command(self, port: int) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def base_path(self) -> str:
        return "/v1"

    async def _after_ready(self) -> None:
        """Read what the server reports about itself (context size …) once it is healthy."""

    def _log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    async def _spawn(self) -> None:
        self.port = free_port()
        cmd = self.command(self.port)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)  # its own process group: stopped as a group, and a ^C
            # in the terminal reaches atm serve only, which then stops it in order
        finally:
            log.close()
        if self.http is not None:
            await self.http.aclose()
        self.http = HTTPUpstream(f"http://127.0.0.1:{self.port}{self.base_path()}",
                                 who=f"{self.kind} for {self.name}", timeout=self.request_timeout)
        health = HTTPUpstream(f"http://127.0.0.1:{self.port}", who=self.kind, timeout=5.0)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while True:
                if self.proc.returncode is not None:
                    raise AtmError(f"{self.kind} for {self.name} exited with code "
                                   f"{self.proc.returncode} while starting; log {self.log_path}:\n"
                                   f"{self._log_tail()}")
                try:
                    r = await health.client.get(self.health_path, timeout=2.0)
                    if r.status_code == 200:
                        break
                except health._httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    await self._kill()
                    raise AtmError(f"{self.kind} for {self.name} did not become healthy within "
                                   f"{self.startup_timeout:.0f} s; log {self.log_path}:\n{self._log_tail()}")
                await asyncio.sleep(0.1)
        finally:
            await health.aclose()
        self.state = "ready"  # so _after_ready's calls pass check_ready
        await self._after_ready()

    async def _start(self) -> None:
        self._stopping = False
        await self._spawn()
        self._watcher = asyncio.create_task(self._watch(), name=f"watch-{self.name}")

    async def _watch(self) -> None:
        while not self._stopping:
            proc = self.proc
            if proc is None:
                return
            rc = await proc.wait()
            if self._stopping:
                return
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < self.restart_window] + [now]
            self.state = "restarting"
            self.error = f"{self.kind} exited with code {rc}"
            print(f"atm serve: {self.kind} for {self.name} exited with code {rc}; restarting "
                  f"(log {self.log_path})", file=sys.stderr)
            while not self._stopping:
                if len(self._deaths) > self.max_restarts:
                    self.state = "failed"
                    self.error = (f"{self.kind} died {len(self._deaths)} times within "
                                  f"{self.restart_window:.0f} s (last exit code {rc}); see {self.log_path}")
                    print(f"atm serve: {self.error}", file=sys.stderr)
                    return
                try:
                    await asyncio.sleep(min(0.2 * len(self._deaths), 5.0))
                    await self._spawn()
                    self.restarts += 1
                    self.error = None
                    self.state = "ready"
                    break
                except AtmError as exc:
                    self._deaths.append(time.monotonic())
                    self.error = str(exc)
                    self.state = "restarting"

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10.0)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def _stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
            self._watcher = None
        await self._kill()
        await super()._stop()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(pid=self.proc.pid if self.proc and self.proc.returncode is None else None,
                 port=self.port, log=str(self.log_path))
        return d


class LlamaServerEngine(ManagedProcessEngine):
    """llama.cpp's ``llama-server`` on one GGUF (one process per served model)."""

    kind = "llama-server"

    def __init__(self, name: str, gguf: str | Path, *, ctx_size: int = 2048, threads: int | None = None,
                 binary: str | Path | None = None, ubatch_size: int = 2048, **kw: Any):
        super().__init__(name, **kw)
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise AtmError(f"{self.gguf}: GGUF file not found (model {name!r})")
        self.ctx_size = ctx_size
        self.threads = threads
        self.ubatch_size = ubatch_size
        self.binary = Path(binary) if binary else None
        self.props: dict[str, Any] = {}
        self.root: HTTPUpstream | None = None

    def _binary(self) -> Path:
        if self.binary is None:
            from atm.export.llamacpp import require_tool

            self.binary = require_tool("llama-server")
        return self.binary

    def command(self, port: int) -> list[str]:
        cmd = [str(self._binary()), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(self.parallel), "-c", str(self.ctx_size * self.parallel),
               "--metrics", "--jinja", "--no-webui", "-a", self.name, "--log-colors", "off",
               "-ub", str(self.ubatch_size), "-b", str(max(2048, self.ubatch_size))]
        if self.threads:
            cmd += ["-t", str(self.threads), "-tb", str(self.threads)]
        return cmd + self.extra_args

    async def _after_ready(self) -> None:
        if self.root is not None:
            await self.root.aclose()
        # the server's own routes (/apply-template, /completion, /props), beside its /v1 API
        self.root = HTTPUpstream(f"http://127.0.0.1:{self.port}", who=f"{self.kind} for {self.name}",
                                 timeout=self.request_timeout)
        try:
            props = await self.root.get_json("/props", timeout=10.0)
        except EngineError:
            props = {}
        self.props = props if isinstance(props, dict) else {}
        gen = self.props.get("default_generation_settings") or {}
        self.n_ctx = gen.get("n_ctx") or self.n_ctx

    def map_request(self, req: dict[str, Any], chat: bool) -> dict[str, Any]:
        out = {k: v for k, v in req.items()
               if v is not None and k not in ("json_schema", "json_object", "response_format")}
        out["model"] = self.upstream_model
        if req.get("json_schema") is not None:
            # llama-server's native constraint; honoured by both endpoints (its /v1/completions
            # ignores response_format). Regexes rewritten into what its converter enforces.
            try:
                out["json_schema"] = llama_safe_schema(req["json_schema"])
            except ValueError as exc:
                raise EngineError(str(exc), 400, "invalid_request_error", param="response_format") from None
        elif req.get("json_object"):
            # its json_object without a schema answers 500: any JSON object is this schema
            out["json_schema"] = {"type": "object"}
        return out

    # llama-server finishes a non-streamed request even after its client has gone: it notices a
    # closed connection only while streaming (measured: ~2,000 tokens ran to the end after the
    # socket closed). So ATM always streams from it and assembles the non-streamed answer
    # (``_collect``, for ``completion`` here and ``chat`` below); a client that leaves then stops
    # its generation within a token.
    async def completion(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self._collect(await self.completion_stream(self._with_usage(req)), chat=False)

    @staticmethod
    def _with_usage(req: dict[str, Any]) -> dict[str, Any]:
        return {**req, "stream_options": {"include_usage": True}}

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
        probs = (out.get("completion_probabilities") or [{}])[0].get("top_probs") or []
        mass = {c: 0.0 for c in classes}
        for alt in probs:
            tok = alt.get("token", "")
            hits = [c for c in classes if tok and c.startswith(tok)]
            if len(hits) == 1:
                mass[hits[0]] += float(alt.get("prob", 0.0))
        total = sum(mass.values())
        return {c: round(v / total, 6) for c, v in mass.items()} if total > 0 else None

    async def apply_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of ``messages`` under the GGUF's chat template (llama-server renders it)."""
        self.check_ready()
        assert self.root is not None
        return (await self.root.post_json("/apply-template", {"messages": messages}))["prompt"]

    # Schema-constrained chat goes through /v1/completions on the templated prompt: llama-server's
    # chat endpoint re-parses a constrained answer after generation and answers 500 ("does not
    # match the expected ... format") when max_tokens cut it short; the completion endpoint
    # returns the cut text with finish_reason "length", as the OpenAI API does.
    def _as_completion(self, req: dict[str, Any], prompt: str) -> dict[str, Any]:
        creq = {k: v for k, v in req.items() if k not in ("messages", "logprobs", "top_logprobs")}
        creq["prompt"] = prompt
        if req.get("logprobs"):
            creq["logprobs"] = req.get("top_logprobs") or 1
        return creq

    async def chat(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self._collect(await self.chat_stream(self._with_usage(req)), chat=True)

    async def chat_stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if req.get("json_schema") is None and not req.get("json_object"):
            return await super().chat_stream(req)
        prompt = await self.apply_template(req["messages"])
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

    async def metrics_text(self) -> str:
        if self.port is None or not self.ready:
            return ""
        import httpx

        try:
            async with httpx.AsyncClient(trust_env=False) as c:
                r = await c.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2.0)
            return r.text if r.status_code == 200 else ""
        except httpx.HTTPError:
            return ""


class VLLMEngine(ManagedProcessEngine):
    """``vllm serve MODEL_DIR`` (CUDA machines). JSON Schemas go to vLLM's ``structured_outputs``.

    ``upstream`` attaches to a vLLM server already running instead of launching one.
    """

    kind = "vllm"

    def __init__(self, name: str, model_dir: str | Path, *, ctx_size: int = 2048,
                 upstream: str | None = None, binary: str | None = None, **kw: Any):
        super().__init__(name, **kw)
        self.model_dir = str(model_dir)
        self.ctx_size = ctx_size
        self.upstream = upstream
        self.binary = binary

    def command(self, port: int) -> list[str]:
        import shutil

        exe = self.binary or shutil.which("vllm")
        if exe is None:
            raise AtmError("vLLM is not installed (pip install vllm; CUDA only), or give `upstream:` "
                           "to attach to a running vLLM server")
        cmd = [exe, "serve", self.model_dir, "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", self.name, "--max-num-seqs", str(self.parallel),
               "--disable-log-requests"]
        if self.ctx_size:
            cmd += ["--max-model-len", str(self.ctx_size)]
        return cmd + self.extra_args

    async def _start(self) -> None:
        if self.upstream:
            self.http = HTTPUpstream(self.upstream, who=f"vllm for {self.name}",
                                     timeout=self.request_timeout)
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

    def map_request(self, req: dict[str, Any], chat: bool) -> dict[str, Any]:
        out = {k: v for k, v in req.items()
               if v is not None and k not in ("json_schema", "json_object", "response_format")}
        out["model"] = self.upstream_model
        if req.get("json_schema") is not None:
            # vLLM >= 0.12: `structured_outputs` (the old guided_json is removed and ignored)
            out["structured_outputs"] = {"json": req["json_schema"]}
        elif req.get("json_object"):
            out["structured_outputs"] = {"json_object": True}
        return out


class RemoteEngine(OpenAIUpstreamEngine):
    """A proxy to a remote OpenAI-compatible server (``…/v1``) or an Ollama server."""

    kind = "remote"

    def __init__(self, name: str, url: str, *, api: str = "openai", api_key: str | None = None, **kw: Any):
        super().__init__(name, **kw)
        self.url = url.rstrip("/")
        self.api = api
        self.api_key = api_key or os.environ.get("ATM_UPSTREAM_API_KEY")
        self.supports_logprobs = api == "openai"

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

    # --- Ollama upstream: translate to /api/chat and /api/generate and back --------------------
    def _ollama_payload(self, req: dict[str, Any], chat: bool, stream: bool) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                         ("max_tokens", "num_predict"), ("stop", "stop"), ("top_k", "top_k"),
                         ("presence_penalty", "presence_penalty"),
                         ("frequency_penalty", "frequency_penalty")):
            if req.get(src) is not None:
                opts[dst] = req[src]
        if isinstance(opts.get("stop"), str):
            opts["stop"] = [opts["stop"]]
        out: dict[str, Any] = {"model": self.upstream_model, "stream": stream, "options": opts}
        if chat:
            out["messages"] = req["messages"]
        else:
            out["prompt"] = req["prompt"]
            out["raw"] = True
        if req.get("json_schema") is not None:
            out["format"] = req["json_schema"]
        elif req.get("json_object"):
            out["format"] = "json"
        return out

    @staticmethod
    def _ollama_usage(obj: dict[str, Any]) -> dict[str, int]:
        p, c = int(obj.get("prompt_eval_count") or 0), int(obj.get("eval_count") or 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _finish(self, obj: dict[str, Any]) -> str:
        return "length" if obj.get("done_reason") == "length" else "stop"

    async def chat(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.api == "openai":
            return await super().chat(req)
        obj = await self._http().post_json("/api/chat", self._ollama_payload(req, True, False))
        msg = obj.get("message") or {}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": self.name,
                "choices": [{"index": 0, "finish_reason": self._finish(obj),
                             "message": {"role": "assistant", "content": msg.get("content", "")}}],
                "usage": self._ollama_usage(obj)}

    async def completion(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.api == "openai":
            return await super().completion(req)
        obj = await self._http().post_json("/api/generate", self._ollama_payload(req, False, False))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.name,
                "choices": [{"index": 0, "text": obj.get("response", ""),
                             "finish_reason": self._finish(obj), "logprobs": None}],
                "usage": self._ollama_usage(obj)}

    async def _ollama_stream(self, req: dict[str, Any], chat: bool) -> AsyncIterator[dict[str, Any]]:
        path = "/api/chat" if chat else "/api/generate"
        lines = await self._http().open_lines(path, self._ollama_payload(req, chat, True))
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        async def gen():
            async for line in lines:
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise EngineError(f"{self.url} sent an invalid NDJSON line", 502, "upstream_error") from None
                if obj.get("error"):
                    raise EngineError(f"{self.url}: {obj['error']}", 502, "upstream_error")
                done = bool(obj.get("done"))
                if chat:
                    text = (obj.get("message") or {}).get("content", "")
                    choice = {"index": 0, "delta": {"content": text} if text else {},
                              "finish_reason": self._finish(obj) if done else None}
                    chunk = {"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": self.name, "choices": [choice]}
                else:
                    chunk = {"id": cid, "object": "text_completion", "created": created,
                             "model": self.name,
                             "choices": [{"index": 0, "text": obj.get("response", ""),
                                          "finish_reason": self._finish(obj) if done else None}]}
                if done:
                    chunk["usage"] = self._ollama_usage(obj)
                yield chunk
                if done:
                    return
        return gen()

    async def chat_stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if self.api == "openai":
            return await super().chat_stream(req)
        return await self._ollama_stream(req, True)

    async def completion_stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if self.api == "openai":
            return await super().completion_stream(req)
        return await self._ollama_stream(req, False)


# ---------------------------------------------------------------------------------------------
# transformers (in process)


class TransformersEngine(Engine):
    """An HF causal LM in this process; requests with equal sampling settings share a batch.

    A worker task drains the queue: it takes the oldest request and every waiting request with
    the same (max_tokens, temperature, top_p, seed, schema) up to ``parallel``, left-pads them into
    one batch and calls ``generate`` in a thread (the event loop keeps serving). ``json_schema`` and
    ``json_object`` are enforced token by token (``atm.prompting.hf_constraint``, lm-format-enforcer),
    as llama-server does natively. Streaming sends the whole answer as one chunk.
    """

    kind = "transformers"

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

    async def _start(self) -> None:
        if not self.model_dir.is_dir():
            raise AtmError(f"{self.model_dir}: HF model directory not found (model {self.name!r})")
        await asyncio.to_thread(self._load)
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._work(), name=f"hf-{self.name}")

    def _load(self) -> None:
        from atm.errors import require

        torch = require("torch", "train")
        transformers = require("transformers", "train")
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = transformers.AutoTokenizer.from_pretrained(self.model_dir)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = transformers.AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        self.model.to(self.device).eval()
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

    def _prompt_ids(self, req: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            ids = self.tok.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            return list(ids)
        return list(self.tok(req["prompt"], add_special_tokens=False)["input_ids"])

    async def _submit(self, req: dict[str, Any], chat: bool) -> dict[str, Any]:
        self.check_ready()
        ids = self._prompt_ids(req, chat)
        max_new = int(req.get("max_tokens") or 16)
        if self.n_ctx and len(ids) + 1 > self.n_ctx:
            raise EngineError(f"the prompt has {len(ids)} tokens; the context is {self.n_ctx}",
                              400, "invalid_request_error", param="messages" if chat else "prompt")
        if self.n_ctx:
            max_new = max(1, min(max_new, self.n_ctx - len(ids)))
        fut = asyncio.get_running_loop().create_future()
        schema = None
        if req.get("json_schema") is not None or req.get("json_object"):
            schema = json.dumps(req.get("json_schema"), sort_keys=True)  # "null" = any JSON object
        key = (max_new, float(req.get("temperature") if req.get("temperature") is not None else 1.0),
               float(req.get("top_p") or 1.0), req.get("seed"), schema)
        assert self._queue is not None
        await self._queue.put((key, ids, fut))
        text, n_out, finish = await fut
        stops = req.get("stop") or []
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

    async def chat(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self._submit(req, True)

    async def completion(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self._submit(req, False)

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

    async def chat_stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._one_chunk(await self._submit(req, True), True)

    async def completion_stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._one_chunk(await self._submit(req, False), False)
