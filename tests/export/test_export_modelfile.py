"""Modelfiles: parse with a small parser of Ollama's documented syntax, MESSAGE answers are valid
JSON under the schema, and the Go TEMPLATE renders exactly what the model's Jinja chat template
renders (checked with a small evaluator of the Go template subset Ollama templates use)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from atm.errors import AtmError
from atm.export.modelfile import (build_modelfile, go_template, parse_modelfile, probe_chat_template,
                                  write_modelfiles)
from atm.export.registry import Entry
from atm.finetune.base import CHAT_TEMPLATE
from atm.prompting.advice import load_schema, parse_advice
from atm.prompting.template import Example, Template

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- a Go template subset
def _go_tokens(src: str):
    pos = 0
    for m in re.finditer(r"\{\{-?\s*(.*?)\s*-?\}\}", src, re.S):
        if m.start() > pos:
            yield ("text", src[pos:m.start()])
        yield ("action", m.group(1))
        pos = m.end()
    if pos < len(src):
        yield ("text", src[pos:])


def _parse_expr(toks: list[str]):
    """s-expression of a pipeline: FUNC ARG... | .Field | $var | "str" | (expr)."""
    def atom():
        t = toks.pop(0)
        if t == "(":
            e = expr()
            assert toks.pop(0) == ")"
            return e
        return ("lit", t)

    def expr():
        items = []
        while toks and toks[0] != ")":
            items.append(atom())
        return items[0] if len(items) == 1 else ("call", items)
    return expr()


def _eval(node, scope):
    kind, val = node
    if kind == "lit":
        if val.startswith('"'):
            return json.loads(val)
        if val.startswith("$."):
            return scope["$"][val[2:]]
        if val.startswith("."):
            return scope["."][val[1:]]
        if val.startswith("$"):
            return scope[val]
        if val.isdigit():
            return int(val)
        return val  # a function name
    fn, *args = val
    name = fn[1]
    a = [_eval(x, scope) for x in args]
    return {"eq": lambda x, y: x == y, "ne": lambda x, y: x != y, "and": lambda *xs: all(xs),
            "not": lambda x: not x, "len": len, "slice": lambda xs, i: xs[i:]}[name](*a)


def render_go(src: str, messages: list[dict]) -> str:
    """Execute the constructs Ollama chat templates use: range over .Messages, $var :=, if /
    else if / else / end, eq ne and not len slice, .Role .Content, string literals."""
    toks = list(_go_tokens(src))

    def split_expr(s):
        return [t for t in re.findall(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+', s)]

    def run(i, scope, out, stop=("end",)):
        """Run tokens from i until an action in stop (same nesting level); return its index."""
        while i < len(toks):
            kind, val = toks[i]
            if kind == "text":
                out.append(val)
                i += 1
                continue
            head = val.split()[0]
            if head in stop or val.startswith("else"):
                return i
            if head == "range":
                m = re.match(r"range \$(\w+), \$(\w+) := (\S+)$", val)
                items = _eval(("lit", m.group(3)), scope)
                end = None
                for idx, item in enumerate(items):
                    inner = {**scope, "$" + m.group(1): idx, ".": item}
                    end = run(i + 1, inner, out)
                if end is None:
                    end = run(i + 1, scope, [])
                i = end + 1
            elif head == "if":
                taken = False
                j = i
                cond_src = val[3:]
                while True:
                    ok = (not taken) and (cond_src is None or bool(_eval(_parse_expr(split_expr(cond_src)), scope)))
                    j = run(j + 1, scope, out if ok else [], stop=("end",))
                    taken = taken or ok
                    kv = toks[j][1]
                    if kv.startswith("else if"):
                        cond_src = kv[8:]
                    elif kv == "else":
                        cond_src = None
                    else:
                        break
                i = j + 1
            elif re.match(r"\$\w+ :=", val):
                var, expr = val.split(":=", 1)
                scope["$" + var.strip()[1:]] = _eval(_parse_expr(split_expr(expr)), scope)
                i += 1
            else:
                v = _eval(_parse_expr(split_expr(val)), scope)
                out.append(str(v))
                i += 1
        return i

    out: list[str] = []
    run(0, {"$": {"Messages": messages}, ".": {"Messages": messages}}, out)
    return "".join(out)


def test_go_evaluator_itself():
    src = '{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}' \
          '[{{ .Role }}:{{ .Content }}]{{ if $last }}END{{ else }},{{ end }}{{ end }}'
    assert render_go(src, [{"Role": "a", "Content": "x"}, {"Role": "b", "Content": "y"}]) == "[a:x],[b:y]END"


# --------------------------------------------------------------------------- fixtures
def _jinja(template: str, messages, gen: bool, bos="<s>", eos="</s>") -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from atm.export.chat_template import clean_chat_template

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(ValueError(m))
    return env.from_string(clean_chat_template(template)).render(
        messages=messages, add_generation_prompt=gen, bos_token=bos, eos_token=eos)


@pytest.fixture
def kshot_entry(tmp_path) -> Entry:
    """An entry whose template has 3 k-shot examples (seed.yaml is zero-shot by default)."""
    tpl = Template.load(ROOT / "prompts" / "seed.yaml").with_examples([
        Example(context='[{"open_change": "12.50000000"}]', advice="BUY", change="12.50000000"),
        Example(context='[{"open_change": "-3.10000000"}]\nsecond "line" x', advice="SELL", change="-3.10000000"),
        Example(context='[{"open_change": "0.00000000"}]', advice="NOOP", change="0.00000000"),
    ])
    gguf = tmp_path / "q8.gguf"
    gguf.write_bytes(b"GGUF")
    return Entry(name="atm", tag="q8", path=str(gguf), sha256="0" * 64, size=4, quant="Q8_0",
                 template=tpl.to_yaml(), schema=load_schema(), chat_template=CHAT_TEMPLATE,
                 context_length=2048, eos_token="</s>", bos_token="<s>", add_bos_token=False)


def test_modelfile_parses_and_carries_everything(kshot_entry, tmp_path):
    text = build_modelfile(kshot_entry)
    cmds = parse_modelfile(text)
    kinds = [c for c, _ in cmds]
    assert kinds[0] == "FROM" and cmds[0][1] == kshot_entry.path
    assert kinds.count("TEMPLATE") == 1 and kinds.count("SYSTEM") == 1
    params = {}
    for c, v in cmds:
        if c == "PARAMETER":
            k, val = v.split(" ", 1)
            params.setdefault(k, []).append(val)
    assert params["temperature"] == ["0"] and params["repeat_last_n"] == ["0"]
    assert params["num_ctx"] == ["2048"] and int(params["num_predict"][0]) >= 64
    assert json.loads(params["stop"][0]) == "</s>"  # stop at eos
    system = dict(cmds)["SYSTEM"]
    assert system == Template.from_yaml(kshot_entry.template).system_text
    messages = [v for c, v in cmds if c == "MESSAGE"]
    assert len(messages) == 6
    roles = [m.split(" ", 1)[0] for m in messages]
    assert roles == ["user", "assistant"] * 3
    for m in messages[1::2]:
        answer = m.split(" ", 1)[1]
        json.loads(answer)  # valid JSON
        assert parse_advice(answer).valid  # and a valid answer under the schema
    assert [parse_advice(m.split(" ", 1)[1]).advice for m in messages[1::2]] == ["BUY", "SELL", "NOOP"]
    # a multi-line user example survives the triple quotes exactly
    assert messages[2].split(" ", 1)[1] == Template.from_yaml(kshot_entry.template).prefix()[3]["content"]


def test_go_template_renders_like_the_jinja_chat_template(kshot_entry):
    text = build_modelfile(kshot_entry)
    go_src = dict(parse_modelfile(text))["TEMPLATE"]
    tpl = Template.from_yaml(kshot_entry.template)
    # What Ollama puts in .Messages: SYSTEM, the MESSAGE history, then the request's messages.
    msgs = tpl.render('[{"open_change": "1.00000000"}]')
    want = _jinja(CHAT_TEMPLATE, msgs, gen=True)
    got = render_go(go_src, [{"Role": m["role"], "Content": m["content"]} for m in msgs])
    assert got == want
    # without a system message and ending on an assistant turn (continued, no eos)
    msgs2 = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render_go(go_src, [{"Role": m["role"], "Content": m["content"]} for m in msgs2]) == "<s><|user|>a<|assistant|>b"


def test_chatml_template_translates_and_bos_follows_the_gguf_flag():
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
              " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    fmt = probe_chat_template(chatml, "<s>", "<|im_end|>")
    assert fmt.prefix["user"] == "<|im_start|>user\n" and fmt.suffix["user"] == "<|im_end|>\n"
    assert fmt.generation == "<|im_start|>assistant\n"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u {{ x }}"}]
    go_src = go_template(fmt, keep_bos=True)
    assert render_go(go_src, [{"Role": m["role"], "Content": m["content"]} for m in msgs]) == _jinja(chatml, msgs, True)
    # the tiny base's template starts with bos: kept only when llama.cpp does not add bos itself
    fmt2 = probe_chat_template(CHAT_TEMPLATE, "<s>", "</s>")
    assert go_template(fmt2, keep_bos=True).startswith("<s>")
    assert not go_template(fmt2, keep_bos=False).startswith("<s>")


def test_untranslatable_template_is_refused_clearly():
    # Llama-2 style: the system prompt is folded into the first user turn
    llama2 = ("{% if messages and messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
              "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
              "{% for m in msgs %}{% if m['role'] == 'user' %}[INST] {% if loop.first and sys %}<<SYS>>{{ sys }}<</SYS>> "
              "{% endif %}{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")
    with pytest.raises(AtmError, match="cannot translate the chat template.*per-role"):
        probe_chat_template(llama2, "<s>", "</s>")
    with pytest.raises(AtmError, match="cannot translate the chat template"):
        probe_chat_template("{{ messages[0]['content'] }}", "<s>", "</s>")


def test_unrepresentable_message_is_refused(kshot_entry):
    tpl = Template.from_yaml(kshot_entry.template)
    bad = tpl.with_examples([Example(context='ends with a quote"', advice="BUY", change="1.00000000")])
    with pytest.raises(AtmError, match="end with a quote"):
        build_modelfile(replace(kshot_entry, template=bad.to_yaml()))


def test_modelfile_parser_rejects_bad_syntax():
    with pytest.raises(AtmError, match="line 2"):
        parse_modelfile("FROM x.gguf\nBOGUS thing\n")
    with pytest.raises(AtmError, match="unterminated"):
        parse_modelfile('FROM x.gguf\nSYSTEM """never closed\n')
    assert parse_modelfile('# c\nfrom x\nparameter stop "a b"\n') == [("FROM", "x"), ("PARAMETER", 'stop "a b"')]


def test_write_modelfiles_names_and_ollama_absent(kshot_entry, tmp_path):
    f16 = replace(kshot_entry, tag="f16", quant="F16")
    paths = write_modelfiles([f16, kshot_entry], tmp_path / "mf")
    assert [p.name for p in paths] == ["atm-f16.Modelfile", "atm-q8.Modelfile"]
    assert all(parse_modelfile(p.read_text())[0] == ("FROM", kshot_entry.path) for p in paths)
    import shutil

    from atm.export.modelfile import ollama_create
    if shutil.which("ollama") is None:
        with pytest.raises(AtmError, match="no `ollama` binary on PATH"):
            ollama_create(kshot_entry, paths[1])


def test_modelfiles_of_the_exported_tiny_model(tiny_gguf, tiny_merged, sample_dataset, tmp_path):
    """On the real export: FROM names the registered file, and Ollama's rendering of a verify
    prompt through TEMPLATE + SYSTEM + MESSAGE equals the HF chat template's rendering."""
    from transformers import AutoTokenizer

    from atm.export.check import load_verify_prompts

    tok = AutoTokenizer.from_pretrained(str(tiny_merged))
    paths = write_modelfiles(tiny_gguf, tmp_path / "modelfiles")
    assert [p.name for p in paths] == ["atm-f16.Modelfile", "atm-q8.Modelfile", "atm-q4.Modelfile"]
    for entry, path in zip(tiny_gguf, paths):
        cmds = parse_modelfile(path.read_text())
        assert cmds[0] == ("FROM", entry.path)
        go_src = dict(cmds)["TEMPLATE"]
        history = [{"role": "system", "content": dict(cmds)["SYSTEM"]}] + [
            {"role": v.split(" ", 1)[0], "content": v.split(" ", 1)[1]} for c, v in cmds if c == "MESSAGE"]
        for p in load_verify_prompts(sample_dataset, 3):
            msgs = p["messages"]
            n_prefix = len(history)
            assert msgs[:n_prefix] == history  # SYSTEM and MESSAGE lines are the training prefix
            got = render_go(go_src, [{"Role": m["role"], "Content": m["content"]} for m in msgs])
            assert got == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
