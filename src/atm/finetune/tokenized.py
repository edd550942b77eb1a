"""ORPO's tokenized training set: built in batches, stored once, reused by every rerun and resume.

TRL's ``ORPOTrainer.__init__`` prepares a dataset one example at a time (``maybe_extract_prompt``,
``maybe_apply_chat_template``, then ``tokenize_row``: four tokenizer calls per pair), writes the
result as a new HF datasets cache file (the bound ``tokenize_row`` has no stable hash, so a rerun
never finds it) and does it again on every run and every resume: ~250 pairs/s on 2 cores, 23 minutes
for a year of minutes, and ~30 KB of int64 columns per pair in ``~/.cache/huggingface``.

Here the same tokens come from batched calls, and the result is kept:

- Rendering is TRL's own: ``maybe_extract_prompt`` + ``maybe_apply_chat_template`` per row (the
  chat template decides every token, as in SFT, the server and the eval; see ``atm.finetune.orpo``).
- Tokenizing uses the fast tokenizer's batch call. A tokenizer splits its added (special) tokens out
  of the text before it normalizes, pre-tokenizes and encodes the pieces between them, each on its
  own; so ``tok(prompt + answer)`` is ``tok(prompt)`` up to the prompt's last added token (say
  ``<|im_start|>`` of ``<|im_start|>assistant\\n``) followed by ``tok(text from that token on)``.
  The ~500-token prompt is therefore encoded once per pair, not three times: the chosen and rejected
  sides only encode the short tail. Every batch compares its first rows with the plain
  ``tokenize_preference`` path and falls back to it for good on any difference (a tokenizer that does
  not split that way), and the trainer compares a few rows with TRL's own per-example pipeline
  before it trains (``atm.finetune.orpo``). Tokenizers without offsets (slow ones) use the plain
  path.
- Only what the tokens need is stored: prompt ids and each side's answer ids (int32); the trainer
  reads the ``chosen_*`` / ``rejected_*`` / ``prompt_*`` columns TRL's collator expects through a
  transform, exactly as ``tokenize_row`` makes them (~2 KB per pair instead of ~30).
- The cache lives in ``<tokenized_cache_dir or $ATM_TOKENIZED_CACHE or $ATM_CACHE/tokenized>/
  orpo-<key>/`` (``~/.cache/atm/tokenized`` by default), keyed on
  everything that changes the tokens: the split file's sha256 and the rows used
  (``max_train_samples``), the tokenizer (sha256 of its saved files, chat template included),
  ``max_length``, ATM's tokenization version and the versions of the libraries that render and
  tokenize. A changed input gives another key, so it is built anew; an entry is written under a
  temporary name and renamed when complete, so a killed build is never read (its leftovers are
  removed by the next build of that key).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atm.errors import AtmError, DataError, require

log = logging.getLogger(__name__)

# Bump when the code below changes the tokens it stores (the cache key includes it).
ORPO_TOKENIZATION_VERSION = 1
META_FILE = "atm_tokenized.json"
# Rows of each batch checked against the plain (three full encodes) path.
VERIFY_ROWS = 4
BATCH_SIZE = 512
ORPO_COLUMNS = ("chosen_input_ids", "chosen_attention_mask", "chosen_labels", "rejected_input_ids",
                "rejected_attention_mask", "rejected_labels", "prompt_input_ids",
                "prompt_attention_mask")


@dataclass
class Prepared:
    """A tokenized training set and what atm_run.json records about it."""

    dataset: Any  # datasets.Dataset with the trainer's columns (through a transform)
    raw: Any  # the rows it was made from (the trainer re-checks a few with TRL's own path)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def lengths(self) -> dict[str, Any]:
        return self.info["token_lengths"]


# ------------------------------------------------------------------------------ the cache key
def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer as saved (tokenizer.json, its config with the chat template, special
    tokens), without the path it was loaded from: the same tokenizer anywhere gives the same key."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="atm-tokfp-") as d:
        tok.save_pretrained(d)
        for p in sorted(Path(d).rglob("*")):
            if not p.is_file():
                continue
            data = p.read_bytes()
            if p.name == "tokenizer_config.json":
                cfg = json.loads(data)
                cfg.pop("name_or_path", None)
                data = json.dumps(cfg, sort_keys=True).encode()
            h.update(p.name.encode() + b"\0" + hashlib.sha256(data).digest())
    template = getattr(tok, "chat_template", None)
    h.update(b"chat_template\0" + json.dumps(template, sort_keys=True).encode())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("transformers", "tokenizers", "trl", "jinja2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "none"
    return out


def orpo_cache_inputs(data_file: Path, rows: int, max_length: int, tok,
                      selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the stored tokens depend on (the key is its sha256). ``selection``: how the rows
    were drawn from the file (max_train_samples, balance_labels): the same count of rows can be
    different rows."""
    from atm.utils import sha256_file

    return {"kind": "orpo", "version": ORPO_TOKENIZATION_VERSION,
            "data_sha256": sha256_file(data_file), "rows": rows, "selection": selection or {},
            "max_length": max_length,
            "tokenizer_sha256": tokenizer_fingerprint(tok), "tokenizer_class": type(tok).__name__,
            "libraries": library_versions()}


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def cache_root(configured: str | None = None) -> Path:
    """``tokenized_cache_dir`` of the recipe, else ``$ATM_TOKENIZED_CACHE``, else
    ``$ATM_CACHE/tokenized`` (``~/.cache/atm/tokenized``)."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("ATM_TOKENIZED_CACHE")
    if env:
        return Path(env).expanduser()
    from atm.utils import cache_dir

    return cache_dir() / "tokenized"


# ------------------------------------------------------------------------------ tokenizing
def _anchor_ids(tok) -> dict[int, str]:
    """Added tokens a tokenizer splits out before anything else looks at the text (not normalized,
    no lstrip / single-word matching that would look at the text before them): id -> text."""
    decoder = getattr(tok, "added_tokens_decoder", None) or {}
    return {i: t.content for i, t in decoder.items()
            if not getattr(t, "normalized", True) and not getattr(t, "lstrip", False)
            and not getattr(t, "single_word", False) and t.content}


def _common_prefix(a: str, b: str) -> str:
    """The longest common prefix of two strings (slice compares, not a Python loop per char)."""
    if b.startswith(a):
        return a
    lo, hi = 0, min(len(a), len(b))  # a[:lo] == b[:lo]; the first difference is before hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return a[:lo]


def _answer(p: list[int], full: list[int], answer_alone, max_length: int) -> list[int]:
    """``tokenize_preference``'s answer: the full ids after the prompt's (or the answer alone when
    a token merges across the boundary), cut so that prompt + answer fit ``max_length``."""
    ans = full[len(p):] if full[:len(p)] == p else answer_alone()
    if len(p) + len(ans) > max_length:
        ans = ans[:max(0, max_length - len(p))]
    return ans


class OrpoBatchTokenizer:
    """Turns preference rows (conversational prompt/chosen/rejected) into prompt ids and answer ids
    per side, exactly as ``tokenize_row`` of ``atm.finetune.orpo`` does, many rows per call."""

    def __init__(self, tok, max_length: int):
        self.tok = tok
        self.max_length = max_length
        self.anchors = _anchor_ids(tok)
        self.tail = bool(self.anchors)  # False: the plain path (full encodes) for every row

    def ids(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"] if texts else []

    def render(self, batch: dict[str, list]) -> list[dict[str, str]]:
        """TRL's ``maybe_extract_prompt`` + ``maybe_apply_chat_template`` of each row: the prompt is
        the common prefix of the prompt rendered with the generation prompt and of the two whole
        conversations, each side the rest of its conversation. The usual row (conversational, the
        prompt ending with a user turn, nothing else) is rendered here with the same three calls
        and a C-speed common prefix (TRL's char-by-char one costs more than the templates); any
        other row goes through TRL's functions themselves."""
        from trl.data_utils import is_conversational, maybe_apply_chat_template, maybe_extract_prompt

        keys = list(batch)
        plain_pairs = set(keys) == {"prompt", "chosen", "rejected"}
        out = []
        for i in range(len(batch[keys[0]])):
            ex = {k: batch[k][i] for k in keys}
            if plain_pairs and all(is_conversational({k: ex[k]}) for k in keys) and \
                    ex["prompt"][-1]["role"] in ("user", "tool"):
                render = self.tok.apply_chat_template
                gen = render(ex["prompt"], tokenize=False, add_generation_prompt=True)
                sides = [render(ex["prompt"] + ex[s], tokenize=False) for s in ("chosen", "rejected")]
                prompt = _common_prefix(_common_prefix(gen, sides[0]), sides[1])
                out.append({"prompt": prompt, "chosen": sides[0][len(prompt):],
                            "rejected": sides[1][len(prompt):]})
                continue
            ex = maybe_apply_chat_template(maybe_extract_prompt(ex), processing_class=self.tok)
            if not isinstance(ex["prompt"], str):
                raise DataError(f"ORPO prompt should be rendered text, got {type(ex['prompt']).__name__}")
            out.append(ex)
        return out

    def plain(self, rows: list[dict[str, str]]) -> list[tuple[list[int], list[int], list[int], int]]:
        """The reference: prompt, prompt + chosen, prompt + rejected, each encoded in full."""
        prompts = self.ids([r["prompt"] for r in rows])
        fulls = self.ids([r["prompt"] + r[s] for r in rows for s in ("chosen", "rejected")])
        out = []
        for i, (r, p) in enumerate(zip(rows, prompts)):
            fc, fr = fulls[2 * i], fulls[2 * i + 1]
            out.append((p, _answer(p, fc, lambda: self.ids([r["chosen"]])[0], self.max_length),
                        _answer(p, fr, lambda: self.ids([r["rejected"]])[0], self.max_length),
                        max(len(fc), len(fr))))
        return out

    def fast(self, rows: list[dict[str, str]]) -> list[tuple[list[int], list[int], list[int], int]] | None:
        """The prompt encoded once, each side from the prompt's last added token on; None when a
        row has no such token (then the plain path is used for the batch)."""
        prompts = self.ids([r["prompt"] for r in rows])
        cuts = []
        for r, p in zip(rows, prompts):
            j = next((k for k in range(len(p) - 1, -1, -1) if p[k] in self.anchors), None)
            if j is None:
                return None
            cuts.append((j, r["prompt"].rfind(self.anchors[p[j]])))
        tails = self.ids([(r["prompt"] + r[s])[c:] for r, (_, c) in zip(rows, cuts)
                          for s in ("chosen", "rejected")])
        out = []
        for i, (r, p, (j, _)) in enumerate(zip(rows, prompts, cuts)):
            fulls = []
            for t in (tails[2 * i], tails[2 * i + 1]):
                if not t or t[0] != p[j]:
                    return None
                fulls.append(p[:j] + t)
            out.append((p, _answer(p, fulls[0], lambda: self.ids([r["chosen"]])[0], self.max_length),
                        _answer(p, fulls[1], lambda: self.ids([r["rejected"]])[0], self.max_length),
                        max(len(fulls[0]), len(fulls[1]))))
        return out

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        rows = self.render(batch)
        res = None
        if self.tail:
            res = self.fast(rows)
            if res is not None:
                n = min(VERIFY_ROWS, len(rows))
                if res[:n] != self.plain(rows[:n]):
                    log.warning("the prompt-once ORPO tokenization differs from full encodes with this "
                                "tokenizer: using full encodes for the rest of the build")
                    self.tail, res = False, None
        if res is None:
            res = self.plain(rows)
        return {"prompt_input_ids": [r[0] for r in res], "chosen_answer_ids": [r[1] for r in res],
                "rejected_answer_ids": [r[2] for r in res], "length": [r[3] for r in res]}


def expand_orpo(batch: dict[str, list]) -> dict[str, list]:
    """The stored ids as the columns ``tokenize_row`` makes (what TRL's collator pads)."""
    out: dict[str, list] = {k: [] for k in ORPO_COLUMNS}
    for p, c, r in zip(batch["prompt_input_ids"], batch["chosen_answer_ids"], batch["rejected_answer_ids"]):
        for side, ans in (("chosen", c), ("rejected", r)):
            ids = p + ans
            out[f"{side}_input_ids"].append(ids)
            out[f"{side}_attention_mask"].append([1] * len(ids))
            out[f"{side}_labels"].append([-100] * len(p) + ans)
        out["prompt_input_ids"].append(p)
        out["prompt_attention_mask"].append([1] * len(p))
    return out


# ------------------------------------------------------------------------------ build / load
def _features():
    datasets = require("datasets", "train")
    ids = datasets.Sequence(datasets.Value("int32"))
    return datasets.Features({"prompt_input_ids": ids, "chosen_answer_ids": ids,
                              "rejected_answer_ids": ids, "length": datasets.Value("int32")})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_builds(root: Path, name: str) -> None:
    """Temp dirs a killed build of this entry left on this host (never read, removed here)."""
    prefix = f".{name}.tmp-{socket.gethostname()}-"
    for d in root.glob(f".{name}.tmp-*"):
        pid = d.name[len(prefix):] if d.name.startswith(prefix) else ""
        if pid.isdigit() and not _pid_alive(int(pid)):
            log.info("removing %s (left by a killed build)", d)
            shutil.rmtree(d, ignore_errors=True)


def _load(entry: Path, inputs: dict[str, Any]):
    """The stored dataset of a complete entry whose recorded inputs are ours, else None."""
    datasets = require("datasets", "train")
    meta_file = entry / META_FILE
    if not meta_file.is_file():
        return None, None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("inputs") != inputs:
            return None, None
        parts = [datasets.Dataset.from_file(str(entry / f)) for f in meta["files"]]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if len(ds) != inputs["rows"]:
            raise AtmError(f"{len(ds)} rows, expected {inputs['rows']}")
    except Exception as exc:  # a damaged entry is rebuilt, not trusted
        log.warning("tokenized cache %s is unreadable (%s): building it again", entry, exc)
        return None, None
    return ds, meta


def lengths_from(ds, max_length: int) -> dict[str, Any]:
    """check_lengths' figures over every row (tokens of prompt + the longer answer, uncut), and
    how many rows got an empty answer (a prompt that fills max_length)."""
    import pyarrow.compute as pc

    table = ds.data.table if hasattr(ds.data, "table") else ds.data
    n = table.column("length")
    rows = len(n)
    empty = sum(pc.sum(pc.equal(pc.list_value_length(table.column(c)), 0)).as_py() or 0
                for c in ("chosen_answer_ids", "rejected_answer_ids")) if rows else 0
    return {"checked": rows, "max": int(pc.max(n).as_py()) if rows else 0,
            "mean": round(pc.mean(n).as_py(), 1) if rows else None,
            "over": int(pc.sum(pc.greater(n, max_length)).as_py() or 0) if rows else 0,
            "empty_answers": int(empty), "max_length": max_length}


def prepare_orpo(raw, tok, data_file: str | Path, max_length: int, cache_dir: str | None = None,
                 use_cache: bool = True, num_proc: int | None = None, before_build=None,
                 selection: dict[str, Any] | None = None) -> Prepared:
    """The tokenized ORPO rows of ``raw`` (the preference view's prompt/chosen/rejected), from the
    cache when an entry with the same inputs exists, else built (and stored when ``use_cache``).
    ``before_build`` runs only when a build is needed (the sampled length check: a refused run
    should not first tokenize everything)."""
    t0 = time.perf_counter()
    inputs = orpo_cache_inputs(Path(data_file), len(raw), max_length, tok, selection)
    key = cache_key(inputs)
    entry = cache_root(cache_dir) / f"orpo-{key}"
    info: dict[str, Any] = {"key": key, "path": str(entry) if use_cache else None, "inputs": inputs}
    if use_cache:
        ds, meta = _load(entry, inputs)
        if ds is not None:
            info.update(hit=True, seconds=round(time.perf_counter() - t0, 3),
                        built_seconds=meta.get("build_seconds"), token_lengths=meta["token_lengths"])
            log.info("tokenized ORPO rows: %d from the cache %s (%.2f s)", len(ds), entry, info["seconds"])
            return Prepared(ds.with_transform(expand_orpo), raw, info)
    if before_build is not None:
        before_build()
    t1 = time.perf_counter()
    proc = num_proc if num_proc and num_proc > 1 and len(raw) >= 2 * BATCH_SIZE else None
    kw = dict(batched=True, batch_size=BATCH_SIZE, num_proc=proc, remove_columns=raw.column_names,
              features=_features(), load_from_cache_file=False, new_fingerprint=key,
              desc="Tokenizing ORPO pairs")
    fn = OrpoBatchTokenizer(tok, max_length)
    with _progress_bars():
        if use_cache:
            ds, lengths = _build_entry(raw, fn, kw, entry, inputs, t1, data_file)
        else:  # in memory (~2 KB a pair), nothing written
            ds = raw.map(fn, keep_in_memory=True, **kw)
            lengths = _lengths_checked(ds, max_length)
    build_s = round(time.perf_counter() - t1, 2)
    info.update(hit=False, seconds=round(time.perf_counter() - t0, 3), built_seconds=build_s,
                token_lengths=lengths, num_proc=proc)
    log.info("tokenized ORPO rows: %d in %.1f s (%.0f pairs/s)%s", len(raw), build_s,
             len(raw) / max(build_s, 1e-9), f", stored in {entry}" if use_cache else "")
    return Prepared(ds.with_transform(expand_orpo), raw, info)


def _build_entry(raw, fn, map_kwargs: dict[str, Any], entry: Path, inputs: dict[str, Any],
                 t_start: float, data_file) -> tuple[Any, dict[str, Any]]:
    """Build into a temp dir beside ``entry`` and rename it into place once complete."""
    root, name = entry.parent, entry.name
    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(root, name)
    work = root / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}"
    if entry.exists():  # damaged (unreadable) or a colliding key: replaced, not trusted
        os.rename(entry, work.with_name(work.name + "-old"))
        shutil.rmtree(work.with_name(work.name + "-old"), ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        built = raw.map(fn, cache_file_name=str(work / "data.arrow"), **map_kwargs)
        lengths = _lengths_checked(built, fn.max_length)
        meta = {"inputs": inputs, "key": entry.name.split("-", 1)[1],
                "files": [Path(f["filename"]).name for f in built.cache_files], "rows": len(built),
                "build_seconds": round(time.perf_counter() - t_start, 2), "token_lengths": lengths,
                "num_proc": map_kwargs.get("num_proc"), "data_file": str(data_file),
                "created": time.time()}
        del built
        (work / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: marks it complete
        try:
            os.rename(work, entry)
        except OSError:  # another process stored the same entry first: use that one
            log.info("%s was stored meanwhile by another process; using it", entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ds, _ = _load(entry, inputs)
    if ds is None:
        raise AtmError(f"the tokenized ORPO rows just stored in {entry} cannot be read back")
    return ds, lengths


@contextlib.contextmanager
def _progress_bars():
    """datasets' progress bars off while building when ATM's own bars are off
    (``atm.utils.progress_off``: ATM_NO_PROGRESS=1 or no terminal)."""
    from datasets.utils import logging as dlog

    from atm.utils import progress_off

    off = progress_off() and dlog.is_progress_bar_enabled()
    if off:
        dlog.disable_progress_bar()
    try:
        yield
    finally:
        if off:
            dlog.enable_progress_bar()


def _lengths_checked(ds, max_length: int) -> dict[str, Any]:
    lengths = lengths_from(ds, max_length)
    if lengths["empty_answers"]:
        log.warning("%d ORPO answers are empty: their prompts fill max_length=%d",
                    lengths["empty_answers"], max_length)
    return lengths
