"""llama.cpp in process (llama-cpp-python), behind one small interface: the ``atm:`` eval provider.

``LlamaCppRunner(gguf, n_ctx=..., threads=...)``:

- ``chat(messages, grammar=..., temperature=..., max_tokens=...)``: a grammar-constrained chat
  completion (the GGUF's own chat template);
- ``prompt(messages) -> (text, add_bos)``: that template's rendering of ``messages`` and whether
  tokenizing it must add bos; ``tokenize(text, add_bos)``;
- ``complete(tokens, grammar=..., max_tokens=..., stop=...)``: greedy constrained decoding after a
  token prompt;
- ``next_logits(tokens)``: the model's logits for the token after ``tokens``.

Every call reuses the KV cache of the longest prefix it shares with the previous one (the shared
system prompt, instruction and k-shot examples are evaluated once per run). Only public
llama-cpp-python API is used: ``Llama.generate`` does the prefix reuse (one greedy token is
sampled and dropped) and ``llama_get_logits_ith`` reads the logits it left.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from atm.errors import AtmError, require


def default_threads(threads: int | None = None) -> int:
    """``threads``, else $OMP_NUM_THREADS, else every core: on a loaded 2-core box 2 threads ran
    ~8x slower than 1, so OMP_NUM_THREADS caps llama.cpp as it caps torch."""
    return threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1


class LlamaCppRunner:
    def __init__(self, gguf: str | Path, *, n_ctx: int, threads: int | None = None, n_batch: int = 512,
                 seed: int = 0, name: str | None = None):
        llama_cpp = require("llama_cpp", "eval", "llama-cpp-python")
        self._lc = llama_cpp
        self.gguf = Path(gguf)
        self.name = name or str(gguf)
        threads = default_threads(threads)
        # every layer on the GPU when this llama-cpp-python was built with a GPU backend
        # (CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python); the CPU wheel says no
        self.gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
        self.llm = llama_cpp.Llama(model_path=str(self.gguf), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, n_batch=n_batch,
                                   n_gpu_layers=-1 if self.gpu_offload else 0, seed=seed, verbose=False)
        self._formatter: Any = None

    # --- text ------------------------------------------------------------------------------------
    def grammar(self, gbnf: str) -> Any:
        return self._lc.LlamaGrammar.from_string(gbnf, verbose=False)

    def _token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

    def prompt(self, messages: Sequence[dict[str, str]]) -> tuple[str, bool]:
        """The chat prompt as text, rendered with the GGUF's chat template (as ``chat`` does), and
        whether tokenizing it must add bos."""
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            tpl = self.llm.metadata.get("tokenizer.chat_template")
            if not tpl:
                raise AtmError(f"{self.name}: the GGUF has no chat template")
            self._formatter = Jinja2ChatFormatter(template=tpl, eos_token=self._token_text(self.llm.token_eos()),
                                                  bos_token=self._token_text(self.llm.token_bos()),
                                                  add_generation_prompt=True)
        res = self._formatter(messages=list(messages))
        return res.prompt, not res.added_special

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    # --- decoding --------------------------------------------------------------------------------
    def chat(self, messages: Sequence[dict[str, str]], *, grammar: Any, temperature: float, max_tokens: int,
             seed: int = 0) -> dict[str, Any]:
        return self.llm.create_chat_completion(messages=list(messages), grammar=grammar, temperature=temperature,
                                               max_tokens=max_tokens, seed=seed)

    def complete(self, tokens: Sequence[int], *, grammar: Any, max_tokens: int, stop: Sequence[str] = (),
                 seed: int = 0) -> dict[str, Any]:
        return self.llm.create_completion(prompt=list(tokens), grammar=grammar, max_tokens=max_tokens,
                                          temperature=0.0, seed=seed, stop=list(stop))

    def next_logits(self, tokens: Sequence[int]) -> Any:
        """float64 logits of the token after ``tokens`` (the KV cache of the shared prefix kept)."""
        import numpy as np

        gen = self.llm.generate(list(tokens), temp=0.0, reset=True)
        next(gen)  # evaluates what is not cached yet; the sampled token is dropped
        gen.close()
        ptr = self._lc.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).astype(np.float64)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
