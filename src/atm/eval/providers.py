"""Providers: one small interface behind every ``--model`` spec, resolved through a lazy registry.

``--model`` takes ``PREFIX:REST`` (``atm:q8``, ``openai:MODEL@BASE_URL``, ``ollama:NAME``, ``hf:PATH``,
``vllm:DIR``, ``baseline:majority``, ``classic:lgbm[@runs/classic/X]``). The registry maps a prefix to
``"module:Class"`` and imports the module only when that prefix is used, so evaluating baselines
never imports torch or llama.cpp (the lm-eval style).

``openai:MODEL@URL1,URL2,...`` names several endpoints serving the same model: ``get_provider``
gives one provider per endpoint behind ``atm.eval.fanout.FanOut``, which sends each item to
whichever endpoint has a free slot and retries a dead endpoint's items on the others.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

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


# prefix -> "module:Class"; modules are imported only when their prefix is used.
REGISTRY: dict[str, str] = {
    "atm": "atm.eval.llm:AtmProvider",
    "openai": "atm.eval.llm:OpenAIProvider",
    "ollama": "atm.eval.llm:OllamaProvider",
    "hf": "atm.eval.llm:HFProvider",
    "vllm": "atm.eval.vllm:VLLMProvider",
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
