"""One prompt template, rendered the same way for training, Modelfiles, serving and eval.

A template is a YAML file in ``prompts/`` (see ``prompts/seed.yaml``). ``Template.render(context)``
returns chat messages in a fixed order: the shared prefix first (system prompt, then the k-shot
user/assistant pairs), then the one user message carrying this minute's context. Putting
everything that does not change between requests first lets llama-server's / vLLM's prefix caches
reuse it across requests.

The template travels as its YAML text (``Template.to_yaml()``): the dataset builder writes it,
with the few-shot examples it chose from the train split filled in, into ``dataset.json``; the
merge step copies it into ``atm_model.json``; the Modelfile writer, the server and the eval
harness re-load it from there with ``Template.from_yaml``. No stage re-types a prompt.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import yaml
from pydantic import Field, field_validator, model_validator

from atm.config import AtmConfig, validate
from atm.constants import ADVICES
from atm.errors import ConfigError
from atm.prompting.answer import DEFAULT_ANSWER


class Example(AtmConfig):
    """One k-shot example: the context text of a train-split minute and its answer."""

    context: str = Field(description="encoded market context of the example minute")
    advice: str = Field(description="the example's advice (its label): BUY, NOOP or SELL")
    change: str = Field(description="the example's predicted_open_change as an 8-decimal string")
    row: int | None = Field(default=None, description="row in klines.parquet it came from (None for hand-written)")
    open_time: str | None = Field(default=None, description="ISO time of that minute")
    split: str | None = Field(default=None, description="split the example was drawn from (always train)")

    @field_validator("advice")
    @classmethod
    def _advice(cls, v: str) -> str:
        if v not in ADVICES:
            raise ValueError(f"advice must be one of {ADVICES}")
        return v


class FewShot(AtmConfig):
    """How the builder picks k-shot examples when the template has none written in."""

    k: int = Field(default=0, ge=0, le=12, description="number of k-shot examples (0 = zero-shot)")
    seed: int = Field(default=0, description="random seed for choosing the examples")
    balanced: bool = Field(default=True, description="balance examples across BUY/NOOP/SELL")
    source_split: str = Field(default="train", description="split the examples come from (train only)")

    @field_validator("source_split")
    @classmethod
    def _train_only(cls, v: str) -> str:
        if v != "train":
            raise ValueError("few-shot examples may only come from the train split")
        return v


class TemplateSpec(AtmConfig):
    """The fields of a ``prompts/*.yaml`` template."""

    name: str = Field(description="template name")
    description: str = Field(default="", description="what the template is for")
    system: str = Field(default="", description="system prompt ('' = no system message); may use {instruction}")
    instruction: str = Field(description="the task instruction")
    input: str = Field(default="{instruction}\n\nInput:\n{context}",
                       description="user message; placeholders {instruction} and {context}")
    answer_format: Literal["change-first", "advice-first"] | None = Field(
        default=None, description="which value the answer writes first: change-first (the original's) or "
        "advice-first (loglik scores the advice right after the prompt); sets the default `answer` and the "
        "schema's property order, which constrained decoding follows (default: read from `answer`)")
    answer: str = Field(default=DEFAULT_ANSWER,
                        description="assistant answer (str.format with {change} and {advice}; braces doubled); "
                        "its order must match answer_format")
    schema_file: str = Field(default="advice.schema.json", alias="schema",
                             description="JSON Schema of the answer, relative to prompts/")
    encoder: str | None = Field(default=None, description="encoder the template is written for (a default)")
    encoder_config: dict[str, Any] = Field(default_factory=dict, description="default encoder settings")
    fewshot: FewShot = Field(default_factory=FewShot, description="how k-shot examples are chosen")
    examples: list[Example] = Field(default_factory=list,
                                    description="k-shot examples (written in, or filled by the builder from train)")

    model_config = AtmConfig.model_config | {"populate_by_name": True}

    @model_validator(mode="before")
    @classmethod
    def _answer_format(cls, data: Any) -> Any:
        """``answer_format`` alone picks its answer text; ``answer`` alone gives its format; both must agree."""
        from atm.prompting.answer import ANSWER_FORMATS, answer_order

        if not isinstance(data, dict):
            return data
        fmt, answer = data.get("answer_format"), data.get("answer")
        if fmt is not None and fmt not in ANSWER_FORMATS:
            return data  # the Literal reports it
        if answer is None:
            return {**data, "answer_format": fmt or "change-first",
                    "answer": ANSWER_FORMATS[fmt or "change-first"]}
        if not isinstance(answer, str):
            return data
        try:
            order = answer_order(answer)
        except (ValueError, KeyError, IndexError):
            return data  # Template() reports placeholder errors with the file name
        if fmt is not None and fmt != order:
            raise ValueError(f"answer_format is {fmt} but the answer writes "
                             f"{'the advice' if order == 'advice-first' else 'the change'} first: {answer!r}")
        return {**data, "answer_format": order}

    @field_validator("input")
    @classmethod
    def _input(cls, v: str) -> str:
        if v.count("{context}") != 1:
            raise ValueError("input must contain {context} exactly once")
        return v


class Template:
    """A loaded template. ``render(context)`` -> chat messages; ``answer(advice, change)`` -> JSON."""

    def __init__(self, spec: TemplateSpec, path: str | None = None):
        self.spec = spec
        self.path = path
        try:
            self._system = spec.system.format(instruction=spec.instruction) if spec.system else ""
            head, tail = spec.input.split("{context}")
            self._user_head = head.format(instruction=spec.instruction)
            self._user_tail = tail.format(instruction=spec.instruction)
            probe = spec.answer.format(change="0.00000000", advice="NOOP")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"{path or spec.name}: template placeholder error: {exc!r} "
                              "(literal braces must be doubled: {{ }})") from None
        from atm.prompting.advice import parse_advice

        parsed = parse_advice(probe)
        if not parsed.valid:
            raise ConfigError(f"{path or spec.name}: the answer format does not give a valid answer "
                              f"({parsed.reason}: {parsed.detail}): {probe!r}")
        self._prefix = self._build_prefix()

    # ---------------------------------------------------------------- loading / travelling
    @classmethod
    def load(cls, path: str | Path) -> "Template":
        """Load ``prompts/NAME.yaml`` (a path, or a bare name looked up in the checkout's prompts/)."""
        p = resolve_template_path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read template: {exc}") from None
        return cls.from_yaml(text, source=str(p))

    @classmethod
    def from_yaml(cls, text: str, source: str = "template") -> "Template":
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        return cls(validate(TemplateSpec, data, source=source), path=source)

    def to_dict(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        """The template as YAML text (with its examples): what travels in dataset.json / atm_model.json."""
        return yaml.dump(self.to_dict(), Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=10**6)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()

    @property
    def name(self) -> str:
        return self.spec.name

    def with_examples(self, examples: Sequence[Example | dict]) -> "Template":
        """A copy whose k-shot examples are ``examples`` (the builder's choice from train)."""
        data = self.to_dict()
        data["examples"] = [e.model_dump(mode="json") if isinstance(e, Example) else dict(e)
                            for e in examples]
        return Template(validate(TemplateSpec, data, source=self.path or self.name), path=self.path)

    @property
    def answer_format(self) -> str:
        """``"change-first"`` or ``"advice-first"``: the order the answer writes its two values."""
        return self.spec.answer_format or "change-first"

    def schema(self) -> dict[str, Any]:
        """The answer schema, its properties in this template's answer order (constrained decoding
        writes them in schema order)."""
        from atm.prompting.advice import load_schema

        return load_schema(self.answer_format)

    # ---------------------------------------------------------------- rendering
    def answer(self, advice: str, predicted_change: float | str) -> str:
        """The assistant's JSON text for ``advice`` and a predicted change (float or 8-decimal str)."""
        if advice not in ADVICES:
            raise ValueError(f"advice must be one of {ADVICES}, got {advice!r}")
        change = predicted_change if isinstance(predicted_change, str) else format_change(predicted_change)
        return self.spec.answer.format(change=change, advice=advice)

    def user_message(self, context: str) -> str:
        return self._user_head + context + self._user_tail

    def _build_prefix(self) -> list[dict[str, str]]:
        msgs: list[dict[str, str]] = []
        if self._system:
            msgs.append({"role": "system", "content": self._system})
        for ex in self.spec.examples:
            msgs.append({"role": "user", "content": self.user_message(ex.context)})
            msgs.append({"role": "assistant", "content": self.answer(ex.advice, ex.change)})
        return msgs

    def prefix(self) -> list[dict[str, str]]:
        """The shared prefix: system message and k-shot pairs (identical for every minute)."""
        return [dict(m) for m in self._prefix]

    @property
    def system_text(self) -> str:
        return self._system

    def render(self, context: str) -> list[dict[str, str]]:
        """Chat messages for one minute: shared prefix first, then the user message with ``context``."""
        return [*self.prefix(), {"role": "user", "content": self.user_message(context)}]

    def render_many(self, contexts: Iterable[str]) -> list[list[dict[str, str]]]:
        return [self.render(c) for c in contexts]

    def user_parts(self) -> tuple[str, str]:
        """The user message is ``head + context + tail``."""
        return self._user_head, self._user_tail

    def answers_arrow(self, advices, changes):
        """``answer`` for many rows at once: pyarrow string arrays in, a string array out."""
        import pyarrow.compute as pc

        pieces = self.spec.answer.format(change="\x00C\x00", advice="\x00A\x00").split("\x00")
        args = [changes if p == "C" and i % 2 else advices if p == "A" and i % 2 else p
                for i, p in enumerate(pieces) if p or i % 2]
        return pc.binary_join_element_wise(*args, "")

    def user_messages(self, contexts: Sequence[str] | np.ndarray) -> list[str]:
        """The per-minute user message text for many contexts (the fast path for the builder)."""
        h, t = self._user_head, self._user_tail
        return [h + c + t for c in contexts]


class _BlockDumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings as ``|`` blocks (readable in dataset.json / cards)."""


def _str_representer(dumper: yaml.SafeDumper, data: str):
    if "\n" in data and not any(ch in data for ch in "\r\t") and data == data.rstrip(" "):
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_BlockDumper.add_representer(str, _str_representer)


def answer_format_of(template_yaml: str | None) -> str:
    """The ``answer`` format of a template given as YAML text (as it travels in dataset.json,
    atm_model.json and registry entries); the default format when there is none."""
    if not template_yaml:
        return DEFAULT_ANSWER
    return Template.from_yaml(template_yaml, source="the model's template").spec.answer


def format_change(value: float) -> str:
    """An 8-decimal string as the schema requires ('%.8f'; -0 written as 0)."""
    s = "%.8f" % float(value)
    return "0.00000000" if s == "-0.00000000" else s


def resolve_template_path(path: str | Path) -> Path:
    p = Path(path)
    if p.exists():
        return p
    if p.suffix == "" and len(p.parts) == 1:
        from atm.utils import repo_root

        root = repo_root()
        if root is not None and (root / "prompts" / f"{p.name}.yaml").exists():
            return root / "prompts" / f"{p.name}.yaml"
    raise ConfigError(f"{path}: template not found (give a path or the name of a file in prompts/)")


def choose_examples(labels: np.ndarray, candidate_rows: np.ndarray, k: int, seed: int = 0,
                    balanced: bool = True) -> np.ndarray:
    """Pick ``k`` example rows among ``candidate_rows`` (train-split rows with a label), fixed by seed.

    Balanced: as equal a number of BUY, NOOP and SELL as possible (round-robin in a seeded class
    order); the result is shuffled with the same seed so no class always sits last.
    """
    if k <= 0 or len(candidate_rows) == 0:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    candidate_rows = np.asarray(candidate_rows, dtype=np.int64)
    labs = np.asarray(labels, dtype=object)[candidate_rows]
    if not balanced:
        return np.sort(rng.choice(candidate_rows, size=min(k, len(candidate_rows)), replace=False))
    pools = {a: list(rng.permutation(candidate_rows[labs == a])) for a in ADVICES}
    order = list(rng.permutation(len(ADVICES)))
    picked: list[int] = []
    while len(picked) < k and any(pools.values()):
        for i in order:
            pool = pools[ADVICES[i]]
            if pool and len(picked) < k:
                picked.append(int(pool.pop()))
    return np.asarray(rng.permutation(picked), dtype=np.int64)
