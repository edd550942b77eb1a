"""Real token counts of ATM prompts, with each model family's own tokenizer and chat template.

What a prompt costs decides what is feasible: on 2 CPU cores a 135M model reads ~170 prompt tokens
a second, so the dataset card's old ``chars / 4`` guess (SmolLM2 splits every digit into its own
token: the seed-json context is ~2x that guess) could not say whether an experiment fits. Here a
prompt is counted as an engine sees it: the chat messages rendered by the model's chat template
(generation prompt added), tokenized without adding special tokens again (what transformers'
``apply_chat_template(tokenize=True)``, llama-server and vLLM do).

- ``load_counter(spec)``: ``spec`` is a family name (``FAMILIES``: ATM's rebuilt Qwen2.5,
  Llama-3.2, Phi-3 and SmolLM2 tokenizers in its cache, written by ``atm doctor --build``) or any
  Hugging Face tokenizer / model directory. A directory with a ``tokenizer.json`` is read with the
  ``tokenizers`` library and its chat template rendered in the Jinja sandbox transformers uses
  (same text, same ids; tested against ``apply_chat_template`` for every family), which loads the
  four families in ~2 s instead of ~7 s with transformers; other directories go through
  ``transformers.AutoTokenizer``. Nothing here imports torch.
- ``prefix_tokens(template, counter)``: the tokens every item's prompt shares (system prompt,
  k-shot pairs, the user turn's header and instruction: the template puts them first), i.e. what
  a prefix cache (llama-server's ``cache_prompt``, vLLM's prefix caching, a reused KV cache)
  evaluates once. The per-item cost with reuse is the whole prompt minus this.
- ``count_items(template, counter, contexts, answers)``: whole prompt, per-item part, context alone
  and answer, per item; ``summary`` / ``token_table_lines`` for the dataset card and the CLI.

Optional: counting needs ``tokenizers`` and ``jinja2`` (``pip install 'atm[tokens]'``); without
them the dataset build still runs and its card says that no count was made.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from atm.errors import AtmError

log = logging.getLogger(__name__)

#: The families whose real tokenizers ATM rebuilds offline (atm.finetune.families.FAMILIES).
FAMILIES: tuple[str, ...] = ("qwen2.5", "llama-3.2", "phi-3", "smollm2")

# Contexts whose first characters differ in kind (digit, sign, brace, quote, letter, dot): the
# shared prefix is the token prefix common to all of them and to the real contexts counted, so a
# token merged across the end of the instruction is not counted as shared. (Whitespace is not a
# probe: no encoder starts a context with it, and ":\n" + "\n" merges in byte-level BPEs.)
PROBES: tuple[str, ...] = ("0", "-1", "{", "[", '"', "a", "Z", "x y", ".")


class TokenizerUnavailable(AtmError):
    """A tokenizer cannot be loaded here (not built yet, a package missing): the message says how."""


# ---------------------------------------------------------------------------------------------
# counters


@dataclass(frozen=True)
class TokenCounter:
    """One tokenizer with its chat template. ``render`` gives the prompt text an engine sees,
    ``encode_batch`` the ids of texts (no special tokens added: they are in the rendered text)."""

    name: str
    source: str
    render: Callable[[Sequence[Mapping[str, str]], bool], str]
    encode_batch: Callable[[list[str]], list[list[int]]]

    def prompt_ids(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode_batch([self.render(messages, add_generation_prompt)])[0]

    def count(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray([len(x) for x in self.encode_batch(list(texts))], dtype=np.int64)


def family_tokenizer_dir(name: str) -> Path:
    """Where ATM keeps family ``name``'s rebuilt tokenizer (one per llama-cpp-python version, whose
    llama.cpp source it is rebuilt from): ``~/.cache/atm/tokenizers/<family>-llama.cpp-<version>``."""
    from importlib import metadata

    from atm.utils import cache_dir

    try:
        version = metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise TokenizerUnavailable(
            f"the {name} tokenizer is rebuilt from the llama.cpp source of the installed llama-cpp-python, "
            "which is not installed. Install it with: pip install 'atm[export]' -c constraints.txt") from None
    return cache_dir() / "tokenizers" / f"{name}-llama.cpp-{version}"


def resolve(spec: str) -> tuple[str, Path]:
    """(display name, tokenizer dir) of a family name or a directory."""
    key = spec.strip().lower()
    if key in FAMILIES:
        d = family_tokenizer_dir(key)
        if not (d / "tokenizer.json").is_file():
            raise TokenizerUnavailable(
                f"the {key} tokenizer is not built on this machine yet ({d}); build the family "
                "tokenizers once (offline, ~20 s) with: atm doctor --build")
        return key, d
    p = Path(spec).expanduser()
    if p.is_dir():
        return p.name, p
    raise AtmError(f"{spec!r} is neither a model family ({', '.join(FAMILIES)}) nor a tokenizer / model "
                   "directory")


def load_counter(spec: str) -> TokenCounter:
    """The counter for a family name or a tokenizer / model directory (cached per process)."""
    name, path = resolve(spec)
    tj = path / "tokenizer.json"
    stamp = tj.stat().st_mtime_ns if tj.is_file() else 0
    return _load(name, str(path.resolve()), stamp)


@functools.lru_cache(maxsize=16)
def _load(name: str, path: str, stamp: int) -> TokenCounter:
    d = Path(path)
    log.debug("loading the %s tokenizer from %s", name, d)
    if stamp:
        template, specials = _chat_template_and_specials(d)
        if template is not None:
            return _fast_counter(name, d, template, specials)
    return _transformers_counter(name, d)


def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):  # a serialized AddedToken
        return v["content"]
    return None


def _chat_template_and_specials(d: Path) -> tuple[str | None, dict[str, str]]:
    """The chat template (``chat_template.jinja``, or ``tokenizer_config.json``'s when it is one
    string) and the special tokens transformers passes to it (``bos_token``, ``eos_token``, ...)."""
    cfg: dict[str, Any] = {}
    for f in ("special_tokens_map.json", "tokenizer_config.json"):
        if (d / f).is_file():
            try:
                cfg.update(json.loads((d / f).read_text(encoding="utf-8")))
            except json.JSONDecodeError as exc:
                raise AtmError(f"{d / f}: not valid JSON: {exc}") from None
    specials = {k: t for k, v in cfg.items() if k.endswith("_token") and (t := _token_text(v)) is not None}
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8"), specials
    ct = cfg.get("chat_template")
    return (ct if isinstance(ct, str) else None), specials


def _fast_counter(name: str, d: Path, template: str, specials: dict[str, str]) -> TokenCounter:
    from atm.errors import require

    tokenizers = require("tokenizers", "tokens")
    compiled = _compile(template)
    tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))

    def render(messages, add_generation_prompt: bool) -> str:
        return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               **specials)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    return TokenCounter(name=name, source=str(d), render=render, encode_batch=encode_batch)


def _compile(template: str):
    """The chat template compiled in the environment transformers renders chat templates in:
    a sandbox with ``trim_blocks``, ``lstrip_blocks``, loop controls, ``{% generation %}`` blocks,
    ``raise_exception``,
    ``strftime_now`` and a ``tojson`` that does not escape HTML (ATM's family templates have their
    dates pinned, so the clock does not show)."""
    from datetime import datetime

    from atm.errors import require

    require("jinja2", "tokens")
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask markers): the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _transformers_counter(name: str, d: Path) -> TokenCounter:
    from atm.errors import require

    transformers = require("transformers", "train")
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    if getattr(tok, "chat_template", None) is None and (d / "chat_template.jinja").is_file():
        tok.chat_template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    if getattr(tok, "chat_template", None) is None:
        raise AtmError(f"{d}: the tokenizer has no chat template, so no chat prompt can be counted")

    def render(messages, add_generation_prompt: bool) -> str:
        return tok.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                       add_generation_prompt=add_generation_prompt)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [list(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]

    return TokenCounter(name=name, source=str(d), render=render, encode_batch=encode_batch)


def missing_packages() -> list[str]:
    """The packages counting needs that are not installed (none imported to find out)."""
    import importlib.util

    def absent(m: str) -> bool:
        try:
            return importlib.util.find_spec(m) is None
        except (ImportError, ValueError):  # blocked (sys.modules[m] = None) or broken
            return True

    return [m for m in ("tokenizers", "jinja2") if absent(m)]


# ---------------------------------------------------------------------------------------------
# counting


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all of ``seqs`` share."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def prefix_tokens(template, counter: TokenCounter, contexts: Sequence[str] = ()) -> int:
    """Tokens of the prompt prefix every item shares with ``template`` under ``counter``.

    The longest common token prefix of the whole rendered prompts (chat template, generation
    prompt) of the probe contexts (``PROBES``) and of ``contexts``: the system prompt, the k-shot
    pairs and the user turn up to its context, as far as the tokenizer keeps them apart from the
    context. This is what a prefix cache evaluates once per prompt set.
    """
    ids = counter.encode_batch([counter.render(template.render(c), True) for c in (*PROBES, *contexts)])
    return common_prefix_len(ids)


@dataclass
class ItemCounts:
    """Token counts of a set of items under one counter: ``prefix`` (shared, one number) and per item
    ``prompt`` (whole chat prompt, generation prompt added), ``per_item`` = prompt - prefix,
    ``context`` (the context text alone) and ``answer`` (the assistant answer text alone)."""

    counter: str
    prefix: int
    prompt: np.ndarray
    per_item: np.ndarray
    context: np.ndarray
    answer: np.ndarray

    def summary(self) -> dict[str, Any]:
        return {"tokenizer": self.counter, "items": int(len(self.prompt)), "prefix": int(self.prefix),
                "prompt": stats(self.prompt), "per_item": stats(self.per_item),
                "context": stats(self.context), "answer": stats(self.answer)}


def count_items(template, counter: TokenCounter, contexts: Sequence[str],
                answers: Sequence[str] | None = None) -> ItemCounts:
    """Count ``contexts`` rendered with ``template`` (and their ``answers``) with ``counter``."""
    contexts = list(contexts)
    texts = [counter.render(template.render(c), True) for c in (*PROBES, *contexts)]
    ids = counter.encode_batch(texts)
    prefix = common_prefix_len(ids)
    prompt = np.asarray([len(x) for x in ids[len(PROBES):]], dtype=np.int64)
    return ItemCounts(counter=counter.name, prefix=prefix, prompt=prompt, per_item=prompt - prefix,
                      context=counter.count(contexts) if contexts else np.zeros(0, np.int64),
                      answer=counter.count(list(answers)) if answers else np.zeros(0, np.int64))


def stats(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x)
    if len(x) == 0:
        return {}
    q = np.percentile(x, [50, 95])
    return {"min": int(x.min()), "mean": round(float(x.mean()), 1), "p50": float(q[0]),
            "p95": float(q[1]), "max": int(x.max())}


def sample_positions(n: int, k: int) -> np.ndarray:
    """``k`` positions out of ``n``, evenly spaced, the first and the last included (all if n <= k)."""
    if n <= 0 or k <= 0:
        return np.zeros(0, dtype=np.int64)
    if n <= k:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


# ---------------------------------------------------------------------------------------------
# the card's table


def token_table_lines(tokens: Mapping[str, Any], splits: Sequence[str]) -> list[str]:
    """Markdown lines of the card's token section from ``dataset.json``'s ``tokens`` block."""
    lines = ["## Tokens per item (real tokenizers)", ""]
    note = tokens.get("note")
    counters = tokens.get("counters") or {}
    if not counters:
        return lines + [note or "No token counts were made.", ""]
    samp = tokens.get("sample") or {}
    sizes = ", ".join(f"{samp.get('counted', {}).get(s, 0):,} of {samp.get('items', {}).get(s, 0):,} {s}"
                      for s in splits)
    lines += [f"Counted on {sizes} items ({samp.get('rule', 'evenly spaced')}). Each prompt is the "
              "whole chat prompt an engine sees: the messages rendered with the model's own chat template, "
              "generation prompt added. The shared prefix (system prompt, k-shot pairs, the user turn up to "
              "its context) is the same for every item: with prefix reuse (llama-server's prompt cache, "
              "vLLM prefix caching) an item costs its per-item part only.", "",
              "| tokenizer | shared prefix | per item p50 (mean, max) | whole prompt p50 (max) | context alone p50 (max) | answer p50 |",
              "|---|---|---|---|---|---|"]
    for name, c in counters.items():
        if "error" in c:
            lines.append(f"| {name} | not counted: {c['error']} | | | | |")
            continue
        a = c["all"]
        pi, pr, cx, an = a["per_item"], a["prompt"], a["context"], a["answer"]
        lines.append(f"| {name} | {a['prefix']} | {pi['p50']:.0f} ({pi['mean']}, {pi['max']}) | "
                     f"{pr['p50']:.0f} ({pr['max']}) | {cx['p50']:.0f} ({cx['max']}) | {an.get('p50', 0):.0f} |")
    if note:
        lines += ["", note]
    return lines
