"""The answer contract of a model: what it was trained to read and write, resolved in ONE place.

``resolve_contract(...) -> AnswerContract`` gives a model's prompt template, answer format (and
its order), answer schema (properties in answer order), answer pieces (the text around the two
values), grammar (the GBNF every engine enforces) and encoder. ``atm serve``, every ``atm-eval``
provider, ``atm export gguf`` and the Modelfile writer call it; nothing else derives these.

The one fallback chain, each field taken from the first source that has it:

- template: an explicit override (``atm serve``'s ``template:``) > the model's own (``atm_model.json``
  / registry entry) > the template the eval items were rendered with (``dataset.json``) > none;
- answer format: that template's ``answer`` text > ``DEFAULT_ANSWER`` (change first);
- schema: the model's saved schema > ``load_schema``; either way its properties in the answer
  format's order (a schema saved without a template carries the default order, not a trained one);
- encoder: the model's saved encoder (``{"name": ..., **config}``) > the template's encoder and
  its config > ``seed-json``.

``grammar`` is ``atm.prompting.llama_schema.answer_gbnf(schema)``: the same GBNF goes to llama.cpp
in process, to llama-server (as ``grammar``, never its own ``json_schema`` grammar, which must start
with ``{`` and admits free whitespace), to vLLM (xgrammar ``structured_outputs.grammar``) and, as
the equivalent regex, to transformers; so the set of answers a model may write is the same on
every engine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Mapping

from atm.prompting.answer import DEFAULT_ANSWER, answer_order, answer_pieces, change_pattern

DEFAULT_ENCODER = "seed-json"


@dataclass(frozen=True)
class AnswerContract:
    """What a model reads and writes (see the module docstring for where each field comes from)."""

    template_yaml: str | None
    answer_format: str  # the answer text, str.format with {change} and {advice}
    schema: dict[str, Any] = field(hash=False, compare=False)
    encoder: dict[str, Any] = field(hash=False, compare=False)  # {"name": ..., **config}
    source: dict[str, str] = field(default_factory=dict, hash=False, compare=False)  # field -> where from

    @property
    def order(self) -> str:
        """``"change-first"`` or ``"advice-first"``."""
        return answer_order(self.answer_format)

    @property
    def pieces(self) -> dict[str, Any]:
        """``answer_pieces(answer_format)``: the text before/between/after the two values."""
        return answer_pieces(self.answer_format)

    @property
    def change_pattern(self) -> str:
        return change_pattern(self.schema)

    @functools.cached_property
    def grammar(self) -> str:
        """The GBNF of the answer (one optional leading space, compact JSON in schema order)."""
        from atm.prompting.llama_schema import answer_gbnf

        return answer_gbnf(self.schema)

    @functools.cached_property
    def change_grammar(self) -> str:
        """The GBNF of the change's digits and closing quote (loglik decodes it before scoring)."""
        from atm.prompting.llama_schema import change_gbnf

        return change_gbnf(self.schema)

    @functools.cached_property
    def regex(self) -> str:
        """The grammar as a regular expression (transformers' constrained decoder)."""
        from atm.prompting.llama_schema import gbnf_regex

        return gbnf_regex(self.grammar)

    def template(self):
        """The prompt template (``atm.prompting.template.Template``); None when none is known."""
        if not self.template_yaml:
            return None
        return _template(self.template_yaml)

    def encoder_spec(self) -> tuple[str, dict[str, Any]]:
        cfg = dict(self.encoder)
        return cfg.pop("name"), cfg

    def get_encoder(self):
        from atm.prompting.encoders import get_encoder

        name, cfg = self.encoder_spec()
        return get_encoder(name, **cfg)

    def describe(self) -> dict[str, Any]:
        return {"answer_format": self.order, "encoder": self.encoder.get("name"),
                "template": (self.template().name if self.template_yaml else None), "source": dict(self.source)}


@functools.lru_cache(maxsize=32)
def _template(text: str):
    from atm.prompting.template import Template

    return Template.from_yaml(text, source="the model's template")


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def resolve_contract(model: Any = None, *, template_yaml: str | None = None,
                     dataset_template: str | None = None, schema: Mapping[str, Any] | None = None,
                     encoder: Mapping[str, Any] | str | None = None) -> AnswerContract:
    """The answer contract of ``model`` (a ``ModelCard``, a registry ``Entry``, or any object or
    mapping with ``template`` / ``schema`` / ``encoder``; None for a model that has no card).

    ``template_yaml``: an explicit template (it overrides the model's); ``dataset_template``: the
    template the items were rendered with (used only when the model has none); ``schema`` /
    ``encoder``: explicit values that override the model's. The chain is the module docstring's.
    """
    source: dict[str, str] = {}
    tpl = None
    for where, text in (("override", template_yaml), ("model", _field(model, "template")),
                        ("dataset", dataset_template)):
        if isinstance(text, str) and text:
            tpl, source["template"] = text, where
            break
    t = _template(tpl) if tpl else None
    fmt = t.spec.answer if t is not None else DEFAULT_ANSWER
    source["answer_format"] = "template" if t is not None else "default"

    sch = schema if schema else _field(model, "schema")
    if isinstance(sch, Mapping) and sch:
        # a saved schema's properties, in the answer format's order: an export of a model without a
        # template saved the default (change-first) order, which must not override the order the
        # answer is written in (the template the items were rendered with)
        sch, source["schema"] = in_order(sch, answer_order(fmt)), ("override" if schema else "model")
    else:
        from atm.prompting.advice import load_schema

        sch, source["schema"] = load_schema(answer_order(fmt)), "answer format"

    enc = encoder if encoder else _field(model, "encoder")
    if isinstance(enc, str):
        enc = {"name": enc}
    if isinstance(enc, Mapping) and enc.get("name"):
        enc, source["encoder"] = dict(enc), ("override" if encoder else "model")
    elif t is not None and t.spec.encoder:
        enc = {"name": t.spec.encoder, **t.spec.encoder_config, **dict(enc or {})}
        source["encoder"] = "template"
    else:
        enc, source["encoder"] = {"name": DEFAULT_ENCODER, **dict(enc or {})}, "default"
    return AnswerContract(template_yaml=tpl, answer_format=fmt, schema=sch, encoder=enc, source=source)


def in_order(schema: Mapping[str, Any], order: str) -> dict[str, Any]:
    """A copy of an answer schema with ``properties`` and ``required`` in ``order``'s key order
    (``"change-first"`` / ``"advice-first"``); other keys kept after them, as they were."""
    keys = ("advice", "predicted_open_change") if order == "advice-first" else ("predicted_open_change", "advice")
    out = dict(schema)
    props = schema.get("properties")
    if isinstance(props, Mapping):
        out["properties"] = {**{k: props[k] for k in keys if k in props},
                             **{k: v for k, v in props.items() if k not in keys}}
    req = schema.get("required")
    if isinstance(req, list):
        out["required"] = [k for k in keys if k in req] + [k for k in req if k not in keys]
    return out


def dataset_template_of(dataset_meta: Mapping[str, Any] | None) -> str | None:
    """The template YAML a dataset's items were rendered with (``dataset.json``'s ``template.yaml``)."""
    t = (dataset_meta or {}).get("template")
    return t.get("yaml") if isinstance(t, Mapping) else None
