"""``openai:MODEL@BASE_URL``: any OpenAI-compatible server (``atm serve``, llama-server, vLLM).

The item's prompt messages go as they are (the server's prefix cache reuses the shared part); the
answer is constrained by ``response_format`` json_schema (``atm serve`` turns it into the answer
contract's grammar itself), or by the ``grammar`` / ``structured_outputs`` a caller that started
the server passes in ``extra_body`` (``atm:`` with --concurrency, ``vllm:``). ``loglik`` reads
class probabilities from the top-20 log-probs at the advice token; a server without logprobs
falls back to generate (noted in the report).
"""

from __future__ import annotations

import os
import time
from typing import Any

from atm.constants import ADVICES
from atm.errors import AtmError, require
from atm.eval.providers import (Prediction, RequestProvider, Transient, item_messages, model_contract,
                                parsed_prediction, token_counts)
from atm.prompting.answer import probs_from_top_logprobs
from atm.prompting.xgrammar_schema import xgrammar_safe_schema


def split_openai(arg: str) -> tuple[str, str]:
    model, sep, url = arg.partition("@")
    if not model:
        raise AtmError(f"openai:{arg}: expected openai:MODEL@BASE_URL, e.g. openai:atm@http://127.0.0.1:8000/v1")
    if not sep:
        url = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    return model, url


class OpenAIProvider(RequestProvider):
    """``openai:MODEL@BASE_URL``: any OpenAI-compatible server (ATM's, llama-server, vLLM). The
    schema is sent without the length bounds its patterns imply (same answers; a bare vLLM's
    xgrammar refuses a pattern with length bounds)."""

    supports_loglik = True  # through logprobs when the server returns them; else falls back

    def __init__(self, spec: str, arg: str, **options: Any):
        super().__init__(spec, arg, **options)
        openai = require("openai", "eval")
        self.model, self.base_url = split_openai(arg)
        # api_key: a server ATM started itself (its own random key); else $OPENAI_API_KEY
        key = options.get("api_key") or os.environ.get("OPENAI_API_KEY", "none")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0,
                                    timeout=float(self.gen.timeout))
        self._openai = openai
        self.contract = options.get("contract") or model_contract(options)
        self.schema = self.contract.schema
        # extra request fields for the server (ATM's own llama-server: cache_prompt, and its GBNF
        # grammar in place of response_format; vLLM: structured_outputs with that grammar)
        self.extra_body = dict(options.get("extra_body") or {})
        self._no_logprobs = False
        self._pieces = self.contract.pieces

    def _attempt(self, item: dict, mode: str) -> Prediction:
        o = self._openai
        kw: dict[str, Any] = {}
        want_lp = mode == "loglik" and not self._no_logprobs
        if want_lp:
            kw.update(logprobs=True, top_logprobs=20)
        if "grammar" not in self.extra_body and "structured_outputs" not in self.extra_body:
            kw["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "advice", "schema": xgrammar_safe_schema(self.schema),
                                                     "strict": True}}
        t0 = time.perf_counter()
        try:
            resp = self.client.chat.completions.create(
                model=self.model, messages=item_messages(item), temperature=float(self.gen.temperature),
                max_tokens=int(self.gen.max_tokens), seed=0, extra_body=self.extra_body or None, **kw)
        except (o.APITimeoutError, o.APIConnectionError, o.RateLimitError, o.InternalServerError) as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from None
        except o.APIStatusError as exc:
            if exc.status_code >= 500 or exc.status_code == 429:
                raise Transient(f"HTTP {exc.status_code}: {exc}") from None
            raise
        lat = time.perf_counter() - t0
        if not resp.choices:
            raise Transient("response without choices")
        ch = resp.choices[0]
        raw = ch.message.content
        extra: dict[str, Any] = {}
        if ch.finish_reason:
            extra["finish_reason"] = ch.finish_reason
        pred = parsed_prediction(item["id"], raw, lat, tokens=openai_tokens(resp), **extra)
        if want_lp:
            lp = getattr(ch, "logprobs", None)
            content = getattr(lp, "content", None) if lp is not None else None
            if not content:
                self._no_logprobs = True
                self._note(f"{self.base_url} returned no logprobs: fell back to generate (no class probabilities)")
            elif pred.valid:
                probs = probs_from_top_logprobs([_token_dict(tok) for tok in content], ADVICES)
                if probs:
                    pred.probs = probs
                    pred.extra["probs_from"] = "top-20 logprobs at the advice token (options outside the top 20 get 0)"
        return pred

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "model": self.model, "base_url": self.base_url,
                "openai": getattr(self._openai, "__version__", None), "concurrency": self.concurrency,
                "constraint": "response_format json_schema (prompts/advice.schema.json)"}


def openai_tokens(resp: Any) -> dict[str, int | None] | None:
    """Token counts of an OpenAI-compatible response: ``usage`` (prompt, completion, and the cached
    prompt tokens of ``prompt_tokens_details`` where the server reports them: OpenAI, vLLM with
    prompt-token details) and llama-server's ``timings`` (``prompt_n`` tokens evaluated, ``cache_n``
    taken from its prompt cache, ``predicted_n`` generated)."""
    usage = getattr(resp, "usage", None)
    extra = getattr(resp, "model_extra", None) or {}
    timings = extra.get("timings")
    prompt = getattr(usage, "prompt_tokens", None)
    completion = getattr(usage, "completion_tokens", None)
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    prompt_eval = None
    if isinstance(timings, dict) and timings.get("prompt_n") is not None:
        prompt_eval = int(timings["prompt_n"])
        if prompt is None and timings.get("cache_n") is not None:
            prompt = prompt_eval + int(timings["cache_n"])
        if completion is None and timings.get("predicted_n") is not None:
            completion = int(timings["predicted_n"])
    elif cached is not None and prompt is not None:
        prompt_eval = int(prompt) - int(cached)
    if prompt is None and completion is None and prompt_eval is None:
        return None
    return token_counts(prompt, prompt_eval, completion)


def _token_dict(tok: Any) -> dict[str, Any]:
    """An openai client's logprobs token as the plain dict ``probs_from_top_logprobs`` reads."""
    alts = getattr(tok, "top_logprobs", None) or []
    return {"token": tok.token, "logprob": tok.logprob,
            "top_logprobs": [{"token": a.token, "logprob": a.logprob} for a in alts]}
