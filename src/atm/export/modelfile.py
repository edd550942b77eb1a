"""Ollama Modelfiles generated from the same prompt template as training.

``modelfiles/<name>-<tag>.Modelfile`` carries: ``FROM`` (the registered GGUF), ``TEMPLATE`` (the
model's chat template translated to Ollama's Go template syntax), ``SYSTEM`` (the template's system
prompt), ``PARAMETER`` lines (greedy decoding, context, answer length, stops) and the template's
k-shot examples as ``MESSAGE`` pairs. Nothing is re-typed: the system text and examples come from
``atm.prompting.template.Template`` (the YAML stored in the manifest) and the chat template from
the GGUF itself.

Translating Jinja to Go: Ollama cannot run Jinja, so the chat template is *probed*: rendered with
sentinel messages to find each role's prefix and suffix and the generation prompt, then rebuilt
as a Go template and checked by re-rendering a multi-turn conversation both ways. A template that
does not decompose per role (e.g. one that folds the system prompt into the first user turn) is
refused with a clear message rather than translated wrongly.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atm.errors import AtmError
from atm.export.chat_template import clean_chat_template, render_jinja
from atm.export.registry import Entry
from atm.utils import write_text_atomic

DEFAULT_NUM_PREDICT = 96  # the longest valid answer is ~70 characters; digits are one token each
DEFAULT_MAX_CTX = 4096

_S = {"system": "\x1eATMSYS\x1e", "user": "\x1eATMUSER\x1e", "assistant": "\x1eATMASSIST\x1e"}


@dataclass
class RoleFormat:
    """The chat template decomposed: what surrounds each role's content."""

    bos: str  # literal text before the first message (kept only when llama.cpp does not add bos)
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str  # appended after the last non-assistant message


def probe_chat_template(chat_template: str, bos_token: str = "", eos_token: str = "") -> RoleFormat:
    """Decompose a Jinja chat template into per-role prefix/suffix (see the module docstring)."""
    tpl = clean_chat_template(chat_template)

    def render(msgs, gen=False):
        return render_jinja(tpl, msgs, gen, bos_token, eos_token)

    try:
        empty = render([])
        prefix: dict[str, str] = {}
        suffix: dict[str, str] = {}
        for role in ("system", "user", "assistant"):
            msgs = [{"role": role, "content": _S[role]}]
            if role == "assistant":  # templates may require a user turn first
                msgs = [{"role": "user", "content": _S["user"]}] + msgs
            text = render(msgs)
            if _S[role] not in text:
                raise AtmError(f"a lone {role} message is not rendered in place (per-role decomposition fails)")
            if role == "assistant":
                start = text.index(_S["user"]) + len(_S["user"]) + len(suffix["user"])
                head = text[start:text.index(_S[role])]
            else:
                if not text.startswith(empty):
                    raise AtmError("output does not start with the empty conversation's text")
                head = text[len(empty):text.index(_S[role])]
            prefix[role] = head
            suffix[role] = text[text.index(_S[role]) + len(_S[role]):]
        u = [{"role": "user", "content": _S["user"]}]
        generation = render(u, gen=True)[len(render(u)):]
    except AtmError as exc:
        if str(exc).startswith("cannot translate"):
            raise
        raise AtmError(f"cannot translate the chat template to an Ollama TEMPLATE: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - jinja errors of arbitrary templates
        raise AtmError(f"cannot translate the chat template to an Ollama TEMPLATE: {exc}") from None
    fmt = RoleFormat(bos=empty, prefix=prefix, suffix=suffix, generation=generation)
    # Check on a conversation with every role and several turns.
    conv = [{"role": "system", "content": "S one"}, {"role": "user", "content": "U one"},
            {"role": "assistant", "content": '{"a": 1}'}, {"role": "user", "content": "U\ntwo"},
            {"role": "assistant", "content": "A two"}, {"role": "user", "content": "U three"}]
    want = render(conv, gen=True)
    got = render_role_format(fmt, conv, add_generation_prompt=True)
    if want != got:
        raise AtmError("cannot translate the chat template to an Ollama TEMPLATE: it does not "
                       "decompose into per-role prefixes and suffixes "
                       f"(expected {want!r}, rebuilt {got!r}); write the Modelfile TEMPLATE by hand")
    return fmt


def render_role_format(fmt: RoleFormat, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    out = [fmt.bos]
    for m in messages:
        out += [fmt.prefix[m["role"]], m["content"], fmt.suffix[m["role"]]]
    if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
        out.append(fmt.generation)
    return "".join(out)


def _go_literal(text: str) -> str:
    """Literal text inside a Go template: only ``{{`` needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(fmt: RoleFormat, keep_bos: bool) -> str:
    """Ollama's Go template equivalent of ``fmt`` (one line: no whitespace trimming is needed, so
    every newline inside a role marker is kept exactly)."""
    parts = [_go_literal(fmt.bos) if keep_bos else ""]
    parts.append("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}")
    first = True
    for role in ("system", "user", "assistant"):
        kw = "if" if first else "else if"
        first = False
        suf = _go_literal(fmt.suffix[role])
        if role == "assistant" and suf:
            suf = "{{ if not $last }}" + suf + "{{ end }}"  # a last assistant turn is continued
        parts.append(f'{{{{ {kw} eq .Role "{role}" }}}}{_go_literal(fmt.prefix[role])}{{{{ .Content }}}}{suf}')
    parts.append("{{ end }}")
    parts.append('{{ if and (ne .Role "assistant") $last }}' + _go_literal(fmt.generation) + "{{ end }}")
    parts.append("{{ end }}")
    return "".join(parts)


def _quote(text: str) -> str:
    """A Modelfile value: bare when single-line and unambiguous, else triple-quoted."""
    if '"""' in text or text.endswith('"'):
        # Ollama's parser ends a triple-quoted value at the first """: such text is not representable
        raise AtmError(f'a Modelfile value cannot contain """ or end with a quote: ...{text[-60:]!r}')
    if "\n" in text or text != text.strip() or text.startswith('"') or not text:
        return f'"""{text}"""'
    return text


def build_modelfile(entry: Entry, num_ctx: int | None = None, num_predict: int = DEFAULT_NUM_PREDICT,
                    gguf_path: str | None = None) -> str:
    """The Modelfile text for a registry entry."""
    tpl = entry.template_obj()
    lines = [f"# {entry.ref}: generated by `atm export gguf` from prompt template "
             f"{tpl.name if tpl else '(none)'} ({entry.quant}, sha256 {entry.sha256[:12]})",
             "# ollama create " + entry.ref + " -f THIS_FILE",
             f"FROM {gguf_path or entry.path}"]
    stops: list[str] = []
    if entry.chat_template:
        fmt = probe_chat_template(entry.chat_template, entry.bos_token or "", entry.eos_token or "")
        keep_bos = not entry.add_bos_token
        lines.append(f'TEMPLATE """{go_template(fmt, keep_bos)}"""')
        stops += [s for s in (fmt.suffix["assistant"].strip(), fmt.prefix["user"].strip()) if s]
    if tpl is not None and tpl.system_text:
        lines.append(f"SYSTEM {_quote(tpl.system_text)}")
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
