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
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from pydantic import Field

from atm.config import AtmConfig
from atm.errors import AtmError
from atm.utils import repo_root, write_json_atomic


class DemoConfig(AtmConfig):
    raw: str = Field("datasets/samples/binance", description="Binance-layout klines to start from")
    symbol: str = Field("BTCUSDT", description="symbol to use from the raw data")
    workdir: str = Field("runs/demo", description="where every stage's output goes")
    dataset_recipe: str = Field("datasets/recipes/sample-seed.yaml",
                                description="`atm prompts build` config for the dataset")
    recipe: str = Field("finetune/tiny-cpu.yaml", description="training recipe for SFT and ORPO")
    sft_steps: int = Field(150, description="SFT warm-up steps (tiny model, CPU)")
    orpo_steps: int = Field(60, description="ORPO steps after the warm-up")
    name: str = Field("atm", description="registry name of the exported model (atm:f16|q8|q4)")
    quants: list[str] = Field(default_factory=lambda: ["q8_0", "q4_k_m"], description="GGUF quant types")
    eval_models: list[str] = Field(
        default_factory=lambda: ["atm:q8", "atm:q4", "baseline:majority", "baseline:momentum", "classic:lgbm"],
        description="models compared by atm-eval")
    eval_limit: int | None = Field(None, description="verify items scored per model (None: the whole "
                                                     "verify split, 2,870 minutes on the sample)")
    eval_concurrency: int = Field(1, description="requests in flight per LLM (1: llama.cpp in process; "
                                                 ">1 starts a llama-server for the run)")


EXAMPLES = """examples:
  atm demo                      # first run ~15-20 min on 2 cores; reruns reuse finished stages
  atm demo --fresh              # redo every stage
  atm demo --set eval_limit=200 --set sft_steps=50"""


def register(p: argparse.ArgumentParser) -> None:
    p.epilog = EXAMPLES
    p.add_argument("--fresh", action="store_true", help="delete the demo's work dir and redo every stage")
    p.add_argument("--config", default=None, help="YAML DemoConfig (optional)")
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
                print(f"{label}: done earlier, reused ({stamp.relative_to(self.root)})", flush=True)
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
    cfg = DemoConfig.load(args.config, overrides=args.overrides)
    pipe = Pipeline(cfg, root)
    if args.fresh and pipe.work.exists():
        shutil.rmtree(pipe.work)
    pipe.work.mkdir(parents=True, exist_ok=True)
    return run_pipeline(pipe)


def run_pipeline(pipe: Pipeline) -> int:
    cfg, root, work = pipe.cfg, pipe.root, pipe.work
    total = 8
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

    def dataset() -> dict:
        from atm.prompting.dataset import BuildConfig, build_dataset

        bc = BuildConfig.load(root / cfg.dataset_recipe, klines=klines, out=str(work / "dataset"))
        path = build_dataset(bc)
        return {"outputs": [str(path)]}

    pipe.stage("dataset", total, ["data"], {"recipe": (root / cfg.dataset_recipe).read_text()}, dataset)
    ds = pipe.results["dataset"]["outputs"][0]

    def base() -> dict:
        from atm.finetune.base import TinyBaseConfig, build_tiny_base

        out = build_tiny_base(ds, work / "base-tiny", TinyBaseConfig())
        return {"outputs": [str(out)]}

    pipe.stage("base", total, ["dataset"], {}, base)
    base_dir = pipe.results["base"]["outputs"][0]
    recipe = root / cfg.recipe

    def train_and_merge(method: str, model: str, steps: int) -> Callable[[], dict]:
        def fn() -> dict:
            from atm.finetune.merge import merge
            from atm.finetune.train import train

            run_dir = train(method, recipe, overrides=[f"model={model}", f"data={ds}",
                                                       f"output_dir={work / method}", f"max_steps={steps}"])
            merged = merge(run_dir, work / f"{method}-merged")
            return {"outputs": [str(merged)], "run": str(run_dir)}
        return fn

    # SFT warm-up first (a cold model gets no preference signal), then ORPO on the merged SFT model.
    pipe.stage("sft", total, ["base"], {"recipe": recipe.read_text(), "steps": cfg.sft_steps},
               train_and_merge("sft", base_dir, cfg.sft_steps))
    sft_merged = pipe.results["sft"]["outputs"][0]
    pipe.stage("orpo", total, ["sft"], {"recipe": recipe.read_text(), "steps": cfg.orpo_steps},
               train_and_merge("orpo", sft_merged, cfg.orpo_steps))
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
        entries = [e for e in reg.list() if e.name == cfg.name]
        paths = write_modelfiles(entries, root / "modelfiles")
        return {"outputs": [str(p) for p in paths]}

    pipe.stage("modelfiles", total, ["export"], {}, modelfiles)

    def evaluate() -> dict:
        import subprocess

        out = work / "eval"
        argv = ["eval", "run", "--data", ds, "--split", "verify", "--out", str(out),
                "--concurrency", str(cfg.eval_concurrency)]
        for m in cfg.eval_models:
            argv += ["--model", m]
        if cfg.eval_limit:
            argv += ["--limit", str(cfg.eval_limit)]
        # A fresh interpreter: llama.cpp's prompt evaluation runs ~25x slower in a process that
        # has already run torch (the training stages above), so the eval gets its own process.
        rc = subprocess.call([sys.executable, "-m", "atm", *argv])
        if rc != 0:
            raise AtmError(f"atm-eval run exited {rc}")
        return {"outputs": [str(out / "report.html")]}

    pipe.stage("eval", total, ["export", "dataset"],
               {"models": cfg.eval_models, "limit": cfg.eval_limit}, evaluate)
    report = Path(pipe.results["eval"]["outputs"][0])
    metrics = report.parent / "metrics.json"
    print()
    print(f"report: {report}")
    if metrics.exists():
        for line in json.loads(metrics.read_text()).get("verdicts", []):
            print(f"verdict: {line}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from atm.cli import run as _run

    sys.exit(_run(["demo", *sys.argv[1:]]))
