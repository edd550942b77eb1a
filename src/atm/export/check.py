"""``atm export check``: what conversion and quantization cost, measured on the verify prompts.

The reference is the merged HF model (transformers, fp32, greedy decoding constrained to the answer
schema, as the GGUF side is constrained by the schema grammar). Each GGUF tag
gets the *same token ids* (the HF tokenizer's rendering of the chat template), so the numeric
comparisons isolate the weights; tokenization and chat-template agreement are measured
separately. Per tag:

- ``valid_rate``: answers valid under the advice schema when decoding is constrained by it
  (llama-cpp-python grammar from the schema: the way ``atm serve`` decodes);
- ``advice_agreement_hf``: same advice as the HF model, over the items where the HF answer is
  valid (an invalid GGUF answer counts as a disagreement); ``advice_agreement_f16`` the same
  against the F16 GGUF (quantization alone);
- ``mean_abs_change_diff``: mean |predicted_open_change(GGUF) - predicted_open_change(HF)| where
  both are valid;
- ``top1_agreement``: the most likely next token after the prompt is the same as HF's;
- ``mean_logprob_hf`` / ``mean_logprob``, ``logprob_delta`` and ``perplexity`` of the HF model's
  own answer tokens (teacher-forced): how much probability the file moved;
- ``tokens_match_rate`` (llama.cpp's tokenizer on the rendered prompt == HF's ids) and
  ``template_match_rate`` (the GGUF's chat template renders the same text as HF's).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

from atm.artifacts import MODEL_CARD, DatasetDir, ModelCard
from atm.errors import AtmError, DataError, require
from atm.export import llamacpp
from atm.export.registry import Entry, Registry, check_name
from atm.utils import progress, provenance, write_json_atomic

TAG_ORDER = {"f16": 0, "q8": 1, "q4": 2}


# ---------------------------------------------------------------------------------------------
# verify prompts

def load_verify_prompts(data: str | Path, n: int, split: str = "verify") -> list[dict[str, Any]]:
    """``n`` prompts (chat message lists) spread evenly over ``split`` of a built dataset dir
    (``items/``, else ``preference/``, else ``sft/``), or of one parquet file."""
    import numpy as np
    import pyarrow.parquet as pq

    data = Path(data)
    files: list[Path] = []
    column = "prompt"
    if data.is_file():
        files = [data]
    else:
        for view, col in (("items", "prompt"), ("preference", "prompt"), ("sft", "messages")):
            files = sorted(DatasetDir(data).view_dir(view).glob(f"{split}-*.parquet"))
            if files:
                column = col
                break
    if not files:
        raise DataError(f"no {split} prompts found (expected items/, preference/ or sft/ "
                        f"data/{split}-*.parquet from `atm prompts build`)", str(data))
    rows: list[dict[str, Any]] = []
    for f in files:
        t = pq.read_table(f)
        col = column if column in t.column_names else ("messages" if "messages" in t.column_names else None)
        if col is None:
            raise DataError(f"no 'prompt' or 'messages' column (has {t.column_names})", str(f))
        ids = t.column("id").to_pylist() if "id" in t.column_names else [f"{f.name}:{i}" for i in range(t.num_rows)]
        for i, msgs in zip(ids, t.column(col).to_pylist()):
            if col == "messages":  # sft rows end with the answer: drop it
                msgs = [m for m in msgs][:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
            rows.append({"id": str(i), "messages": [{"role": m["role"], "content": m["content"]} for m in msgs]})
    if not rows:
        raise DataError(f"the {split} split is empty", str(data))
    if n < len(rows):
        idx = np.unique(np.linspace(0, len(rows) - 1, n).round().astype(int))
        rows = [rows[i] for i in idx]
    return rows


# ---------------------------------------------------------------------------------------------
# the HF reference

def run_hf(model_dir: Path, prompts: list[dict], max_tokens: int, batch_size: int = 8,
           constrained: bool = True, schema: dict[str, Any] | None = None) -> list[dict]:
    """The HF model's answers: greedy, constrained to the answer schema (default: the comparable
    reference for schema-constrained GGUF decoding; ``atm.prompting.hf_constraint``, the one
    constrained decoder for transformers) or free (``constrained=False``). Log-probs and the top-1
    token are the model's own (before the constraint)."""
    torch = require("torch", "train")
    transformers = require("transformers", "train")
    from atm.prompting.advice import parse_advice
    from atm.prompting.hf_constraint import schema_processor

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    eos_ids = model.generation_config.eos_token_id
    eos_set = set(eos_ids if isinstance(eos_ids, list) else [eos_ids if eos_ids is not None else tok.eos_token_id])
    out: list[dict] = []
    for p in prompts:
        text = tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
        enc = tok(text, add_special_tokens=False)
        out.append({"id": p["id"], "text": text, "ids": list(enc["input_ids"])})
    bar = progress(total=len(out), desc="HF reference", unit="prompt")
    pad = tok.pad_token_id
    if constrained and schema is None:
        from atm.prompting.contract import resolve_contract

        schema = resolve_contract().schema  # the default contract's
    with torch.inference_mode():
        for b in range(0, len(out), batch_size):
            chunk = out[b:b + batch_size]
            width = max(len(r["ids"]) for r in chunk)
            ids = torch.tensor([[pad] * (width - len(r["ids"])) + r["ids"] for r in chunk])
            mask = torch.tensor([[0] * (width - len(r["ids"])) + [1] * len(r["ids"]) for r in chunk])
            kw = {"logits_processor": [schema_processor(tok, schema)]} if constrained else {}
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=pad, **kw)
            seqs = gen.sequences[:, width:]
            logps = [torch.log_softmax(step.float(), dim=-1) for step in gen.logits]
            for j, r in enumerate(chunk):
                toks: list[int] = []
                lps: list[float] = []
                for s, t in enumerate(seqs[j].tolist()):
                    toks.append(t)
                    lps.append(float(logps[s][j, t]))
                    if t in eos_set:
                        break
                r["cont"] = toks
                r["cont_logprobs"] = lps
                r["top1"] = int(gen.logits[0][j].argmax())
                r["raw"] = tok.decode([t for t in toks if t not in eos_set], skip_special_tokens=True)
                pa = parse_advice(r["raw"])
                r.update(valid=pa.valid, advice=pa.advice, change=pa.predicted_change, reason=pa.reason)
            bar.update(len(chunk))
    bar.close()
    return out


# ---------------------------------------------------------------------------------------------
# a GGUF under llama-cpp-python

def run_gguf(entry: Entry, ref: list[dict], schema: dict[str, Any], max_tokens: int,
             threads: int | None = None) -> list[dict]:
    llama_cpp = require("llama_cpp", "export", "llama-cpp-python")
    import numpy as np

    from atm.prompting.advice import parse_advice

    n_ctx = max(len(r["ids"]) + max(len(r["cont"]), max_tokens) for r in ref) + 16
    llamacpp.no_amx_repack()
    llm = llama_cpp.Llama(model_path=entry.path, n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                          logits_all=True, verbose=False, seed=0,
                          n_threads=threads or min(os.cpu_count() or 1, 4))
    from atm.prompting.llama_schema import answer_gbnf

    grammar = llama_cpp.LlamaGrammar.from_string(answer_gbnf(schema), verbose=False)
    res: list[dict] = []
    for r in progress(ref, desc=f"{entry.ref}", unit="prompt"):
        full = r["ids"] + r["cont"]
        # Keep the KV cache of the prefix shared with the previous item (system prompt, k-shot
        # examples, instruction): only the rest is evaluated. Rows of llm.scores below the prefix
        # hold the logits of these same tokens at these same positions from the previous eval.
        prev = llm.input_ids[: llm.n_tokens].tolist()
        keep = 0
        for a, b in zip(prev, full[:-1]):
            if a != b:
                break
            keep += 1
        llm.n_tokens = keep
        llm.eval(full[keep:])
        scores = np.asarray(llm.scores[:len(full)], dtype=np.float64)
        n_p = len(r["ids"])
        top1 = int(scores[n_p - 1].argmax())
        lps = []
        for k, t in enumerate(r["cont"]):
            row = scores[n_p - 1 + k]
            m = row.max()
            lps.append(float(row[t] - m - math.log(np.exp(row - m).sum())))
        toks = llm.tokenize(r["text"].encode(), add_bos=True, special=True)
        # no reset: the prompt is already in the KV cache, llama-cpp-python reuses the prefix
        comp = llm.create_completion(prompt=r["ids"], max_tokens=max_tokens, temperature=0.0,
                                     grammar=grammar, seed=0)
        text = comp["choices"][0]["text"]
        pa = parse_advice(text)
        res.append({"id": r["id"], "top1": top1, "cont_logprobs": lps, "tokens_match": toks == r["ids"],
                    "raw": text, "valid": pa.valid, "advice": pa.advice, "change": pa.predicted_change,
                    "reason": pa.reason})
    del llm
    return res


def run_gguf_isolated(entry: Entry, ref: list[dict], schema: dict[str, Any], max_tokens: int,
                      threads: int | None = None) -> list[dict]:
    """``run_gguf`` in a fresh interpreter. Measured here: in a process that has imported torch,
    llama.cpp's prompt evaluation ran ~25x slower (1.3 s instead of 0.05 s for 360 tokens of the
    tiny model, even single-threaded), so the GGUF side never shares the HF reference's process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    slim = [{"id": r["id"], "ids": r["ids"], "cont": r["cont"], "text": r["text"]} for r in ref]
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_gguf, entry, slim, schema, max_tokens, threads).result()


def template_match(entry: Entry, ref: list[dict], prompts: list[dict]) -> float | None:
    """Share of prompts where the GGUF's own chat template renders HF's prompt text exactly."""
    if not entry.chat_template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template=entry.chat_template, eos_token=entry.eos_token or "",
                              bos_token=entry.bos_token or "", add_generation_prompt=True)
    same = sum(fmt(messages=p["messages"]).prompt == r["text"] for p, r in zip(prompts, ref))
    return same / len(ref)


# ---------------------------------------------------------------------------------------------
# figures

def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def figures(ref: list[dict], res: list[dict], f16: list[dict] | None = None) -> dict[str, Any]:
    n = len(ref)
    hf_valid = [i for i, r in enumerate(ref) if r["valid"]]
    agree = [res[i]["valid"] and res[i]["advice"] == ref[i]["advice"] for i in hf_valid]
    both = [i for i in hf_valid if res[i]["valid"]]
    diffs = [abs(res[i]["change"] - ref[i]["change"]) for i in both]
    lp_hf = [x for r in ref for x in r["cont_logprobs"]]
    lp_gg = [x for r in res for x in r["cont_logprobs"]]
    out = {
        "n": n,
        "valid_rate": sum(r["valid"] for r in res) / n,
        "advice_agreement_hf": _mean([float(a) for a in agree]),
        "advice_agreement_f16": None,
        "mean_abs_change_diff": _mean(diffs),
        "top1_agreement": sum(g["top1"] == r["top1"] for g, r in zip(res, ref)) / n,
        "mean_logprob_hf": _mean(lp_hf),
        "mean_logprob": _mean(lp_gg),
        "logprob_delta": (_mean(lp_gg) - _mean(lp_hf)) if lp_hf else None,  # type: ignore[operator]
        "perplexity_hf": math.exp(-_mean(lp_hf)) if lp_hf else None,  # type: ignore[operator]
        "perplexity": math.exp(-_mean(lp_gg)) if lp_gg else None,  # type: ignore[operator]
        "tokens_match_rate": sum(r["tokens_match"] for r in res) / n,
        "invalid_reasons": _count(r["reason"] for r in res if not r["valid"]),
    }
    if f16 is not None:
        f_valid = [i for i, r in enumerate(f16) if r["valid"]]
        out["advice_agreement_f16"] = _mean(
            [float(res[i]["valid"] and res[i]["advice"] == f16[i]["advice"]) for i in f_valid])
    return out


def _count(xs) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


def fidelity_check(name: str = "atm", n: int = 200, home: str | Path | None = None,
                   data: str | Path | None = None, model: str | Path | None = None,
                   tags: Sequence[str] | None = None, max_tokens: int = 64, threads: int | None = None,
                   out: str | Path | None = None, batch_size: int = 8, store: bool = True) -> dict[str, Any]:
    """Run the check for every registered tag of ``name`` (or ``tags``); write and return the report."""
    if n <= 0:
        raise AtmError(f"--n must be positive, got {n}")
    reg = Registry(home)
    entries = [e for e in reg.list() if e.name == name and (not tags or e.tag in tags)]
    if not entries:
        reg.resolve(f"{name}:{tags[0]}" if tags else name)  # raises with the list of known names
    entries.sort(key=lambda e: (TAG_ORDER.get(e.tag, 9), e.tag))
    for e in entries:
        reg.resolve(e.ref)  # the file is there and has its recorded size
    model_dir = Path(model) if model else Path(entries[0].source.get("model_dir", ""))
    if not (model_dir / "config.json").is_file():
        raise AtmError(f"the merged HF model {model_dir} is gone; pass --model DIR (the reference)")
    card = ModelCard.read(model_dir) or ModelCard()
    data_dir = Path(data) if data else card.dataset_dir
    if data_dir is None:
        raise AtmError(f"no dataset recorded in {model_dir / MODEL_CARD} (or it moved); pass --data DATASET_DIR")
    from atm.prompting.contract import resolve_contract

    schema = resolve_contract(entries[0], schema=card.schema if not entries[0].schema else None).schema
    prompts = load_verify_prompts(data_dir, n)
    t0 = time.time()
    ref = run_hf(model_dir, prompts, max_tokens=max_tokens, batch_size=batch_size, schema=schema)
    hf_s = time.time() - t0
    report: dict[str, Any] = {
        "name": name, "model_dir": str(model_dir), "data": str(data_dir), "n": len(prompts),
        "max_tokens": max_tokens,
        "hf": {"decoding": "greedy, constrained to the answer schema",
               "valid_rate": sum(r["valid"] for r in ref) / len(ref),
               "advice_counts": _count(r["advice"] for r in ref if r["valid"]),
               "invalid_reasons": _count(r["reason"] for r in ref if not r["valid"]),
               "seconds": round(hf_s, 2)},
        "template_match_rate": template_match(entries[0], ref, prompts),
        "tags": {},
    }
    f16_res = None
    samples = []
    for e in entries:
        t0 = time.time()
        res = run_gguf_isolated(e, ref, schema, max_tokens=max_tokens, threads=threads)
        fig = figures(ref, res, f16_res if e.tag != "f16" else None)
        fig["seconds"] = round(time.time() - t0, 2)
        fig["quant"] = e.quant
        fig["size_mb"] = round(e.size / 2**20, 2)
        if e.tag == "f16":
            f16_res = res
        report["tags"][e.ref] = fig
        samples.append({"ref": e.ref, "raw": [r["raw"] for r in res[:3]]})
        if store:
            reg.update(e.ref, fidelity={**fig, "n": len(prompts), "data": str(data_dir),
                                        "checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    report["samples"] = {"hf": [r["raw"] for r in ref[:3]], **{s["ref"]: s["raw"] for s in samples}}
    report["provenance"] = provenance({"name": name, "n": n, "data": str(data_dir), "tags": tags,
                                       "max_tokens": max_tokens})
    # beside the registry, not inside models/NAME/ (every *.json there is a tag manifest)
    out_path = Path(out) if out else reg.home / "reports" / f"{check_name(name)}-fidelity.json"
    write_json_atomic(out_path, report)
    report["report_path"] = str(out_path)
    return report


COLUMNS = [("valid_rate", "valid"), ("advice_agreement_hf", "agree_hf"),
           ("advice_agreement_f16", "agree_f16"), ("mean_abs_change_diff", "|d change|"),
           ("top1_agreement", "top1"), ("logprob_delta", "d logprob"), ("perplexity", "ppl"),
           ("tokens_match_rate", "tokens"), ("seconds", "s")]


def format_report(report: dict[str, Any]) -> str:
    from atm.export.registry_cli import format_table

    rows = [{"model": ref, **{label: fig.get(key) for key, label in COLUMNS}}
            for ref, fig in report["tags"].items()]
    hf = report["hf"]
    head = (f"fidelity of {report['name']} vs the HF model {report['model_dir']} on {report['n']} "
            f"verify prompts ({report['data']})\n"
            f"HF reference (greedy, constrained to the answer schema): valid {hf['valid_rate']:.3f}, "
            f"advice {hf['advice_counts']}; "
            f"chat template match {report['template_match_rate']}")
    return head + "\n" + format_table(rows, ["model"] + [label for _, label in COLUMNS])
