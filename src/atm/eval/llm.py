"""LLM providers: ``atm:TAG`` (llama.cpp), ``openai:MODEL@URL``, ``ollama:NAME``, ``hf:PATH``.

Every provider sends the item's prompt messages as they are in the dataset (shared prefix first:
system, instruction, k-shot pairs; then the minute's context), so the engine's prefix cache reuses
the shared part across items, and every answer goes through the one strict parser
(``atm.prompting.advice.parse_advice``): no regex rescue of free text.

Modes:
- ``generate``: constrained decoding to the model's answer contract (``atm.prompting.contract``:
  template, answer order, schema, grammar, resolved in one place), the same grammar on every
  engine: llama.cpp in process and ATM's llama-server get its GBNF, vLLM the GBNF through
  ``structured_outputs``, transformers its regex (``atm.prompting.hf_constraint``); ``atm serve``
  (an ``openai:`` endpoint) turns the ``response_format`` schema into that grammar itself; other
  OpenAI-compatible servers get ``response_format`` json_schema and Ollama ``format`` = the schema.
- ``loglik``: the log-probability of each advice option after the prompt (and the answer text that
  precedes the advice value), normalized over BUY/NOOP/SELL -> class probabilities. The shipped answer
  format writes ``predicted_open_change`` BEFORE ``advice``, so the change is decoded greedily
  first (grammar-constrained) and the three options are then scored on that shared prefix; with an
  advice-first format no decoding happens at all. OpenAI-compatible servers give probabilities only
  through ``logprobs``/``top_logprobs`` of a generated answer (approximation: the top-k alternatives
  at the advice token); servers that return no logprobs fall back to generate (noted in the report).
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterator, Sequence

from atm.artifacts import ModelCard
from atm.constants import ADVICES
from atm.errors import AtmError, require
from atm.eval.providers import GenerationSpec, Prediction, Provider, token_counts
from atm.runtime.llamacpp import common_prefix
from atm.prompting.answer import most_likely, probs_from_logliks, probs_from_top_logprobs
from atm.prompting.contract import AnswerContract, dataset_template_of, resolve_contract
from atm.prompting.xgrammar_schema import xgrammar_safe_schema

RAW_KEEP = 4000  # characters of a raw answer kept in the results file (a rambling model can't bloat it)


class Transient(Exception):
    """A failure worth retrying (timeout, connection drop, 5xx, 429)."""


def _gen(options: dict[str, Any]) -> dict[str, Any]:
    g = options.get("generation") or {}
    return GenerationSpec(**g).to_dict() if not isinstance(g, GenerationSpec) else g.to_dict()


def model_contract(options: dict[str, Any], model: Any = None) -> AnswerContract:
    """The answer contract of ``model`` (a registry entry, a model card, or None), with the template
    the items were rendered with as the fallback: ``atm.prompting.contract.resolve_contract``."""
    return resolve_contract(model, dataset_template=dataset_template_of(options.get("dataset_meta")))


def parsed_prediction(item_id: str, raw: str | None, latency: float, tokens: dict | None = None,
                      **extra: Any) -> Prediction:
    """The one path from raw text to a Prediction: the strict shared parser, never a regex."""
    from atm.prompting.advice import parse_advice

    p = parse_advice(raw)
    reason = None if p.valid else (f"{p.reason}: {p.detail}" if p.detail else p.reason)
    kept = raw if raw is None or len(raw) <= RAW_KEEP else raw[:RAW_KEEP]
    if raw is not None and len(raw) > RAW_KEEP:
        extra["raw_chars"] = len(raw)
    return Prediction(id=item_id, raw=kept, advice=p.advice, predicted_change=p.predicted_change,
                      valid=p.valid, reason=reason, latency=latency, tokens=tokens, extra=extra)


class _Retrying(Provider):
    """Shared machinery: per-item retries with backoff, thread-pool concurrency, strict parsing."""

    def __init__(self, spec: str, arg: str, **options: Any):
        super().__init__(spec, arg, **options)
        self.gen = _gen(options)
        self.concurrency = max(1, int(options.get("concurrency") or 1))
        self.batch_size = max(8, 4 * self.concurrency)
        self._note_lock = threading.Lock()

    def _attempt(self, item: dict, mode: str) -> Prediction:  # pragma: no cover - interface
        raise NotImplementedError

    def attempt(self, item: dict, mode: str) -> Prediction:
        """One request, no retry: a Prediction, or ``Transient`` (timeout, dropped connection, 5xx,
        429) for the caller to retry; ``atm.eval.fanout`` retries it on another endpoint."""
        return self._attempt(item, mode)

    def _one(self, item: dict, mode: str) -> Prediction:
        delay = float(self.gen["backoff"])
        last = ""
        t0 = time.perf_counter()
        for attempt in range(int(self.gen["retries"]) + 1):
            try:
                pred = self._attempt(item, mode)
                pred.extra["attempts"] = attempt + 1
                return pred
            except Transient as exc:
                last = str(exc)
                if attempt < int(self.gen["retries"]):
                    time.sleep(delay)
                    delay *= 2
            except AtmError:
                raise
            except Exception as exc:  # noqa: BLE001 - a non-transient request error: record it
                return Prediction(id=item["id"], valid=False, reason=f"request failed: {type(exc).__name__}: {exc}"[:500],
                                  latency=time.perf_counter() - t0, extra={"failed": True, "attempts": attempt + 1})
        return Prediction(id=item["id"], valid=False, reason=f"request failed: {last}"[:500],
                          latency=time.perf_counter() - t0,
                          extra={"failed": True, "attempts": int(self.gen["retries"]) + 1})

    def predict_iter(self, items: Sequence[dict], mode: str = "generate") -> Iterator[Prediction]:
        if self.concurrency == 1:
            for it in items:
                yield self._one(it, mode)
            return
        with ThreadPoolExecutor(self.concurrency) as pool:
            futs = [pool.submit(self._one, it, mode) for it in items]
            for f in as_completed(futs):
                yield f.result()

    def predict(self, items: Sequence[dict], mode: str = "generate") -> list[Prediction]:
        return list(self.predict_iter(items, mode))

    def _note(self, text: str) -> None:
        with self._note_lock:
            if self.mode_note is None:
                self.mode_note = text
            elif text not in self.mode_note:
                self.mode_note += "; " + text


def _messages(item: dict) -> list[dict[str, str]]:
    msgs = item.get("prompt")
    if not msgs:
        raise AtmError(f"item {item.get('id')}: no prompt messages in the items view")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


# ---------------------------------------------------------------------------------- openai
def split_openai(arg: str) -> tuple[str, str]:
    model, sep, url = arg.partition("@")
    if not model:
        raise AtmError(f"openai:{arg}: expected openai:MODEL@BASE_URL, e.g. openai:atm@http://127.0.0.1:8000/v1")
    if not sep:
        url = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    return model, url


class OpenAIProvider(_Retrying):
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
                                    timeout=float(self.gen["timeout"]))
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
                model=self.model, messages=_messages(item), temperature=float(self.gen["temperature"]),
                max_tokens=int(self.gen["max_tokens"]), seed=0, extra_body=self.extra_body or None, **kw)
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


# ---------------------------------------------------------------------------------- ollama
class OllamaProvider(_Retrying):
    """``ollama:NAME``: an Ollama(-compatible) server at ``$OLLAMA_HOST`` via the ``ollama`` client."""

    supports_loglik = False

    def __init__(self, spec: str, arg: str, **options: Any):
        super().__init__(spec, arg, **options)
        ollama = require("ollama", "eval")
        if not arg:
            raise AtmError("ollama:NAME needs a model name, e.g. ollama:atm:q8")
        self.name = arg
        self.host = os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")
        self.client = ollama.Client(host=self.host, timeout=float(self.gen["timeout"]))
        self._ollama = ollama
        self.contract = model_contract(options)
        self.schema = self.contract.schema

    def _attempt(self, item: dict, mode: str) -> Prediction:
        import httpx

        t0 = time.perf_counter()
        try:
            resp = self.client.chat(model=self.name, messages=_messages(item), format=self.schema, stream=False,
                                    options={"temperature": float(self.gen["temperature"]),
                                             "num_predict": int(self.gen["max_tokens"]), "seed": 0})
        except self._ollama.ResponseError as exc:
            if exc.status_code >= 500 or exc.status_code == 429:
                raise Transient(f"HTTP {exc.status_code}: {exc.error}") from None
            raise
        except (httpx.TimeoutException, httpx.TransportError, ConnectionError) as exc:
            raise Transient(f"{type(exc).__name__}: {exc}") from None
        lat = time.perf_counter() - t0
        # Ollama's prompt_eval_count is "the number of tokens in the prompt" (what its cache saved
        # is not reported)
        prompt, completion = getattr(resp, "prompt_eval_count", None), getattr(resp, "eval_count", None)
        tokens = token_counts(prompt, None, completion) if prompt is not None or completion is not None else None
        return parsed_prediction(item["id"], resp.message.content, lat, tokens=tokens)

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "host": self.host, "model": self.name, "concurrency": self.concurrency,
                "constraint": "format = prompts/advice.schema.json"}


# ---------------------------------------------------------------------------------- atm (llama.cpp)
class AtmProvider(_Retrying):
    """``atm:TAG`` (a registry name): llama.cpp in process (``atm.runtime.llamacpp``), or a
    ``llama-server`` (``atm.runtime.llama_server``, with its own random key) for --concurrency > 1."""

    supports_loglik = True

    def __init__(self, spec: str, arg: str, **options: Any):
        super().__init__(spec, arg, **options)
        from atm.eval.providers import resolve_registry

        self.entry = resolve_registry(spec, arg)
        self.contract = model_contract(options, self.entry)
        self._answer = self.contract.answer_format
        self.schema = self.contract.schema
        self._pieces = self.contract.pieces
        self.template_check = self._check_template(options)
        if self.template_check.get("mismatch"):
            self._note("the model's prompt template differs from the one the items were rendered with "
                       f"({self.template_check['mismatch']}): the original experiment's failure mode")
        self._server = None  # atm.runtime.llama_server.LlamaServer
        self._delegate: OpenAIProvider | None = None
        self._runner = None  # atm.runtime.llamacpp.LlamaCppRunner
        self._grammar = None
        self._change_grammar = None
        self._lock = threading.Lock()
        self.batch_size = 16 if self.concurrency == 1 else 4 * self.concurrency
        if self.concurrency == 1:
            self._load()  # load now: a broken file fails before any item, and load time is not item time

    # ------------------------------------------------------------ checks
    def _check_template(self, options: dict[str, Any]) -> dict[str, Any]:
        from atm.prompting.template import Template

        ds = ((options.get("dataset_meta") or {}).get("template") or {}).get("yaml")
        if not ds or not self.entry.template:
            return {"checked": False}
        a = Template.from_yaml(self.entry.template, source=f"{self.entry.ref} template").spec
        b = Template.from_yaml(ds, source="the dataset's template").spec
        diff = [k for k in ("system", "instruction", "input", "answer") if getattr(a, k) != getattr(b, k)]
        return {"checked": True, "mismatch": ", ".join(diff) if diff else None}

    # ------------------------------------------------------------ engines
    def _start_server(self, options: dict[str, Any]) -> None:
        from atm.export.llamacpp import find_tool
        from atm.runtime.llama_server import LlamaServer

        if find_tool("llama-server") is None:
            self._note("llama-server not found (build it with `atm doctor --build`): ran in process, one request at a time")
            self.concurrency = 1
            return
        log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "atm-eval-logs"
        self._server = LlamaServer(self.entry.path, name=self.entry.ref, alias=self.entry.ref,
                                   parallel=self.concurrency, ctx_size=self._n_ctx(), threads=self.gen.get("threads"),
                                   threads_batch=False, metrics=False, log_dir=log_dir).start()
        base = self._server.base_url
        # llama-server's prompt cache: each slot keeps its last prompt's KV and a request reuses the
        # longest prefix it shares (the prefix every item starts with); cache_prompt says so
        # explicitly. The grammar is the in-process one (compact JSON in the schema's order): the
        # server's own json_schema grammar admits whitespace, and the model then pretty-prints
        # (SmolLM2: ~42 answer tokens instead of ~28).
        body = {"cache_prompt": bool(self.gen.get("prefix_cache", True)), "grammar": self.contract.grammar}
        self._delegate = OpenAIProvider(f"openai:{self.entry.ref}@{base}", f"{self.entry.ref}@{base}",
                                        **{**self.options, "api_key": self._server.api_key, "extra_body": body,
                                           "contract": self.contract})
        self.batch_size = self._delegate.batch_size

    def _n_ctx(self) -> int:
        """The suite's context size, capped at the model's trained context."""
        n = int(self.gen["n_ctx"])
        return min(n, int(self.entry.context_length)) if self.entry.context_length else n

    def _load(self):
        if self._runner is None:
            from atm.runtime.llamacpp import LlamaCppRunner

            self._runner = LlamaCppRunner(self.entry.path, n_ctx=self._n_ctx(), threads=self.gen.get("threads"),
                                          n_batch=512, seed=0, name=self.entry.ref,
                                          prefix_reuse=bool(self.gen.get("prefix_cache", True)))
            self._grammar = self._runner.grammar(self.contract.grammar)
            self._change_grammar = self._runner.grammar(self.contract.change_grammar)
        return self._runner

    # ------------------------------------------------------------ generate / loglik in process
    def _attempt(self, item: dict, mode: str) -> Prediction:
        runner = self._load()
        msgs = _messages(item)
        with self._lock:
            t0 = time.perf_counter()
            if mode == "loglik":
                return self._loglik(item["id"], msgs, t0)
            out = runner.chat(msgs, grammar=self._grammar, temperature=float(self.gen["temperature"]),
                              max_tokens=int(self.gen["max_tokens"]), seed=0)
            lat = time.perf_counter() - t0
            st = runner.last
        return parsed_prediction(item["id"], out.text, lat, finish_reason=out.finish_reason,
                                 tokens=token_counts(st.prompt, st.prompt_eval, st.completion),
                                 engine_s=round(st.decode_s, 6))

    def prompt_text(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """The prompt loglik scores after: ``messages`` under the GGUF's chat template, and whether
        tokenizing it adds bos."""
        return self._load().prompt(messages)

    def _loglik(self, item_id: str, msgs: list[dict[str, str]], t0: float) -> Prediction:
        """Class probabilities from the log-prob of each answer continuation.

        Everything is tokenized as ONE string (prompt + answer), exactly as in training: tokenizing
        the answer separately would add a spurious word-start token with sentencepiece-style
        vocabularies and merge differently at the boundaries ('NOOP"}' is one token in the tiny model).

        Advice first (``answer_format: advice-first``): nothing is decoded; the options are scored
        right after ``{"advice": "``, through the token that closes the advice string (what follows
        is the change, not the advice). Change first: the change is decoded greedily under its
        grammar, then the options are scored with the rest of the answer (``"}``). The prompt and
        the answer text before the options are evaluated once (and only past the cached prefix),
        each option's tokens on top of them (``LlamaCppRunner.score``).
        """
        runner = self._runner
        prompt, add_bos = self.prompt_text(msgs)

        def tok(text: str) -> list[int]:
            return runner.tokenize(text, add_bos)

        n_prompt = len(tok(prompt))
        pcs = self._pieces
        change = None
        n_gen = 0
        reused = None
        decode_s = 0.0
        if pcs["advice_first"]:
            prefix = prompt + pcs["before_advice"]
            tail = pcs["after_advice"]
        else:
            # the change comes first: decode just its digits (grammar = the schema's pattern), greedily
            out = runner.generate(tok(prompt + pcs["before_change"]), grammar=self._change_grammar, max_tokens=24,
                                  stop=['"'])
            text = out.text
            st = runner.last
            n_gen, reused, decode_s, gen_evaluated = st.completion, st.reused, st.decode_s, st.evaluated
            if not re.fullmatch(self.contract.change_pattern, text):
                return Prediction(id=item_id, raw=text[:RAW_KEEP], valid=False,
                                  reason=f"bad number: decoded predicted_open_change {text[:40]!r} is not valid",
                                  latency=time.perf_counter() - t0, extra={"mode": "loglik"},
                                  tokens=token_counts(n_prompt, n_prompt - st.reused, n_gen))
            change = text
            prefix = prompt + pcs["before_change"] + change + pcs["between"]
            tail = pcs["after_advice"]
        seqs = [tok(prefix + a + tail) for a in ADVICES]
        shared = seqs[0]
        start = min(len(s) for s in seqs)
        for v in seqs[1:]:
            start = min(start, common_prefix(shared, v))
        ends = [len(s) for s in seqs]
        if pcs["advice_first"]:
            ends = [self._closing_token(runner, s, start, tail) for s in seqs]
        lp_lists = runner.score(seqs, start, ends, prompt=n_prompt)
        st = runner.last
        lps = {a: float(sum(v)) for a, v in zip(ADVICES, lp_lists)}
        probs = probs_from_logliks(lps)
        adv = most_likely(probs)
        raw = self._answer.format(change=change or "0.00000000", advice=adv)
        lat = time.perf_counter() - t0
        if reused is None:  # advice first: the prompt went through score()
            tokens = token_counts(n_prompt, st.prompt_eval, 0, st.scored)
        else:  # the change's decode evaluated the prompt (and the answer's start); score() the options
            p_eval = max(n_prompt - reused, 0)
            tokens = token_counts(n_prompt, p_eval, n_gen, max(gen_evaluated + st.evaluated - p_eval - n_gen, 0))
        return Prediction(id=item_id, raw=raw, advice=adv, predicted_change=float(change) if change else None,
                          probs=probs, valid=True, latency=lat, tokens=tokens,
                          extra={"logprob": lps, "option_mass": float(sum(math.exp(v) for v in lps.values())),
                                 "decoded_tokens": n_gen, "scored_tokens": [e - start for e in ends],
                                 "engine_s": round(decode_s + st.decode_s, 6), "mode": "loglik"})

    @staticmethod
    def _closing_token(runner, seq: list[int], start: int, tail: str) -> int:
        """The end (exclusive) of the tokens through the one holding the advice's closing quote, the
        first character of ``tail``: token pieces are concatenated bytes of the text after
        ``start``. Everything when the pieces do not add up (then nothing is cut)."""
        pieces = [runner.llm.detokenize([t]) for t in seq[start:]]
        total = sum(len(p) for p in pieces)
        quote = total - len(tail.encode("utf-8"))  # byte offset of the closing quote in these pieces
        if not tail or quote < 0 or b"".join(pieces)[quote:] != tail.encode("utf-8"):
            return len(seq)
        acc = 0
        for k, p in enumerate(pieces):
            acc += len(p)
            if acc > quote:
                return start + k + 1
        return len(seq)

    def answer_format(self) -> str:
        return self._answer

    # ------------------------------------------------------------ dispatch
    def prepare(self, mode: str) -> None:
        """Start the engine this mode uses before the timed loop (a server's start-up is not item time)."""
        if mode == "generate" and self.concurrency > 1 and self._delegate is None and self._server is None:
            self._start_server(self.options)
        elif self.concurrency == 1 or mode == "loglik":
            self._load()

    def predict_iter(self, items: Sequence[dict], mode: str = "generate") -> Iterator[Prediction]:
        # loglik always runs in process: exact option log-probs from the logits (a server only returns
        # top-k logprobs of a generated answer, no faster); --concurrency serves generate mode.
        if mode == "generate" and self.concurrency > 1 and self._delegate is None and self._server is None:
            self._start_server(self.options)
        if mode == "loglik" and self.concurrency > 1:
            self._note("loglik ran in process (exact option log-probs); --concurrency applies to generate")
            self.concurrency = 1
            self._load()
        if self._delegate is not None and mode == "generate":
            yield from self._delegate.predict_iter(items, mode)
            if self._delegate.mode_note:
                self._note(self._delegate.mode_note)
            return
        yield from super().predict_iter(items, mode)

    def describe(self) -> dict[str, Any]:
        from atm.utils import versions

        d = {"spec": self.spec, "ref": self.entry.ref, "path": self.entry.path, "sha256": self.entry.sha256,
             "quant": self.entry.quant, "llamacpp": self.entry.llamacpp, "template_check": self.template_check,
             "engine": "llama-server" if self._delegate else "llama-cpp-python in process",
             "gpu_offload": self._runner.gpu_offload if self._runner is not None else None,
             "concurrency": self.concurrency,
             "constraint": "the answer contract's GBNF (atm.prompting.contract)",
             "llama-cpp-python": versions(("llama-cpp-python",)).get("llama-cpp-python")}
        return d

    def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
        if self._runner is not None:
            self._runner.close()
            self._runner = None


# ---------------------------------------------------------------------------------- transformers
class HFProvider(_Retrying):
    """``hf:PATH``: a transformers causal LM (batched; on GPU when one is present)."""

    supports_loglik = True

    def __init__(self, spec: str, arg: str, **options: Any):
        super().__init__(spec, arg, **options)
        self.path = arg
        self.batch_size = int(options.get("batch_size") or 16)
        self._model = None
        card = ModelCard.read(self.path)  # written by `atm finetune merge`: template + schema
        self.contract = model_contract(options, card)
        self._answer_format = self.contract.answer_format
        self._pieces = self.contract.pieces
        self.schema = self.contract.schema

    def _load(self):
        if self._model is None:
            from atm.runtime.hf import load_causal_lm

            lm = load_causal_lm(self.path)
            self._model, self.tok, self.device = lm.model, lm.tokenizer, lm.device
            self._torch = require("torch", "train")
        return self._model

    def _prompts(self, items: Sequence[dict]) -> list[str]:
        return [self.tok.apply_chat_template(_messages(it), add_generation_prompt=True, tokenize=False)
                for it in items]

    def predict_iter(self, items: Sequence[dict], mode: str = "generate") -> Iterator[Prediction]:
        self._load()
        for i in range(0, len(items), self.batch_size):
            chunk = list(items[i:i + self.batch_size])
            yield from (self._loglik(chunk) if mode == "loglik" else self._generate(chunk))

    def _generate(self, items: list[dict], max_new: int | None = None) -> list[Prediction]:
        torch = self._torch
        t0 = time.perf_counter()
        enc = self.tok(self._prompts(items), return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        from atm.prompting.hf_constraint import schema_processor

        with torch.no_grad():  # constrained to the schema, as every other engine is
            out = self._model.generate(**enc, max_new_tokens=max_new or int(self.gen["max_tokens"]), do_sample=False,
                                       pad_token_id=self.tok.pad_token_id,
                                       logits_processor=[schema_processor(self.tok, self.schema)])
        new = out[:, enc["input_ids"].shape[1]:]
        texts = self.tok.batch_decode(new, skip_special_tokens=True)
        lat = (time.perf_counter() - t0) / len(items)
        n_prompt = enc["attention_mask"].sum(dim=1).tolist()
        n_new = self._generated_lengths(new)
        # a batch evaluates every prompt whole (no prefix cache across batches)
        return [parsed_prediction(it["id"], txt, lat, batch=len(items), tokens=token_counts(p, p, c))
                for it, txt, p, c in zip(items, texts, n_prompt, n_new)]

    def _generated_lengths(self, new) -> list[int]:
        """Tokens each row generated: up to and including its first eos (the rest is padding)."""
        eos = self.tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        out = []
        for row in new.tolist():
            n = len(row)
            for k, t in enumerate(row):
                if t in eos_ids:
                    n = k + 1
                    break
            out.append(n)
        return out

    def _loglik(self, items: list[dict]) -> list[Prediction]:
        """Score 'prefix + option + closing quote' for the 3 options in one batched forward pass."""
        torch = self._torch
        t0 = time.perf_counter()
        pcs = self._pieces
        prompts = self._prompts(items)
        changes: list[str | None] = [None] * len(items)
        gen_tokens = [0] * len(items)
        if pcs["advice_first"]:
            prefixes = [p + pcs["before_advice"] for p in prompts]
        else:  # the change comes first: decode the answer greedily, take its change (strictly parsed)
            gens = self._generate(items, max_new=int(self.gen["max_tokens"]))
            for k, g in enumerate(gens):
                gen_tokens[k] = (g.tokens or {}).get("completion") or 0
                if g.valid and g.raw:
                    m = re.search(self.contract.change_pattern, g.raw)
                    changes[k] = m.group(0) if m else None
            prefixes = [p + pcs["before_change"] + (c or "0.00000000") + pcs["between"] for p, c in zip(prompts, changes)]
        seqs, plen = [], []
        n_prompts = [len(self.tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        # what follows the advice value, as the atm: provider scores it: change first, the rest of
        # the answer; advice first, through the token that holds the closing quote (the change
        # follows, not the advice)
        tail = pcs["after_advice"]
        for pre in prefixes:
            ids_pre = self.tok(pre, add_special_tokens=False)["input_ids"]
            for a in ADVICES:
                ids = self._through_quote(pre + a + tail, len(pre + a)) if pcs["advice_first"] else \
                    self.tok(pre + a + tail, add_special_tokens=False)["input_ids"]
                k = 0
                while k < min(len(ids_pre), len(ids)) and ids[k] == ids_pre[k]:
                    k += 1
                seqs.append(ids)
                plen.append(k)
        L = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id
        inp = torch.full((len(seqs), L), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), L), dtype=torch.long)
        for r, s in enumerate(seqs):  # left padding: the options end at the same column
            inp[r, L - len(s):] = torch.tensor(s)
            att[r, L - len(s):] = 1
        with torch.no_grad():
            logits = self._model(input_ids=inp.to(self.device), attention_mask=att.to(self.device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        out = []
        lat = (time.perf_counter() - t0) / len(items)
        for k, it in enumerate(items):
            lps = {}
            for j, a in enumerate(ADVICES):
                r = 3 * k + j
                s = seqs[r]
                off = L - len(s)
                lps[a] = float(sum(logp[r, off + q - 1, s[q]] for q in range(plen[r], len(s))))
            probs = probs_from_logliks(lps)
            adv = most_likely(probs)
            ch = changes[k]
            raw = self._answer_format.format(change=ch or "0.00000000", advice=adv)
            # each option is a whole row of the batch: the prompt is evaluated with each of them, so
            # what is evaluated past the prompt's first pass is counted as scored (nothing is cached)
            n_prompt = int(n_prompts[k])
            evaluated = sum(len(seqs[3 * k + j]) for j in range(len(ADVICES)))
            tokens = token_counts(n_prompt, n_prompt, gen_tokens[k], evaluated - n_prompt)
            out.append(Prediction(id=it["id"], raw=raw, advice=adv, predicted_change=float(ch) if ch else None,
                                  probs=probs, valid=True, latency=lat, tokens=tokens,
                                  extra={"logprob": lps, "mode": "loglik", "change_decoded": ch is not None}))
        return out

    def _through_quote(self, text: str, quote: int) -> list[int]:
        """The token ids of ``text`` up to and including the token that holds character ``quote``."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        for k, (_, end) in enumerate(offs):
            if end > quote:
                return list(ids[:k + 1])
        return list(ids)

    def describe(self) -> dict[str, Any]:
        from atm.utils import versions

        return {"spec": self.spec, "path": self.path, "device": getattr(self, "device", None),
                "batch_size": self.batch_size,
                "constraint": "lm-format-enforcer RegexParser(the answer contract's grammar), greedy, strictly parsed",
                **versions(("torch", "transformers"))}
