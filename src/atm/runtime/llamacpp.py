"""llama.cpp in process (llama-cpp-python), behind one small interface: the ``atm:`` eval provider.

``LlamaCppRunner(gguf, n_ctx=..., threads=..., prefix_reuse=True)``:

- ``prompt(messages) -> (text, add_bos)``: the GGUF's chat template's rendering of ``messages``
  and whether tokenizing it must add bos; ``tokenize(text, add_bos)``, ``detokenize(tokens)``;
- ``grammar(gbnf) -> Grammar``: a GBNF grammar, compiled once and reused by every call;
- ``generate(tokens, grammar=..., max_tokens=..., stop=..., temperature=0.0)`` -> ``Generation``:
  (constrained) decoding after a token prompt; ``chat(messages, ...)`` is the same after the chat
  prompt;
- ``score(sequences, start, ends)``: the log-probability of each sequence's tokens
  ``start .. end-1`` given what precedes them (teacher-forced), the part all sequences share
  evaluated once;
- ``next_logits(tokens)``: the model's logits for the token after ``tokens``;
- ``last``: what the last call cost (``CallStats``: prompt tokens, how many came from the KV cache,
  tokens evaluated, generated and scored, seconds inside ``llama_decode``).

KV prefix reuse, explicit: the runner keeps the list of tokens whose keys/values sit in the
context (``cached``). Each call evaluates only what follows the longest prefix it shares with them,
so the system prompt, instruction and k-shot examples that every item starts with are evaluated once
per run when items come one after another (the harness orders them by time). ``prefix_reuse=False``
evaluates every prompt whole (to measure what reuse saves). The last cached token is re-evaluated
when a prompt is all cached, since its logits are not kept.

Greedy decoding under a grammar: the model's top token is checked against the grammar alone, and
the grammar is applied to the whole vocabulary only when that token is refused (what llama.cpp's
own sampler does). The chosen token is the same as applying the grammar first and taking the
argmax, but a grammar pass over a 49k-token vocabulary costs more than decoding a token of a 135M
model, and a model that writes the format it was trained on rarely needs one. Sampling with a
temperature goes through llama-cpp-python's ``create_completion`` (same cache bookkeeping).

Only public llama-cpp-python API is used: the ``Llama`` object loads the model and tokenizes; the
decoding loop uses llama.cpp's C API as llama_cpp exports it (``llama_decode``, ``llama_batch``,
``llama_memory_seq_rm``, grammar samplers, ``llama_get_logits_ith``), and ``Llama.input_ids`` /
``n_tokens`` are kept equal to ``cached`` so the high-level calls reuse the cache too.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from atm.errors import AtmError, require
from atm.export.llamacpp import no_amx_repack


def default_threads(threads: int | None = None) -> int:
    """``threads``, else $OMP_NUM_THREADS, else every core: on a loaded 2-core box 2 threads ran
    ~8x slower than 1, so OMP_NUM_THREADS caps llama.cpp as it caps torch."""
    return threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class CallStats:
    """What one runner call cost, in tokens and engine seconds.

    ``prompt``: tokens of the prompt; ``reused``: of those, taken from the KV cache;
    ``prompt_eval``: prompt tokens evaluated (``prompt - reused``); ``completion``: tokens
    generated; ``scored``: tokens evaluated teacher-forced after the prompt (``score``);
    ``evaluated``: every token this call ran through the model; ``decode_s``: seconds inside
    ``llama_decode``; ``grammar_passes``: full-vocabulary grammar passes (the rest were checks of
    the top token alone)."""

    prompt: int = 0
    reused: int = 0
    prompt_eval: int = 0
    completion: int = 0
    scored: int = 0
    evaluated: int = 0
    decode_s: float = 0.0
    grammar_passes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    text: str
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "stop"  # stop (end of generation, the grammar's end or a stop string) | length


class Grammar:
    """A GBNF grammar compiled once into a llama.cpp grammar sampler; reset before each use."""

    def __init__(self, lc: Any, vocab: Any, gbnf: str):
        self._lc = lc
        self.gbnf = gbnf
        self.sampler = lc.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not self.sampler:
            raise AtmError("llama.cpp refused the grammar (see its log for the rule):\n" + gbnf[:2000])
        self._high_level: Any = None

    def llama_grammar(self) -> Any:
        """The same grammar for llama-cpp-python's high-level calls (sampling with a temperature)."""
        if self._high_level is None:
            self._high_level = self._lc.LlamaGrammar.from_string(self.gbnf, verbose=False)
        return self._high_level

    def close(self) -> None:
        if self.sampler:
            self._lc.llama_sampler_free(self.sampler)
            self.sampler = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class LlamaCppRunner:
    def __init__(self, gguf: str | Path, *, n_ctx: int, threads: int | None = None, n_batch: int = 512,
                 seed: int = 0, name: str | None = None, prefix_reuse: bool = True):
        llama_cpp = require("llama_cpp", "eval", "llama-cpp-python")
        import numpy as np

        self._lc = llama_cpp
        self._np = np
        self.gguf = Path(gguf)
        self.name = name or str(gguf)
        self.prefix_reuse = prefix_reuse
        threads = default_threads(threads)
        # every layer on the GPU when this llama-cpp-python was built with a GPU backend
        # (CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python); the CPU wheel says no
        self.gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
        no_amx_repack()  # AMX-repacked weights segfault in this llama.cpp (atm.export.llamacpp)
        self.llm = llama_cpp.Llama(model_path=str(self.gguf), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, n_batch=n_batch,
                                   n_gpu_layers=-1 if self.gpu_offload else 0, seed=seed, verbose=False)
        self.n_ctx = int(self.llm.n_ctx())
        self.n_batch = int(n_batch)
        self.n_vocab = int(self.llm.n_vocab())
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._memory = llama_cpp.llama_get_memory(self.llm.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._cached: list[int] = []  # tokens whose KV is in the context (sequence 0), in order
        self._formatter: Any = None
        self._cand: Any = None  # the whole vocabulary as llama_token_data, for full grammar passes
        self._top: Any = None  # the TOP_K most likely tokens, checked before a full pass
        self._one = llama_cpp.llama_token_data()
        self._one_arr = llama_cpp.llama_token_data_array(data=ctypes.pointer(self._one), size=1, selected=-1,
                                                         sorted=False)
        self.last = CallStats()

    # --- text ------------------------------------------------------------------------------------
    def grammar(self, gbnf: str) -> Grammar:
        return Grammar(self._lc, self._vocab, gbnf)

    def _token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

    def prompt(self, messages: Sequence[dict[str, str]]) -> tuple[str, bool]:
        """The chat prompt as text, rendered with the GGUF's chat template (as llama-cpp-python's
        ``create_chat_completion`` does), and whether tokenizing it must add bos."""
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

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", "replace")

    @property
    def cached(self) -> list[int]:
        """The tokens whose keys/values are in the context now (a copy)."""
        return list(self._cached)

    # --- the KV cache and llama_decode -----------------------------------------------------------
    def reset(self) -> None:
        """Empty the KV cache (the next call evaluates its whole prompt)."""
        self._lc.llama_memory_clear(self._memory, True)
        self._cached = []
        self._sync_llama()

    def _truncate(self, n: int) -> None:
        """Keep the first ``n`` cached tokens, drop the rest from the KV cache."""
        if n < len(self._cached):
            if not self._lc.llama_memory_seq_rm(self._memory, 0, n, -1):
                n = 0  # this cache cannot drop a tail (recurrent models): start over
                self._lc.llama_memory_clear(self._memory, True)
            del self._cached[n:]

    def _decode(self, tokens: Sequence[int], want: Sequence[int] = (), stats: CallStats | None = None) -> dict[int, Any]:
        """Append ``tokens`` to the cache (positions ``len(cached)`` on) and return the logits at the
        cache positions in ``want`` (float32 copies), each the distribution of the token after it."""
        lc, np, b = self._lc, self._np, self._batch
        start = len(self._cached)
        if start + len(tokens) > self.n_ctx:
            raise AtmError(f"{self.name}: {start + len(tokens)} tokens do not fit the context of {self.n_ctx} "
                           "(raise generation.n_ctx)")
        want_set = set(want)
        out: dict[int, Any] = {}
        for off in range(0, len(tokens), self.n_batch):
            chunk = tokens[off:off + self.n_batch]
            rows: list[int] = []
            for i, tok in enumerate(chunk):
                pos = start + off + i
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                flag = pos in want_set
                b.logits[i] = flag
                if flag:
                    rows.append(i)
            b.n_tokens = len(chunk)
            t0 = time.perf_counter()
            rc = lc.llama_decode(self.llm.ctx, b)
            if stats is not None:
                stats.decode_s += time.perf_counter() - t0
                stats.evaluated += len(chunk)
            if rc != 0:
                self.reset()
                raise AtmError(f"{self.name}: llama_decode failed ({rc})")
            self._cached.extend(chunk)
            for i in rows:
                ptr = lc.llama_get_logits_ith(self.llm.ctx, i)
                out[start + off + i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        return out

    def _prefill(self, tokens: Sequence[int], stats: CallStats, want: Sequence[int] = ()) -> dict[int, Any]:
        """Make the cache hold exactly ``tokens``, evaluating only what follows the prefix it
        already holds, and return the logits at the positions in ``want`` and at the last token.
        A wanted position that is already cached is evaluated again (logits are not kept)."""
        tokens = list(tokens)
        if not tokens:
            raise AtmError(f"{self.name}: empty prompt")
        last = len(tokens) - 1
        keep = common_prefix(self._cached, tokens) if self.prefix_reuse else 0
        keep = min([keep, last, *want])
        self._truncate(keep)
        stats.reused += keep
        return self._decode(tokens[keep:], [*want, last], stats)

    def _sync_llama(self) -> None:
        """Tell the ``Llama`` object what the cache holds (its own calls then reuse it too)."""
        n = len(self._cached)
        if n:
            self.llm.input_ids[:n] = self._cached
        self.llm.n_tokens = n

    # --- decoding --------------------------------------------------------------------------------
    def _allowed(self, grammar: Grammar, token: int, logit: float) -> bool:
        self._one.id, self._one.logit, self._one.p = token, logit, 0.0
        self._one_arr.data = ctypes.pointer(self._one)
        self._one_arr.size, self._one_arr.selected, self._one_arr.sorted = 1, -1, False
        self._lc.llama_sampler_apply(grammar.sampler, ctypes.byref(self._one_arr))
        return self._one_arr.size == 1 and self._one.logit != float("-inf")

    TOP_K = 64  # candidates checked together before a full-vocabulary grammar pass

    def _constrained_argmax(self, grammar: Grammar, logits: Any, stats: CallStats) -> int:
        """The top token was refused: the best allowed one among the TOP_K most likely (exactly the
        grammar-masked argmax when one of them is allowed and scores above the K-th logit), else a
        full pass over the vocabulary."""
        np, lc = self._np, self._lc
        k = min(self.TOP_K, self.n_vocab)
        idx = np.argpartition(logits, -k)[-k:]
        if self._top is None:
            dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
            self._top = np.zeros(k, dtype=dtype)
        top = self._top[:k]
        top["id"] = idx
        top["logit"] = logits[idx]
        top["p"] = 0.0
        floor = float(top["logit"].min())
        arr = lc.llama_token_data_array(data=top.ctypes.data_as(lc.llama_token_data_p), size=k, selected=-1,
                                        sorted=False)
        lc.llama_sampler_apply(grammar.sampler, ctypes.byref(arr))
        lg = top["logit"]
        if np.isfinite(lg).any():
            best = float(lg.max())
            if best > floor:  # no token outside the K can tie with it
                return int(top["id"][lg == best].min())  # ties: the lowest id, as argmax over the vocabulary
        stats.grammar_passes += 1
        return self._grammar_argmax(grammar, logits)

    def _grammar_argmax(self, grammar: Grammar, logits: Any) -> int:
        """The argmax over the tokens the grammar allows now (a full-vocabulary pass)."""
        np, lc = self._np, self._lc
        if self._cand is None:
            dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
            assert dtype.itemsize == ctypes.sizeof(lc.llama_token_data)
            self._cand = np.zeros(self.n_vocab, dtype=dtype)
            self._cand["id"] = np.arange(self.n_vocab, dtype=np.int32)
        cand = self._cand
        cand["logit"] = logits
        arr = lc.llama_token_data_array(data=cand.ctypes.data_as(lc.llama_token_data_p), size=self.n_vocab,
                                        selected=-1, sorted=False)
        lc.llama_sampler_apply(grammar.sampler, ctypes.byref(arr))
        # the grammar sampler masks refused tokens in place (logit -inf); it neither moves nor sorts
        assert arr.size == self.n_vocab and ctypes.addressof(arr.data.contents) == cand.ctypes.data
        k = int(np.argmax(cand["logit"]))
        if not np.isfinite(cand["logit"][k]):
            raise AtmError(f"{self.name}: the grammar allows no token here")
        return int(cand["id"][k])

    def generate(self, tokens: Sequence[int], *, grammar: Grammar | None = None, max_tokens: int,
                 stop: Sequence[str] = (), temperature: float = 0.0, seed: int = 0) -> Generation:
        """Decode after ``tokens`` (greedy when ``temperature`` is 0) until end of generation, the
        grammar's end, a stop string (cut off, as OpenAI's ``stop``) or ``max_tokens``."""
        stats = CallStats(prompt=len(tokens))
        self.last = stats
        if temperature > 0:
            return self._sample(tokens, grammar, max_tokens, stop, temperature, seed, stats)
        np, lc = self._np, self._lc
        logits = self._prefill(tokens, stats)[len(tokens) - 1]
        stats.prompt_eval = stats.prompt - stats.reused
        if grammar is not None:
            lc.llama_sampler_reset(grammar.sampler)
        out: list[int] = []
        text = ""
        finish = "length"
        while len(out) < max_tokens:
            tok = int(np.argmax(logits))
            if grammar is not None and not self._allowed(grammar, tok, float(logits[tok])):
                tok = self._constrained_argmax(grammar, logits, stats)
            if lc.llama_vocab_is_eog(self._vocab, tok):
                finish = "stop"
                break
            if grammar is not None:
                lc.llama_sampler_accept(grammar.sampler, tok)
            out.append(tok)
            stats.completion += 1
            if stop:
                text = self.detokenize(out)
                cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    break
            if len(out) == max_tokens:
                break
            pos = len(self._cached)
            logits = self._decode([tok], [pos], stats)[pos]
        if not stop or finish == "length":
            text = self.detokenize(out)
        self._sync_llama()
        return Generation(text=text, tokens=out, finish_reason=finish)

    def _sample(self, tokens: Sequence[int], grammar: Grammar | None, max_tokens: int, stop: Sequence[str],
                temperature: float, seed: int, stats: CallStats) -> Generation:
        """Sampling with a temperature: llama-cpp-python's own sampler chain, the cache shared."""
        tokens = list(tokens)
        keep = min(common_prefix(self._cached, tokens) if self.prefix_reuse else 0, len(tokens) - 1)
        self._truncate(keep)
        self._sync_llama()  # Llama.generate reuses exactly these ``keep`` tokens
        t0 = time.perf_counter()
        res = self.llm.create_completion(prompt=tokens, grammar=grammar.llama_grammar() if grammar else None,
                                         max_tokens=max_tokens, temperature=temperature, seed=seed,
                                         stop=list(stop))
        stats.decode_s += time.perf_counter() - t0  # sampling included: no finer figure here
        self._cached = [int(t) for t in self.llm.input_ids[:self.llm.n_tokens]]
        usage = res.get("usage") or {}
        stats.reused = keep
        stats.prompt_eval = len(tokens) - keep
        stats.completion = int(usage.get("completion_tokens") or 0)
        stats.evaluated = stats.prompt_eval + max(stats.completion - 1, 0)
        ch = res["choices"][0]
        return Generation(text=ch["text"], finish_reason=ch.get("finish_reason") or "stop")

    def chat(self, messages: Sequence[dict[str, str]], *, grammar: Grammar | None, temperature: float,
             max_tokens: int, seed: int = 0) -> Generation:
        """``generate`` after the chat prompt of ``messages`` (the GGUF's template)."""
        text, add_bos = self.prompt(messages)
        return self.generate(self.tokenize(text, add_bos), grammar=grammar, max_tokens=max_tokens,
                             temperature=temperature, seed=seed)

    def score(self, sequences: Sequence[Sequence[int]], start: int, ends: Sequence[int] | None = None,
              prompt: int | None = None) -> list[list[float]]:
        """Log-probabilities of ``seq[start:end]`` for each sequence, each token given all before it.

        The sequences share their first ``start`` tokens (asserted); those are evaluated once (and
        only past what the cache holds), the first sequence's scored tokens in the same batch, then
        each other sequence's tokens on that shared prefix. ``prompt`` (the prompt's length within
        the shared part) splits the evaluated tokens into ``prompt_eval`` and ``scored`` in ``last``.
        The cache keeps the shared prefix afterwards."""
        np = self._np
        seqs = [list(s) for s in sequences]
        ends = [len(s) for s in seqs] if ends is None else list(ends)
        if start < 1 or any(common_prefix(seqs[0], s) < start for s in seqs) or any(e <= start for e in ends):
            raise AtmError("score: the sequences must share their first `start` (>= 1) tokens and score at least one")
        stats = CallStats(prompt=prompt if prompt is not None else start)
        self.last = stats

        def logprobs(lg: dict[int, Any], seq: list[int], end: int) -> list[float]:
            res = []
            for j in range(start, end):
                row = lg[j - 1].astype(np.float64)
                m = row.max()
                res.append(float(row[seq[j]] - (m + np.log(np.exp(row - m).sum()))))
            return res

        first = seqs[0]
        want = list(range(start - 1, ends[0] - 1))
        lg = self._prefill(first[:ends[0] - 1], stats, want)
        stats.prompt_eval = max(stats.prompt - stats.reused, 0)
        shared_logits = lg[start - 1]
        out = [logprobs(lg, first, ends[0])]
        for seq, end in zip(seqs[1:], ends[1:]):
            self._truncate(start)
            lg = {start - 1: shared_logits}
            if end - 1 > start:
                lg.update(self._decode(seq[start:end - 1], range(start, end - 1), stats))
            out.append(logprobs(lg, seq, end))
        self._truncate(start)
        self._sync_llama()
        stats.scored = stats.evaluated - stats.prompt_eval
        return out

    def next_logits(self, tokens: Sequence[int]) -> Any:
        """float64 logits of the token after ``tokens`` (the cached prefix reused)."""
        stats = CallStats(prompt=len(tokens))
        self.last = stats
        lg = self._prefill(tokens, stats)[len(tokens) - 1]
        stats.prompt_eval = stats.prompt - stats.reused
        self._sync_llama()
        return lg.astype(self._np.float64)

    def close(self) -> None:
        if self.llm is not None:
            self._lc.llama_batch_free(self._batch)
            self.llm.close()
            self.llm = None
