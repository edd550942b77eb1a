"""The engine interface: what runs a served model, behind one typed request and four calls.

The API layer (``atm.serve.api``) validates a client's request, translates the Ollama API, and
hands an engine an ``EngineRequest``; the engine answers with an OpenAI-shaped response dict (or
an async iterator of OpenAI chunk dicts when streaming). Engines only run models: no HTTP status
codes, no client formats. What an engine can do beyond chat and completions is declared in its
``capabilities``, never probed.

Errors: an engine raises ``EngineError`` (or ``EngineUnavailable`` 503 / ``EngineBusy`` 429) with
the status and OpenAI error type the API should answer with.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import asdict, dataclass, fields
from typing import Any, AsyncIterator, ClassVar

# ---------------------------------------------------------------------------------------------
# errors


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


# ---------------------------------------------------------------------------------------------
# the request


@dataclass
class EngineRequest:
    """One generation request, already validated by the API layer.

    A chat request has ``messages`` (``[{"role", "content"}]``, roles system/user/assistant), a
    completion request ``prompt``: raw text (no chat template), or token ids of the model's
    vocabulary for engines whose ``capabilities.token_prompts`` say so (one prompt per request:
    the API layer fans a list of prompts out). ``None`` means "the engine's
    default". ``json_schema`` is a plain JSON Schema the answer must satisfy; ``json_object``
    asks for any JSON object. ``logprobs``: chat: ``True`` with ``top_logprobs`` alternatives per
    token; completion: the number of alternatives (OpenAI's completions convention).
    """

    model: str
    messages: list[dict[str, str]] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    stream_options: dict[str, Any] | None = None

    SAMPLING: ClassVar[tuple[str, ...]] = ("temperature", "top_p", "top_k", "seed", "presence_penalty",
                                           "frequency_penalty")

    @property
    def chat(self) -> bool:
        return self.messages is not None

    @property
    def constrained(self) -> bool:
        """The answer must be JSON (a schema, or any object)."""
        return self.json_schema is not None or self.json_object

    def openai_body(self) -> dict[str, Any]:
        """The OpenAI request fields that are set, without the constraint (each engine sends
        ``json_schema`` / ``json_object`` its own way)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("json_schema", "json_object") and getattr(self, f.name) is not None}

    def replace(self, **changes: Any) -> "EngineRequest":
        return EngineRequest(**{**asdict(self), **changes})


# ---------------------------------------------------------------------------------------------
# the interface


@dataclass(frozen=True)
class Capabilities:
    """What an engine offers beyond chat and completions."""

    json_schema: bool = True  # enforces json_schema / json_object while decoding
    logprobs: bool = False  # returns token log-probs (with alternatives) when asked
    class_probs: bool = False  # implements Engine.class_probs: exact P(class) after a prefix
    token_prompts: bool = False  # a completion prompt may be token ids (OpenAI's prompt: [ids])


class Engine(abc.ABC):
    """One served model. Subclasses implement ``_start`` (and ``_stop``) and the four calls;
    ``start``/``stop``/``admit``/``describe`` are shared."""

    kind: ClassVar[str] = "engine"
    serves: ClassVar[str] = "gguf"  # what ``path`` must be: "gguf" (a file), "hf" (a model dir) or "url"
    capabilities: Capabilities = Capabilities()

    def __init__(self, name: str, *, parallel: int = 8, max_queue: int = 64, request_timeout: float = 600.0):
        self.name = name
        self.parallel = parallel
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.inflight = 0
        self.state = "stopped"  # stopped | starting | ready | restarting | failed
        self.error: str | None = None
        self.restarts = 0
        self.n_ctx: int | None = None  # per-request context (prompt + answer), when known

    @classmethod
    def from_settings(cls, spec: Any, settings: Any, path: Any) -> "Engine":
        """The engine for one served model (``atm.serve.settings.ModelSpec``) under ``settings``
        (``ServeSettings``), on ``path`` (what ``serves`` says; None for a remote)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from serve settings")

    @staticmethod
    def common_options(spec: Any, settings: Any) -> dict[str, Any]:
        """The keyword arguments every engine takes, from the served model and the settings."""
        return dict(parallel=spec.parallel or settings.parallel, max_queue=settings.max_queue,
                    request_timeout=settings.request_timeout)

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

    @abc.abstractmethod
    async def _start(self) -> None:
        """Load the model / start and health-wait its process."""

    async def _stop(self) -> None:
        """Release what ``_start`` took."""

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

    def chat_template(self) -> str | None:
        """The model's own chat template (Jinja) when the engine knows it (Ollama's /api/show)."""
        return None

    # calls ------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def chat(self, req: EngineRequest) -> dict[str, Any]:
        """A ``chat.completion`` response for ``req.messages``."""

    @abc.abstractmethod
    async def chat_stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        """``chat.completion.chunk`` dicts. The request is sent (and fails) before this returns,
        so an engine error becomes an HTTP status rather than an error mid-stream."""

    @abc.abstractmethod
    async def completion(self, req: EngineRequest) -> dict[str, Any]:
        """A ``text_completion`` response for ``req.prompt``."""

    @abc.abstractmethod
    async def completion_stream(self, req: EngineRequest) -> AsyncIterator[dict[str, Any]]:
        """``text_completion`` chunk dicts (see ``chat_stream``)."""

    async def class_probs(self, messages: list[dict[str, str]], answer_prefix: str,
                          classes: tuple[str, ...]) -> dict[str, float] | None:
        """P(class) of the value that follows ``answer_prefix`` in the answer to ``messages``
        (``capabilities.class_probs`` engines only)."""
        raise NotImplementedError(f"{self.kind} does not give class probabilities")

