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

KLINE_HELP = (
    "1m klines, oldest first (rows out of order are sorted and reported in `repairs`), consecutive "
    "minutes, at least the model encoder's lookback (11 bars for the shipped seed encoders). Each "
    "bar is an object {open_time, open, high, low, close, volume, quote_volume, count, "
    "taker_buy_volume, taker_buy_quote_volume} or an array in Binance's kline order [open_time, "
    "open, high, low, close, volume, close_time, quote_volume, count, taker_buy_volume, "
    "taker_buy_quote_volume, ignore]. open_time: ISO 8601 or Binance milliseconds/microseconds; "
    "numbers may be strings. open_time, open, high, low, close and volume are required; the others "
    "are required when the model's encoder reads them (a 400 names the one missing). The advised "
    "minute is the one after the last bar.")


class AdviceRequest(StrictModel):
    """``POST /v1/advice``: give `klines`, or `symbol` + `time` for a server started with
    ``--set klines.SYMBOL=PATH``."""

    model: str = Field(min_length=1, description="served model name (GET /v1/models), e.g. atm:q8")
    klines: list[KlineRow] | None = Field(default=None, max_length=100_000, description=KLINE_HELP)
    symbol: str | None = Field(default=None, description="instead of klines: a symbol configured on the "
                               "server (`--set klines.BTCUSDT=PATH`); the window is read from its data")
    time: Union[str, int, None] = Field(default=None, description="with `symbol`: the minute to advise "
                                        "(ISO 8601 or Binance ms). It needs 64 bars (or the encoder's "
                                        "lookback + 1) before it in the data, without a gap; a time "
                                        "outside the data is a 400 giving the range")
    temperature: float = Field(default=0.0, ge=0, le=2, description="sampling temperature of the "
                               "generated answer (0 = greedy)")
    seed: int | None = Field(default=None, description="sampling seed")
    probs: bool = Field(default=True, description="also score the three options (BUY/NOOP/SELL) at the "
                        "advice position: `probs` and `scored_advice`")
    max_tokens: int = Field(default=160, ge=8, le=1024,  # ~25 tokens + the whitespace the grammar allows
                            description="token limit of the generated answer")

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "atm:q8", "klines": [
            {"open_time": "2025-08-10T23:49:00Z", "open": 118500.1, "high": 118520.0, "low": 118490.5,
             "close": 118510.2, "volume": 3.2, "quote_volume": 379232.6, "count": 812,
             "taker_buy_volume": 1.7, "taker_buy_quote_volume": 201467.3}, "... 10 more bars"]},
        {"model": "atm:q8", "symbol": "BTCUSDT", "time": "2025-08-10T12:00:00Z"}]})


class AdviceRepair(BaseModel):
    kind: str = Field(description="what was repaired: rows_reordered, filled_bars")
    what: str = Field(description="the repair in words")
    count: int = Field(description="how many bars")
    where: list[str] = Field(description="the first few places (klines[i] or minutes)")


class AdviceResponse(BaseModel):
    """The answer of ``POST /v1/advice``. Two measurements: `advice` is the generated answer (the
    model's JSON, decoded under its answer schema, what a client of the model would get); `probs`
    are the scored options (the probability of each advice value at the position where the advice
    starts), whose most likely option is `scored_advice`. They can differ: generation may follow a
    different path than the single most likely advice token."""

    model: str = Field(description="the model that answered")
    time: str = Field(description="the advised minute t (ISO 8601, UTC): the one after the last bar used")
    last_kline: str = Field(description="open_time of the last bar encoded (t - 1 minute)")
    advice: str | None = Field(description="the GENERATED answer's advice (BUY, NOOP or SELL); null "
                               "when the answer is not valid")
    advice_source: Literal["generated"] = Field(description="which measurement `advice` is: the "
                                                "generated answer")
    scored_advice: str | None = Field(description="the most likely option of `probs` (the SCORED "
                                      "options); null without probs")
    predicted_open_change: Union[str, float, None] = Field(description="the generated answer's predicted "
                                                           "change of the open, as the model wrote it (a "
                                                           "decimal string under the shipped schema)")
    valid: bool = Field(description="whether the generated answer parses under the answer schema")
    reason: str | None = Field(description="why it is not valid")
    probs: dict[str, float] | None = Field(description="scored options: P(BUY), P(NOOP), P(SELL) at the "
                                           "advice position; null when not asked for or not available")
    raw: str = Field(description="the generated answer's text")
    context: str = Field(description="the encoded window (the user message's market context)")
    messages: list[dict[str, Any]] = Field(description="the chat messages sent to the model")
    template: str = Field(description="prompt template the model was trained with")
    encoder: dict[str, Any] = Field(description="encoder config the model was trained with")
    finish_reason: str | None = Field(description="the engine's finish reason")
    usage: dict[str, Any] | None = Field(description="token counts")
    engine_ms: float = Field(description="time in the engine, ms")
    repairs: list[AdviceRepair] = Field(description="what was repaired in the input (as `atm data build` "
                                        "reports it); [] when nothing was")
    created: str = Field(description="when the answer was made (ISO 8601)")
    latency_ms: float = Field(description="time in the server, ms")


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
