"""Request models of every route (pydantic, strict: "1" is not a number, 1 is not a bool) and the
one body reader: size-limited (413), parsed strictly (malformed JSON, wrong types, missing fields:
400 naming each location once)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from atm.serve.api.errors import ApiError


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None


class JsonSchemaSpec(StrictModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama.cpp's json_object+schema


Stop = Union[str, list[str], None]


class SamplingRequest(StrictModel):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(SamplingRequest):
    # OpenAI's four forms (vLLM and llama-server take them too): text, texts, token ids, lists of
    # token ids. lm-eval's local-completions sends token ids by default.
    prompt: Union[str, list[str], TokenIds, list[TokenIds]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)
    json_schema: dict[str, Any] | None = None  # llama.cpp's extension, accepted as-is


class OllamaOptions(StrictModel):
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    num_predict: int | None = None
    stop: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = Field(default=None, ge=1)


class OllamaMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None


class OllamaBase(StrictModel):
    model: str = Field(min_length=1)
    stream: bool = True
    format: Union[Literal["", "json"], dict[str, Any], None] = None
    options: OllamaOptions | None = None
    keep_alive: Union[float, int, str, None] = None
    think: Union[bool, str, None] = None


class OllamaChatRequest(OllamaBase):
    messages: list[OllamaMessage] = Field(default_factory=list, max_length=4096)
    tools: list[Any] | None = None


class OllamaGenerateRequest(OllamaBase):
    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    raw: bool | None = None
    images: list[Any] | None = None
    context: list[int] | None = None


class OllamaShowRequest(StrictModel):
    model: str | None = None
    name: str | None = None  # older clients
    verbose: bool | None = None


KlineRow = Union[dict[str, Any], list[Any]]


class AdviceRequest(StrictModel):
    model: str = Field(min_length=1)
    klines: list[KlineRow] | None = Field(default=None, max_length=100_000)
    symbol: str | None = None
    time: Union[str, int, None] = None
    temperature: float = Field(default=0.0, ge=0, le=2)
    seed: int | None = None
    probs: bool = True
    max_tokens: int = Field(default=160, ge=8, le=1024)  # ~25 tokens + the whitespace the grammar allows


# =============================================================================================
# reading a body


async def read_json(request, model_cls: type[BaseModel], limit: int):
    """The body, size-limited (413), parsed strictly into ``model_cls`` (400 with the reason)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", "request_too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise ApiError(400, "empty request body: send a JSON object")
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> ApiError:
    errs = exc.errors(include_url=False)
    if errs and errs[0]["type"] == "json_invalid":
        return ApiError(400, f"malformed JSON body: {errs[0]['msg']}")
    if errs and errs[0]["type"] in ("model_type", "model_attributes_type") and not errs[0]["loc"]:
        return ApiError(400, "the request body must be a JSON object")
    # Union branches repeat the same location; report each location once
    seen, parts = set(), []
    for e in errs:
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("function-", "union[")))
        loc = re.sub(r"\.(str|list\[[^\]]*\]|dict\[[^\]]*\]|int|float|bool|none|literal\[[^\]]*\]|TextPart)(?=\.|$)", "", loc)
        if loc in seen:
            continue
        seen.add(loc)
        parts.append(f"{loc or 'body'}: {e['msg']}")
    first = errs[0]["loc"][0] if errs and errs[0]["loc"] else None
    return ApiError(400, "invalid request: " + "; ".join(parts[:5]), param=str(first) if first else None)
