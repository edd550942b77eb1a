"""`merge(adapter_dir, out)`: fold a LoRA run into a plain HF model that records what made it.

The merged dir is what export (GGUF), serve and eval consume. Beside the weights it keeps
`atm_model.json`: the prompt template's YAML text, the answer schema, the encoder config, the
dataset config and the training config, so a served model always knows which prompt format it was
trained on (the original experiment trained on one format and served another).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from atm.artifacts import DatasetDir, ModelCard
from atm.errors import AtmError, require


def _adapter_base(adapter_dir: Path) -> str:
    conf = adapter_dir / "adapter_config.json"
    if not conf.exists():
        raise AtmError(f"{adapter_dir}: no adapter_config.json (is this a LoRA run dir?)")
    base = json.loads(conf.read_text()).get("base_model_name_or_path")
    if not base:
        raise AtmError(f"{conf}: no base_model_name_or_path")
    return base


def load_merged(adapter_dir: str | Path, dtype: str = "float32"):
    """(merged model, tokenizer) in memory: base + adapter with the LoRA weights folded in."""
    peft = require("peft", "train")
    from atm.finetune.base import load_base

    adapter_dir = Path(adapter_dir)
    base = _adapter_base(adapter_dir)
    run = _read_json(adapter_dir / "atm_run.json")
    trust = bool(run.get("config", {}).get("trust_remote_code", False))
    model, _ = load_base(base, trust_remote_code=trust, dtype=dtype)
    transformers = require("transformers", "train")
    tok = transformers.AutoTokenizer.from_pretrained(str(adapter_dir)) if (
        adapter_dir / "tokenizer_config.json").exists() else load_base(base)[1]
    peft_model = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    merged = peft_model.merge_and_unload()
    return merged, tok


def _read_json(p: Path) -> dict[str, Any]:
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise AtmError(f"{p}: not valid JSON ({exc})") from None


def _model_card(adapter_dir: Path) -> ModelCard:
    """Template, schema, encoder, dataset and training config, from the run and its dataset."""
    run = _read_json(adapter_dir / "atm_run.json")
    chain = [run]
    # A DAPO run trained on top of an SFT run dir: keep the whole lineage.
    base = _adapter_base(adapter_dir)
    prev = _read_json(Path(base) / "atm_run.json") if Path(base).is_dir() else {}
    if prev:
        chain.append(prev)
    dataset = run.get("dataset") or {}
    data_dir = DatasetDir(dataset["path"]) if dataset.get("path") else None
    if data_dir is not None and data_dir.has_card():
        dataset = data_dir.summary()
    template = dataset.get("template")
    if isinstance(template, dict):
        template_text = template.get("yaml") or template.get("text")
    else:
        template_text = template
    from atm.prompting.contract import resolve_contract

    # the dataset's schema, else its template's (the one chain of atm.prompting.contract)
    schema = resolve_contract(template_yaml=template_text if isinstance(template_text, str) else None,
                              schema=dataset.get("schema")).schema
    config = dataset.get("config") if isinstance(dataset.get("config"), dict) else {}
    return ModelCard(
        template=template_text, schema=schema,
        encoder=dataset.get("encoder") or {"name": config.get("encoder"), **(config.get("encoder_config") or {})},
        dataset=dataset,
        training=[{k: r.get(k) for k in ("method", "recipe", "overrides", "config", "global_step",
                                         "base_model", "train_rows", "provenance")} for r in chain],
        base_model=base, adapter=str(adapter_dir))


def merge(adapter_dir: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write base + adapter as one safetensors HF model dir plus `atm_model.json`."""
    from atm.utils import provenance

    adapter_dir, out = Path(adapter_dir), Path(out)
    merged, tok = load_merged(adapter_dir, dtype=dtype)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    from atm.finetune.base import copy_tokenizer_assets

    copy_tokenizer_assets(adapter_dir, tmp)
    copy_tokenizer_assets(_adapter_base(adapter_dir), tmp)
    card = _model_card(adapter_dir)
    card.provenance = provenance(None, dtype=dtype)
    card.write(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
