"""Ollama Modelfiles generated from the same prompt template as training.

``modelfiles/<name>-<tag>.Modelfile`` carries: ``FROM`` (the registered GGUF), ``TEMPLATE`` (the
model's chat template translated to Ollama's Go template syntax), ``SYSTEM`` (the template's system
prompt), ``PARAMETER`` lines (greedy decoding, context, answer length, stops) and the template's
k-shot examples as ``MESSAGE`` pairs. Nothing is re-typed: the system text and examples come from
``atm.prompting.template.Template`` (the YAML stored in the manifest) and the chat template from
the GGUF itself.

Translating Jinja to Go: Ollama cannot run Jinja, so the chat template is *probed*: rendered with
sentinel messages to find, per role, the text before and after a message's content, the
generation prompt, and what differs for the message at index 0 (where Qwen2.5 and SmolLM2 put a
default system block when the first message is not a system message, and Llama 3.x a fixed
"Cutting Knowledge Date" header around the system text, or an empty one before a first user turn).
Also probed: whether content is stripped (Llama 3.x's ``|trim``; the Go side strips with a small
recursive template, as Go templates have no string functions), whether an empty message vanishes
(Phi-3's system turn), and a bos token the template writes itself. Dates are pinned first
(``atm.export.chat_template.pin_template_dates``). The result is rebuilt as a Go template that
uses only Go's built-in template functions over Ollama's ``.Messages``, and checked by rendering
several conversations both ways. A template outside that shape (one that folds the system prompt
into a user turn, renders the last turn differently, or has no system role) is refused with the
reason rather than translated wrongly.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atm.errors import AtmError
from atm.export.chat_template import PINNED_DATE, clean_chat_template, pin_template_dates, render_jinja
from atm.export.registry import Entry
from atm.utils import write_text_atomic

DEFAULT_NUM_PREDICT = 96  # the longest valid answer is ~70 characters; digits are one token each
DEFAULT_MAX_CTX = 4096

ROLES = ("system", "user", "assistant")
# Python's str.isspace() characters: what Jinja's ``trim`` filter (str.strip) removes
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
              "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def _mark(role: str, i: int) -> str:
    """A sentinel message content: no whitespace (templates may strip it), nothing Jinja-special."""
    return f"\x02ATM{role.upper()}{i}\x03"


class _Refused(Exception):
    """Why a template does not fit the shape ATM translates (becomes the AtmError's reason)."""


@dataclass
class RoleFormat:
    """The chat template decomposed: what surrounds each role's content.

    A message at index 0 may be dressed differently from later ones (``first_prefix`` /
    ``first_suffix``, only where they differ): that is where a default system block goes (Qwen2.5,
    SmolLM2: the first message is not a system message) and a fixed header around the system
    text (Llama 3.x: "Cutting Knowledge Date ..."; a first user turn then gets the header with an
    empty system text in front of it).
    """

    bos: str  # the bos token the template writes first (kept only when llama.cpp does not add bos)
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str  # appended after the last non-assistant message
    first_prefix: dict[str, str] = field(default_factory=dict)
    first_suffix: dict[str, str] = field(default_factory=dict)
    trim: frozenset[str] = frozenset()  # roles whose content the template strips (Jinja's |trim)
    skip_empty: frozenset[str] = frozenset()  # roles whose message vanishes when its content is ""

    def prefix_of(self, role: str, index: int) -> str:
        return self.first_prefix.get(role, self.prefix[role]) if index == 0 else self.prefix[role]

    def suffix_of(self, role: str, index: int) -> str:
        return self.first_suffix.get(role, self.suffix[role]) if index == 0 else self.suffix[role]


class _Probe:
    """Renders a template on sentinel conversations and cuts the text at the sentinels."""

    def __init__(self, template: str, bos_token: str, eos_token: str):
        self.template, self.bos_token, self.eos_token = template, bos_token, eos_token

    def render(self, msgs: list[dict[str, str]], gen: bool) -> str:
        return render_jinja(self.template, msgs, gen, self.bos_token, self.eos_token)

    @staticmethod
    def conv(roles: tuple[str, ...]) -> list[dict[str, str]]:
        return [{"role": r, "content": _mark(r, i)} for i, r in enumerate(roles)]

    def pieces(self, roles: tuple[str, ...], gen: bool) -> list[str]:
        """The text before, between and after the messages of a sentinel conversation."""
        msgs = self.conv(roles)
        text = self.render(msgs, gen)
        out, pos = [], 0
        for i, m in enumerate(msgs):
            shape = " + ".join(roles)
            if text.count(m["content"]) != 1:
                raise _Refused(f"in a {shape} conversation, the {m['role']} message at {i} is "
                               + ("not rendered where it stands (folded into another turn or dropped)"
                                  if m["content"] not in text else "rendered more than once"))
            at = text.index(m["content"])
            if at < pos:
                raise _Refused(f"in a {shape} conversation, messages are not rendered in order")
            out.append(text[pos:at])
            pos = at + len(m["content"])
        out.append(text[pos:])
        return out

    def optional(self, roles: tuple[str, ...], gen: bool) -> list[str] | None:
        """``pieces``, or None when the template refuses that conversation (raise_exception, or an
        error of its own logic): such a message shape is then dressed like its nearest kin."""
        try:
            return self.pieces(roles, gen)
        except _Refused:
            raise
        except Exception:  # noqa: BLE001 - arbitrary templates raise anything
            return None


def _writes_bos_first(p: _Probe) -> bool:
    """Whether the template starts with its ``bos_token`` variable (not a literal that merely equals it:
    SmolLM2's bos is ``<|im_start|>``, which its template writes as text)."""
    if not p.bos_token:
        return False
    probe = "\x02ATMBOS\x03"
    try:
        return render_jinja(p.template, p.conv(("user",)), True, probe, p.eos_token).startswith(probe)
    except Exception:  # noqa: BLE001
        return False


def _cut_prefix(text: str, head: str, what: str) -> str:
    if not text.startswith(head):
        raise _Refused(f"the text {what} ({text!r}) does not start with the closing text of the message "
                       f"before it ({head!r}): the closing text depends on what follows")
    return text[len(head):]


# (context, role) -> the sentinel conversation whose last message is that role in that context
_FIRST = {r: (r,) for r in ROLES}
_NEXT = {"user": ("user", "assistant", "user"), "assistant": ("user", "assistant"),
         "system": ("user", "assistant", "system")}


def _decompose(p: _Probe) -> RoleFormat:
    one = ("user",)
    plain, with_gen = p.render(p.conv(one), False), p.render(p.conv(one), True)
    eos = p.eos_token
    if with_gen.startswith(plain):
        tail, generation = "", with_gen[len(plain):]
    elif eos and plain.endswith(eos) and with_gen.startswith(plain[:-len(eos)]):
        tail, generation = eos, with_gen[len(plain) - len(eos):]  # Phi-3: eos ends a finished chat
    else:
        raise _Refused("the generation prompt is not appended to the conversation (add_generation_prompt "
                       "changes the text before it)")

    def closing(roles: tuple[str, ...], required: bool) -> str | None:
        got = p.pieces(roles, False) if required else p.optional(roles, False)
        if got is None:
            return None
        if tail and not got[-1].endswith(tail):
            raise _Refused(f"a finished chat ending with a {roles[-1]} message does not end with {tail!r}")
        return got[-1][:len(got[-1]) - len(tail)]

    first_suffix = {r: closing(_FIRST[r], r == "user") for r in ROLES}
    suffix = {r: closing(_NEXT[r], r != "system") for r in ROLES}
    # prefixes: the text before a message, less the closing text of the message before it
    first_prefix = {}
    for r in ROLES:
        got = p.pieces(_FIRST[r], True) if r == "user" else p.optional(_FIRST[r], True)
        first_prefix[r] = None if got is None else got[0]
    ua, uau = p.pieces(_NEXT["assistant"], True), p.pieces(_NEXT["user"], True)
    prefix = {
        "assistant": _cut_prefix(ua[1], first_suffix["user"], "between a first user message and an assistant reply"),
        "user": _cut_prefix(uau[2], suffix["assistant"], "between an assistant reply and the next user message")}
    uas = p.optional(_NEXT["system"], True)
    prefix["system"] = None if uas is None or suffix["system"] is None else \
        _cut_prefix(uas[2], suffix["assistant"], "between an assistant reply and a later system message")
    for r in ROLES:  # a shape the template refuses is dressed like the same role elsewhere
        if first_prefix[r] is None or first_suffix[r] is None:
            first_prefix[r], first_suffix[r] = prefix[r], suffix[r]
        if prefix[r] is None or suffix[r] is None:
            prefix[r], suffix[r] = first_prefix[r], first_suffix[r]
        if prefix[r] is None or suffix[r] is None:
            raise _Refused(f"the template does not render a {r} message"
                           + (" (the Modelfile's SYSTEM would be lost)" if r == "system" else ""))
    bos = p.bos_token if _writes_bos_first(p) and all(v.startswith(p.bos_token) for v in first_prefix.values()) \
        else ""
    first_prefix = {r: v[len(bos):] for r, v in first_prefix.items()}
    fmt = RoleFormat(bos=bos, prefix=prefix, suffix=suffix, generation=generation,
                     first_prefix={r: v for r, v in first_prefix.items() if v != prefix[r]},
                     first_suffix={r: v for r, v in first_suffix.items() if v != suffix[r]})
    fmt.trim, fmt.skip_empty = _content_rules(p)
    return fmt


def _render_or_none(p: _Probe, msgs: list[dict[str, str]]) -> str | None:
    try:
        return p.render(msgs, True)
    except Exception:  # noqa: BLE001 - the template refuses this shape (see _Probe.optional)
        return None


def _content_rules(p: _Probe) -> tuple[frozenset[str], frozenset[str]]:
    """Which roles' content the template strips, and which roles' empty messages it drops."""
    trim: dict[str, set[bool]] = {r: set() for r in ROLES}
    skip: dict[str, set[bool]] = {r: set() for r in ROLES}
    for shapes in (_FIRST, _NEXT):
        for role, roles in shapes.items():
            msgs = p.conv(roles)
            base = _render_or_none(p, msgs)
            if base is None:
                continue
            mark, head = msgs[-1]["content"], msgs[:-1]
            wrapped = " \n" + mark + "\n\t "
            got = _render_or_none(p, head + [{"role": role, "content": wrapped}])
            if got == base:
                trim[role].add(True)
            elif got == base.replace(mark, wrapped):
                trim[role].add(False)
            elif got is not None:
                raise _Refused(f"the template changes a {role} message's content in a way other than "
                               "stripping surrounding whitespace")
            got = _render_or_none(p, head + [{"role": role, "content": ""}])
            if got == base.replace(mark, ""):
                skip[role].add(False)
            elif got is not None and got == _render_or_none(p, head):
                skip[role].add(True)
            elif got is not None:
                raise _Refused(f"the template renders a {role} message with empty content in a way "
                               "other than as usual or not at all")
    for what, seen in (("strips", trim), ("drops empty", skip)):
        for role, vals in seen.items():
            if len(vals) > 1:
                raise _Refused(f"the template {what} {role} messages in one place but not another")
    return (frozenset(r for r in ROLES if True in trim[r]), frozenset(r for r in ROLES if True in skip[r]))


_CHECK_CONVERSATIONS = (  # each ends on a turn to answer (a last assistant turn is continued instead)
    # every role, several turns, content with Jinja/Go syntax, newlines, non-ASCII and outer whitespace
    [("system", "S one"), ("user", "U one"), ("assistant", '{"a": 1}'), ("user", "U\ntwo {{ x }} {% y %}"),
     ("assistant", "A two"), ("user", " U three ünï € \n")],
    [("user", "U")], [("system", "S\nlines"), ("user", "U")], [("user", "U"), ("assistant", "A"), ("user", "U2")],
    [("assistant", "A"), ("user", "U")], [("user", "U"), ("assistant", "A"), ("system", "S2"), ("user", "U2")],
    [("system", "\tS "), ("user", "")],
    [("system", ""), ("user", "U")], [("user", "U"), ("assistant", ""), ("user", "")],
)


def probe_chat_template(chat_template: str, bos_token: str = "", eos_token: str = "") -> RoleFormat:
    """Decompose a Jinja chat template into per-role prefix/suffix (see the module docstring).

    Clock reads are pinned first (:func:`atm.export.chat_template.pin_template_dates`): the Go
    TEMPLATE is fixed text, so it carries the pinned date. Raises AtmError naming the reason for a
    template that does not decompose."""
    tpl = pin_template_dates(clean_chat_template(chat_template))
    p = _Probe(tpl, bos_token, eos_token)
    try:
        fmt = _decompose(p)
    except _Refused as exc:
        raise AtmError(f"cannot translate the chat template to an Ollama TEMPLATE: {exc}. {_SHAPE}") from None
    except Exception as exc:  # noqa: BLE001 - jinja errors of arbitrary templates
        raise AtmError(f"cannot translate the chat template to an Ollama TEMPLATE: it fails on a plain "
                       f"conversation: {exc}. {_SHAPE}") from None
    # Check on conversations with every role, several turns and awkward content; shapes the
    # template itself refuses are skipped (it would refuse them in any engine).
    for conv in _CHECK_CONVERSATIONS:
        msgs = [{"role": r, "content": c} for r, c in conv]
        try:
            want = p.render(msgs, True)
        except Exception:  # noqa: BLE001
            continue
        got = render_role_format(fmt, msgs, add_generation_prompt=True)
        if want != got:
            raise AtmError("cannot translate the chat template to an Ollama TEMPLATE: it does not "
                           "decompose into per-role prefixes and suffixes "
                           f"(expected {want!r}, rebuilt {got!r}). {_SHAPE}")
    return fmt


_SHAPE = ("ATM translates templates that render each message as a per-role prefix + content + suffix "
          "(optionally stripped), with a generation prompt after the last turn and, for the first "
          "message, its own prefix (a default system block, a fixed header); write the Modelfile "
          "TEMPLATE by hand")


def render_role_format(fmt: RoleFormat, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """What :func:`go_template` renders (keeping bos), in Python."""
    out = [fmt.bos]
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role not in fmt.prefix or (role in fmt.skip_empty and not content):
            continue
        if role in fmt.trim:
            content = content.strip(WHITESPACE)
        out += [fmt.prefix_of(role, i), content, fmt.suffix_of(role, i)]
    if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
        out.append(fmt.generation)
    return "".join(out)


def _ollama_drops(ch: str) -> bool:
    """Whether Ollama's Modelfile parser drops ``ch`` from a value: it keeps only runes Go's
    strconv.IsPrint accepts (letters, marks, numbers, punctuation, symbols, ASCII space), tabs and
    line breaks."""
    return ch not in "\t\n\r " and unicodedata.category(ch)[0] not in "LMNPS"


def _go_literal(text: str) -> str:
    """Literal text inside a Go template: ``{{`` escaped, and characters Ollama's Modelfile parser
    would drop written as Go string actions (``{{ "\u3000" }}``)."""
    text = text.replace("{{", '{{ "{{" }}')
    return "".join("{{ " + _go_string(ch) + " }}" if _ollama_drops(ch) else ch for ch in text)


def _go_string(text: str) -> str:
    """A Go string literal (ASCII: escapes for everything else)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _go_trim_defines() -> str:
    """``{{ template "atm_trim" STR }}`` prints STR stripped like Python's str.strip(): Go's
    text/template has no string functions, so it peels one whitespace character per recursion off
    the front, then off the back (``len (slice . 1)`` is ``len - 1``: templates have no arithmetic).
    Needs Go >= 1.18 (``and`` stops at the first false argument), as Ollama is built with."""
    by_len: dict[int, list[str]] = {}
    for ch in WHITESPACE:
        by_len.setdefault(len(ch.encode()), []).append(_go_string(ch))
    front, back = [], []
    for n, chars in sorted(by_len.items()):
        alts = " ".join(chars)
        kw = "if" if not front else "else if"
        front.append(f'{{{{ {kw} and (ge (len .) {n}) (eq (slice . 0 {n}) {alts}) }}}}'
                     f'{{{{ template "atm_ltrim" (slice . {n}) }}}}')
        back.append(f'{{{{ {kw} and (ge (len .) {n}) (eq (slice . (len (slice . {n}))) {alts}) }}}}'
                    f'{{{{ template "atm_rtrim" (slice . 0 (len (slice . {n}))) }}}}')
    return ('{{ define "atm_trim" }}{{ template "atm_ltrim" . }}{{ end }}'
            '{{ define "atm_ltrim" }}' + "".join(front) + '{{ else }}{{ template "atm_rtrim" . }}{{ end }}{{ end }}'
            '{{ define "atm_rtrim" }}' + "".join(back) + "{{ else }}{{ . }}{{ end }}{{ end }}")


def go_template(fmt: RoleFormat, keep_bos: bool) -> str:
    """Ollama's Go template equivalent of ``fmt`` (one line: no whitespace trimming is needed, so
    every newline inside a role marker is kept exactly). Only Go's built-in template functions are
    used, over Ollama's data: ``.Messages`` (``.Role``, ``.Content``)."""
    parts = [_go_trim_defines() if fmt.trim else "", _go_literal(fmt.bos) if keep_bos else ""]
    parts.append("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")

    def by_index(role: str, first: dict[str, str], later: dict[str, str]) -> str:
        if role in first:
            return ("{{ if eq $i 0 }}" + _go_literal(first[role]) + "{{ else }}" + _go_literal(later[role])
                    + "{{ end }}")
        return _go_literal(later[role])

    for n, role in enumerate(ROLES):
        kw = "if" if n == 0 else "else if"
        suf = by_index(role, fmt.first_suffix, fmt.suffix)
        if role == "assistant" and suf:
            suf = "{{ if not $last }}" + suf + "{{ end }}"  # a last assistant turn is continued
        content = '{{ template "atm_trim" .Content }}' if role in fmt.trim else "{{ .Content }}"
        body = by_index(role, fmt.first_prefix, fmt.prefix) + content + suf
        if role in fmt.skip_empty:
            body = "{{ if .Content }}" + body + "{{ end }}"
        parts.append(f'{{{{ {kw} eq .Role "{role}" }}}}{body}')
    parts.append("{{ end }}")
    parts.append('{{ if and (ne .Role "assistant") $last }}' + _go_literal(fmt.generation) + "{{ end }}")
    parts.append("{{ end }}")
    return "".join(parts)


def _quote(text: str) -> str:
    """A Modelfile value: bare when single-line and unambiguous, else triple-quoted."""
    if '"""' in text or text.endswith('"'):
        # Ollama's parser ends a triple-quoted value at the first """: such text is not representable
        raise AtmError(f'a Modelfile value cannot contain """ or end with a quote: ...{text[-60:]!r}')
    dropped = next((i for i, ch in enumerate(text) if _ollama_drops(ch)), None)
    if dropped is not None:
        raise AtmError(f"a Modelfile value cannot hold {text[dropped]!r} (U+{ord(text[dropped]):04X}, at "
                       f"{dropped} in ...{text[max(0, dropped - 40):dropped + 20]!r}): Ollama's Modelfile "
                       "parser drops non-printable characters")
    if "\n" in text or text != text.strip() or text.startswith('"') or not text:
        return f'"""{text}"""'
    return text


def build_modelfile(entry: Entry, num_ctx: int | None = None, num_predict: int = DEFAULT_NUM_PREDICT,
                    gguf_path: str | None = None) -> str:
    """The Modelfile text for a registry entry (its prompt template from the entry's answer contract,
    ``atm.prompting.contract.resolve_contract``)."""
    from atm.prompting.contract import resolve_contract

    tpl = resolve_contract(entry).template()
    lines = [f"# {entry.ref}: generated by `atm export gguf` from prompt template "
             f"{tpl.name if tpl else '(none)'} ({entry.quant}, sha256 {entry.sha256[:12]})",
             "# ollama create " + entry.ref + " -f THIS_FILE",
             f"FROM {gguf_path or entry.path}"]
    stops: list[str] = []
    if entry.chat_template:
        fmt = probe_chat_template(entry.chat_template, entry.bos_token or "", entry.eos_token or "")
        if pin_template_dates(entry.chat_template) != entry.chat_template:
            warnings.warn(f"{entry.ref}: the chat template reads the clock (strftime_now); the Modelfile "
                          f"pins its date to {PINNED_DATE:%d %b %Y}, while engines rendering the unpinned "
                          "template use today's date (models written by `atm finetune base` are pinned)",
                          stacklevel=2)
        keep_bos = not entry.add_bos_token
        go_src = go_template(fmt, keep_bos)
        if '"""' in go_src:
            raise AtmError(f'{entry.ref}: the translated TEMPLATE contains """, which ends a Modelfile value '
                           "early; write the Modelfile TEMPLATE by hand")
        lines.append(f'TEMPLATE """{go_src}"""')
        # stop where the model closes its turn or starts the user's
        stops += [s for s in (fmt.suffix["assistant"].strip(), fmt.prefix["user"].strip()) if s]
    if tpl is not None and tpl.system_text:
        lines.append(f"SYSTEM {_quote(tpl.system_text)}")
    # the model's context, capped: Ollama allocates the whole KV cache up front (131k for Llama 3.2)
    ctx = num_ctx or min(entry.context_length or DEFAULT_MAX_CTX, DEFAULT_MAX_CTX)
    params: list[tuple[str, Any]] = [("temperature", 0), ("top_k", 1), ("seed", 0), ("num_ctx", ctx),
                                     ("num_predict", num_predict), ("repeat_last_n", 0),
                                     ("repeat_penalty", 1)]
    if entry.eos_token:
        stops.insert(0, entry.eos_token)
    seen = set()
    for s in stops:
        if s not in seen:
            seen.add(s)
            params.append(("stop", json.dumps(s)))
    for k, v in params:
        lines.append(f"PARAMETER {k} {v}")
    if tpl is not None:
        for m in tpl.prefix():
            if m["role"] == "system":
                continue
            lines.append(f"MESSAGE {m['role']} {_quote(m['content'])}")
    return "\n".join(lines) + "\n"


def write_modelfiles(entries: list[Entry], out_dir: str | Path = "modelfiles", **kw: Any) -> list[Path]:
    """Write ``<out_dir>/<name>-<tag>.Modelfile`` for each entry (atomically)."""
    out = []
    for e in entries:
        path = Path(out_dir) / f"{e.name}-{e.tag}.Modelfile"
        write_text_atomic(path, build_modelfile(e, **kw))
        out.append(path)
    return out


def ollama_create(entry: Entry, modelfile: Path) -> str:
    """``ollama create name:tag -f modelfile`` when an ``ollama`` binary is on PATH."""
    exe = shutil.which("ollama")
    if exe is None:
        raise AtmError("no `ollama` binary on PATH: the Modelfiles were written but not registered "
                       f"with Ollama; run `ollama create {entry.ref} -f {modelfile}` where Ollama is installed")
    proc = subprocess.run([exe, "create", entry.ref, "-f", str(modelfile)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AtmError(f"ollama create {entry.ref} failed (exit {proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()[-600:]}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# a small parser of Ollama's documented Modelfile syntax (used by tests and `atm models show`)

_INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, value), ...]`` per https://docs.ollama.com/modelfile: ``# comments``,
    case-insensitive instructions, values bare to end of line or in ``\"\"\"...\"\"\"`` (may span
    lines). Raises AtmError naming the line for anything else."""
    out: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.match(r"^\s*([A-Za-z]+)\s+(.*)$", line)
        if not m or m.group(1).upper() not in _INSTRUCTIONS:
            raise AtmError(f"Modelfile line {i}: unknown instruction: {line[:60]!r}")
        cmd, rest = m.group(1).upper(), m.group(2)
        if cmd in ("PARAMETER", "MESSAGE"):
            km = re.match(r"^(\S+)\s+(.*)$", rest)
            if not km:
                raise AtmError(f"Modelfile line {i}: {cmd} needs a name and a value")
            head, rest = km.group(1) + " ", km.group(2)
        else:
            head = ""
        if rest.startswith('"""'):
            body = rest[3:]
            start = i
            while '"""' not in body:
                if i >= len(lines):
                    raise AtmError(f'Modelfile line {start}: unterminated """')
                body += "\n" + lines[i]
                i += 1
            value, _, after = body.partition('"""')
            if after.strip():
                raise AtmError(f'Modelfile line {i}: text after closing """')
        else:
            value = rest
        out.append((cmd, head + value))
    return out
