"""The answer contract (atm.prompting.contract): one fallback chain, and one grammar that every
engine is given (llama.cpp in process, llama-server, vLLM, transformers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from atm.artifacts import ModelCard
from atm.prompting.advice import ANSWER_FORMATS, load_schema
from atm.prompting.contract import resolve_contract
from atm.prompting.template import Template

ROOT = Path(__file__).resolve().parents[2]
TRAINED = ' {"predicted_open_change": "-0.12345678", "advice": "BUY"}'  # the leading space the model writes


def _template(order: str = "change-first", encoder: str | None = None) -> str:
    t = Template.load(ROOT / "prompts" / "seed.yaml")
    data = t.to_dict()
    data["answer_format"], data["answer"] = order, ANSWER_FORMATS[order]
    if encoder:
        data["encoder"] = encoder
    return Template.from_yaml(yaml.safe_dump(data, sort_keys=False)).to_yaml()


def test_the_fallback_chain():
    # nothing known: the default answer format, the shipped schema, seed-json
    c = resolve_contract()
    assert c.answer_format == ANSWER_FORMATS["change-first"] and c.schema == load_schema()
    assert c.encoder == {"name": "seed-json"} and c.template() is None
    assert c.source == {"answer_format": "default", "schema": "answer format", "encoder": "default"}
    # a model whose template answers advice first and whose card saved no schema: the template's order
    adv = _template("advice-first")
    c = resolve_contract(ModelCard(template=adv))
    assert c.order == "advice-first" and list(c.schema["properties"]) == ["advice", "predicted_open_change"]
    assert c.pieces["advice_first"] and c.source["template"] == "model"
    # the model's own template wins over the dataset's; the dataset's is used when the model has none
    chg = _template("change-first")
    assert resolve_contract(ModelCard(template=adv), dataset_template=chg).order == "advice-first"
    c = resolve_contract(ModelCard(), dataset_template=adv)
    assert c.order == "advice-first" and c.source["template"] == "dataset"
    # an explicit template (atm serve's `template:`) wins over the model's
    assert resolve_contract(ModelCard(template=adv), template_yaml=chg).order == "change-first"
    # a saved schema wins over the default one, in the answer's order (a model exported without a
    # template saved the default change-first order; asked on advice-first items it must write
    # advice first, as the server and transformers do); a saved encoder wins over the template's
    saved = load_schema("change-first")
    saved["properties"]["advice"]["description"] = "saved"
    c = resolve_contract(ModelCard(template=adv, schema=saved, encoder={"name": "compact", "lookback": 5}))
    assert list(c.schema["properties"]) == c.schema["required"] == ["advice", "predicted_open_change"]
    assert c.schema["properties"]["advice"]["description"] == "saved" and c.source["schema"] == "model"
    c = resolve_contract(ModelCard(schema=saved), dataset_template=adv)
    assert c.order == "advice-first" and next(iter(c.schema["properties"])) == "advice"
    assert resolve_contract(ModelCard(schema=saved)).schema == saved
    c = resolve_contract(ModelCard(template=adv, encoder={"name": "compact", "lookback": 5}))
    assert c.encoder_spec() == ("compact", {"lookback": 5})
    # a registry entry (any object with template / schema / encoder) resolves the same way
    from atm.export.registry import Entry

    e = Entry(name="x", tag="q8", path="/x.gguf", sha256="0", size=1, quant="Q8_0", template=adv)
    assert resolve_contract(e).schema == load_schema("advice-first")


def test_one_derivation_in_the_source():
    """Nothing outside atm.prompting derives the answer contract: no direct schema defaults,
    answer-format lookups or grammars in serve, eval or export."""
    hits = []
    for p in (ROOT / "src" / "atm").rglob("*.py"):
        rel = p.relative_to(ROOT / "src" / "atm").as_posix()
        if rel.startswith("prompting/"):
            continue
        text = p.read_text()
        for pat in (r"\bload_schema\(", r"\banswer_format_of\(", r"\banswer_pieces\(", r"json_schema_to_gbnf",
                    r"\bchange_gbnf\(", r"\.schema\(\)"):
            if re.search(pat, text):
                hits.append(f"{rel}: {pat}")
    assert not hits, hits


def test_grammar_and_its_regex_admit_the_same_answers():
    pytest.importorskip("llama_cpp")
    from atm.prompting.llama_schema import answer_gbnf, gbnf_regex

    for order in ("change-first", "advice-first"):
        c = resolve_contract(template_yaml=_template(order))
        assert c.grammar == answer_gbnf(c.schema) and c.regex == gbnf_regex(c.grammar)
        good = " " + ANSWER_FORMATS[order].format(change="-0.12345678", advice="BUY")
        other = ANSWER_FORMATS["advice-first" if order == "change-first" else "change-first"].format(
            change="1.00000000", advice="NOOP")
        assert re.fullmatch(c.regex, good) and re.fullmatch(c.regex, good.strip())
        assert re.fullmatch(c.regex, json.dumps(json.loads(good), separators=(",", ":")))
        for bad in ("  " + good.strip(), other, good.replace("-0.", "-00."), good.replace("BUY", "HOLD"),
                    good.replace(": ", ":\n")):
            assert not re.fullmatch(c.regex, bad), bad
    with pytest.raises(ValueError, match="recursive"):
        gbnf_regex(answer_gbnf({"type": "object"}))
    assert gbnf_regex('root ::= "ab"? [0-9]{2} x\nx ::= "."') == r"(?:ab)?[0-9]{2}(?:\.)"


def test_llama_cpp_takes_the_grammar_and_both_spacings():
    """The grammar compiles in llama.cpp and admits the answer with and without the leading space
    (what llama-server's own schema grammar refused)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    c = resolve_contract()
    llama_cpp.LlamaGrammar.from_string(c.grammar, verbose=False)
    llama_cpp.LlamaGrammar.from_string(c.change_grammar, verbose=False)
    assert c.grammar.rstrip().endswith('root ::= " "? root0')


def test_every_engine_is_sent_the_contract_grammar(tmp_path):
    """llama-server gets the GBNF as `grammar` (not its own json_schema grammar), vLLM the same GBNF
    in structured_outputs; a schema llama.cpp cannot take is still refused / passed as a schema."""
    pytest.importorskip("llama_cpp")
    from atm.serve.engines.base import EngineRequest
    from atm.serve.engines.llama_server import LlamaServerEngine
    from atm.serve.engines.vllm import VLLMEngine

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    c = resolve_contract()
    req = EngineRequest(model="m", messages=[{"role": "user", "content": "hi"}], json_schema=c.schema)
    body = LlamaServerEngine("m", gguf).map_request(req)
    assert body["grammar"] == c.grammar and "json_schema" not in body and "response_format" not in body
    body = VLLMEngine("m", tmp_path).map_request(req)
    assert body["structured_outputs"] == {"grammar": c.grammar}


def test_xgrammar_reads_the_grammar():
    """vLLM's structured-output backend compiles the same GBNF (where xgrammar is installed)."""
    pytest.importorskip("llama_cpp")
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string as accepts

    for order in ("change-first", "advice-first"):
        c = resolve_contract(template_yaml=_template(order))
        g = xgr.Grammar.from_ebnf(c.grammar)
        good = ANSWER_FORMATS[order].format(change="-0.12345678", advice="BUY")
        for text in (" " + good, good + " ", "  " + good, good.replace("-0.", "-00."),
                     json.dumps(json.loads(good), separators=(",", ":")),
                     json.dumps(dict(reversed(list(json.loads(good).items()))))):
            assert accepts(g, text) == bool(re.fullmatch(c.regex, text)), text
