"""Providers: one small interface behind every ``--model`` spec, resolved through a lazy registry.

``--model`` takes ``PREFIX:REST`` (``atm:q8``, ``openai:MODEL@BASE_URL``, ``ollama:NAME``, ``hf:PATH``,
``vllm:DIR``, ``baseline:majority``, ``classic:lgbm[@runs/classic/X]``). The registry maps a prefix to
``"module:Class"`` and imports the module only when that prefix is used, so evaluating baselines
never imports torch or llama.cpp (the lm-eval style).

``openai:MODEL@URL1,URL2,...`` names several endpoints serving the same model: ``get_provider``
gives one provider per endpoint behind ``atm.eval.fanout.FanOut``, which sends each item to
whichever endpoint has a free slot and retries a dead endpoint's items on the others.

Beside the interface live what every LLM backend (``atm.eval.backends``) shares, so that ``fanout``
and the harness import no backend: ``GenerationSpec`` (how they are asked, typed), ``Transient``
(a failure worth retrying), ``retrying`` (THE retry loop: backoff on ``Transient``, the budget
``GenerationSpec.retries``), ``RequestProvider`` (one request per item: ``attempt(item, mode)``,
a thread pool of ``concurrency``), ``parsed_prediction`` (raw text -> Prediction through the one
strict parser) and ``item_messages``.
"""

from __future__ import annotations

import importlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence, TypeVar

from pydantic import Field

from atm.config import AtmConfig
from atm.errors import AtmError


class GenerationSpec(AtmConfig):
    """How LLM providers are asked."""

    max_tokens: int = Field(64, ge=1, description="answer token budget (a valid answer is ~25 tokens)")
    temperature: float = Field(0.0, ge=0, description="sampling temperature (0 = greedy)")
    timeout: float = Field(120.0, gt=0, description="per-request timeout in seconds")
    retries: int = Field(3, ge=0, description="retries of a timed-out / failed request before recording a failure")
    backoff: float = Field(0.5, ge=0, description="first retry delay in seconds (doubles each retry)")
    n_ctx: int = Field(4096, ge=256, description="context size for in-process llama.cpp")
    threads: int | None = Field(None, description="CPU threads for in-process engines (None: all cores)")
    prefix_cache: bool = Field(True, description="reuse the KV cache of the prefix items share (system prompt, "
                                                 "instruction, k-shot examples: evaluated once per run); false "
                                                 "evaluates every prompt whole, to measure what reuse saves "
                                                 "(in process, and llama-server's cache_prompt)")


@dataclass
class Prediction:
    """One model's answer for one item. Invalid answers are kept (valid=False, reason=...)."""

    id: str
    raw: str | None = None
    advice: str | None = None
    predicted_change: float | None = None
    probs: dict[str, float] | None = None  # class probabilities (loglik mode, classic models)
    valid: bool = False
    reason: str | None = None  # why invalid (or why the request failed)
    latency: float = 0.0
    # what the item cost the engine, in tokens (None where the engine does not say):
    # {"prompt": tokens of the prompt, "prompt_eval": of those, evaluated (the rest came from the
    #  prefix cache), "completion": tokens generated, "scored": answer tokens scored teacher-forced
    #  (loglik)}; see TOKEN_KEYS
    tokens: dict[str, int | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TOKEN_KEYS = ("prompt", "prompt_eval", "completion", "scored")


def token_counts(prompt: int | None = None, prompt_eval: int | None = None, completion: int | None = None,
                 scored: int | None = None) -> dict[str, int | None]:
    """A Prediction's ``tokens``: every key of TOKEN_KEYS, None where unknown."""
    vals = (prompt, prompt_eval, completion, scored)
    return {k: (None if v is None else int(v)) for k, v in zip(TOKEN_KEYS, vals)}


class Provider:
    """The interface: a name, optional fitting on train items, and batched prediction.

    ``items`` are rows (dicts) of a dataset's ``items`` view (docs/architecture.md). ``mode`` is
    ``"generate"`` or ``"loglik"``; a provider that cannot do loglik says so via ``supports_loglik``
    and the harness falls back to generate.
    """

    spec: str = ""
    supports_loglik: bool = False
    needs_fit: bool = False
    batch_size: int = 64  # items the harness hands over at once (results are written per item)
    mode_note: str | None = None  # set when the provider changed mode at run time (e.g. no logprobs)

    def __init__(self, spec: str, arg: str, **options: Any):
        self.spec = spec
        self.arg = arg
        self.options = options

    def fit(self, dataset_dir: str, train_items: Sequence[dict]) -> None:  # pragma: no cover - default
        """Train on the dataset's train split (baselines and classic models); LLMs do nothing."""

    def prepare(self, mode: str) -> None:
        """Start what predicting in ``mode`` needs (load a model, start a server) before the harness
        times the prediction loop. Default: nothing."""

    def predict(self, items: Sequence[dict], mode: str = "generate") -> list[Prediction]:
        raise NotImplementedError

    def predict_iter(self, items: Sequence[dict], mode: str = "generate") -> Iterator[Prediction]:
        """Yield predictions as they finish (any order). Default: one ``predict`` call.

        Providers with concurrent requests override this so the harness can write each result the
        moment it arrives (a kill loses only requests still in flight).
        """
        yield from self.predict(items, mode)

    def describe(self) -> dict[str, Any]:
        """What to record in the run manifest about this provider (versions, paths, hashes)."""
        return {"spec": self.spec}

    def close(self) -> None:
        """Release engines / processes started for the run."""


# ------------------------------------------------------------------------------------------------
# what the LLM backends share

RAW_KEEP = 4000  # characters of a raw answer kept in the results file (a rambling model can't bloat it)
T = TypeVar("T")


class Transient(Exception):
    """A failure worth retrying (timeout, connection drop, 5xx, 429)."""


def generation_spec(options: dict[str, Any]) -> GenerationSpec:
    """The ``generation`` option as the typed ``GenerationSpec`` (a dict, a spec, or absent)."""
    g = options.get("generation") or {}
    return g if isinstance(g, GenerationSpec) else GenerationSpec(**g)


def retrying(call: Callable[[int], T], gen: GenerationSpec, retry_on: tuple[type[BaseException], ...] = (Transient,),
             give_up: tuple[type[BaseException], ...] = ()) -> T:
    """THE retry loop: ``call(attempt)`` (attempt counts from 0) until it returns, retrying an
    exception of ``retry_on`` (not one of ``give_up``) ``gen.retries`` times with exponential
    backoff from ``gen.backoff``; the last exception is raised."""
    delay = float(gen.backoff)
    for attempt in range(int(gen.retries) + 1):
        try:
            return call(attempt)
        except give_up:
            raise
        except retry_on:
            if attempt >= int(gen.retries):
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


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


def item_messages(item: dict) -> list[dict[str, str]]:
    """The item's prompt messages as the dataset holds them (shared prefix first)."""
    msgs = item.get("prompt")
    if not msgs:
        raise AtmError(f"item {item.get('id')}: no prompt messages in the items view")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


class RequestProvider(Provider):
    """A backend that asks one request per item: ``_attempt(item, mode)`` gives a Prediction or raises
    ``Transient``; ``predict_iter`` runs ``retrying`` around it on a pool of ``concurrency`` threads
    (fixed for the run). A request refused for what it is (a 4xx) is recorded, not retried."""

    retries_requests = True  # the harness does not retry what this provider already retried

    def __init__(self, spec: str, arg: str, **options: Any):
        super().__init__(spec, arg, **options)
        self.gen = generation_spec(options)
        self.concurrency = max(1, int(options.get("concurrency") or 1))
        self.batch_size = max(8, 4 * self.concurrency)
        self._note_lock = threading.Lock()

    def _attempt(self, item: dict, mode: str) -> Prediction:  # pragma: no cover - interface
        raise NotImplementedError

    def attempt(self, item: dict, mode: str) -> Prediction:
        """One request, no retry: a Prediction, or ``Transient`` (timeout, dropped connection, 5xx,
        429) for the caller to retry; ``atm.eval.fanout`` retries it on another endpoint."""
        return self._attempt(item, mode)

    def ask(self, item: dict, mode: str) -> Prediction:
        """One item through ``retrying``: its Prediction, or a recorded failure."""
        t0 = time.perf_counter()
        tries = [0]

        def call(attempt: int) -> Prediction:
            tries[0] = attempt + 1
            pred = self._attempt(item, mode)
            pred.extra["attempts"] = attempt + 1
            return pred

        try:
            return retrying(call, self.gen, give_up=(AtmError,))
        except AtmError:
            raise
        except Transient as exc:
            return Prediction(id=item["id"], valid=False, reason=f"request failed: {exc}"[:500],
                              latency=time.perf_counter() - t0, extra={"failed": True, "attempts": tries[0]})
        except Exception as exc:  # noqa: BLE001 - a non-transient request error: record it
            return Prediction(id=item["id"], valid=False, reason=f"request failed: {type(exc).__name__}: {exc}"[:500],
                              latency=time.perf_counter() - t0, extra={"failed": True, "attempts": tries[0]})

    def predict_iter(self, items: Sequence[dict], mode: str = "generate") -> Iterator[Prediction]:
        if self.concurrency == 1:
            for it in items:
                yield self.ask(it, mode)
            return
        with ThreadPoolExecutor(self.concurrency) as pool:
            futs = [pool.submit(self.ask, it, mode) for it in items]
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


def model_contract(options: dict[str, Any], model: Any = None) -> Any:
    """The answer contract of ``model`` (a registry entry, a model card, or None), the template the
    items were rendered with as the fallback (``atm.prompting.contract.resolve_contract``)."""
    from atm.prompting.contract import dataset_template_of, resolve_contract

    return resolve_contract(model, dataset_template=dataset_template_of(options.get("dataset_meta")))


# prefix -> "module:Class"; modules are imported only when their prefix is used.
REGISTRY: dict[str, str] = {
    "atm": "atm.eval.backends.atm:AtmProvider",
    "openai": "atm.eval.backends.openai:OpenAIProvider",
    "ollama": "atm.eval.backends.ollama:OllamaProvider",
    "hf": "atm.eval.backends.hf:HFProvider",
    "vllm": "atm.eval.backends.vllm:VLLMProvider",
    "baseline": "atm.eval.baselines:BaselineProvider",
    "classic": "atm.eval.classic.provider:ClassicProvider",
}

# prefixes whose ``MODEL@URL`` may list several endpoints of one model (``MODEL@URL1,URL2``)
FAN_OUT = ("openai",)
FANOUT_CLASS = "atm.eval.fanout:FanOut"

VALID_FORMS = (
    "atm:TAG (a registry name, e.g. atm:q8)",
    "openai:MODEL@BASE_URL (any OpenAI-compatible server; MODEL@URL1,URL2 fans out over several)",
    "ollama:NAME (an Ollama server at OLLAMA_HOST)",
    "hf:PATH (a Hugging Face model dir or hub id, transformers)",
    "vllm:DIR (an HF model dir served by vLLM for the run; `atm doctor --vllm` makes a CPU vLLM)",
    "baseline:random|majority|prior|momentum|persistence",
    "classic:logreg|lgbm|cnn|lstm[@RUN_DIR]",
)


def parse_spec(spec: str) -> tuple[str, str]:
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in REGISTRY:
        # registry names of other namespaces (e.g. mymodel:q4) resolve through the model registry
        from atm.export.registry import valid_name

        # a registry name may hold '-' and '.' (smollm2-135m:q8, qwen2.5:q4): any valid name:tag
        if sep and rest and valid_name(prefix) and valid_name(rest):
            return "atm", spec
        raise AtmError(f"unknown model {spec!r}; valid forms:\n  " + "\n  ".join(VALID_FORMS))
    return prefix, rest


def resolve_registry(spec: str, arg: str | None = None) -> Any:
    """The registry entry behind an ``atm:TAG`` (or ``mymodel:q4``) spec. An unregistered name lists
    the registered models and every valid form (``foo:bar`` may be a typo of another form)."""
    from atm.export.registry import Registry, UnknownModel

    if arg is None:
        arg = parse_spec(spec)[1]
    ref = arg if ":" in arg else spec  # registry refs are name:tag: atm:q8, or mymodel:q4 as given
    try:
        return Registry().resolve(ref)
    except UnknownModel as exc:
        raise AtmError(f"{exc}\nvalid forms of --model:\n  " + "\n  ".join(VALID_FORMS)) from None


def endpoint_args(prefix: str, rest: str) -> list[str]:
    """The single-endpoint args of a spec's ``REST``: ``MODEL@URL1,URL2`` -> ``[MODEL@URL1, MODEL@URL2]``;
    ``[rest]`` when it names one endpoint (or its prefix does not fan out)."""
    model, sep, urls = rest.partition("@")
    if prefix not in FAN_OUT or not sep or "," not in urls:
        return [rest]
    parts = [u.strip() for u in urls.split(",")]
    if not model or any(not u for u in parts):
        raise AtmError(f"{prefix}:{rest}: expected {prefix}:MODEL@URL1,URL2,... (no empty endpoint)")
    dup = sorted({u for u in parts if parts.count(u) > 1})
    if dup:
        raise AtmError(f"{prefix}:{rest}: endpoint {dup[0]} is listed twice (raise --concurrency to give one "
                       "endpoint more requests in flight)")
    return [f"{model}@{u}" for u in parts]


def _load(target: str) -> Any:
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def get_provider(spec: str, **options: Any) -> Provider:
    prefix, rest = parse_spec(spec)
    cls = _load(REGISTRY[prefix])
    args = endpoint_args(prefix, rest)
    if len(args) == 1:
        return cls(spec, rest, **options)
    fanout = _load(FANOUT_CLASS)  # by name, as the registry: fanout imports the providers it drives
    return fanout(spec, [cls(f"{prefix}:{a}", a, **options) for a in args], **options)


def model_kind(spec: str) -> str:
    try:
        prefix, _ = parse_spec(spec)
    except AtmError:
        return "llm"
    return prefix if prefix in ("baseline", "classic") else "llm"
