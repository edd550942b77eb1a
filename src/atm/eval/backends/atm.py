"""``atm:TAG`` (a registry name): llama.cpp in process (``atm.runtime.llamacpp``), or a
``llama-server`` (``atm.runtime.llama_server``, its own random key) for generate with
--concurrency > 1, both under the answer contract's GBNF (``atm.prompting.contract``).

The engine is chosen once, when the provider is made: llama-server for generate when
--concurrency > 1 and the binary exists (else in process, said in the report); loglik always runs
in process, one item at a time (exact option log-probs from the logits; a server only returns the
top-k log-probs of a generated answer, no faster). The concurrency never changes during a run.

``loglik``: the log-probability of each advice option after the prompt (and the answer text that
precedes the advice value), normalized over BUY/NOOP/SELL. Change first (the shipped format), the
change is decoded greedily under its grammar first and the options are scored on that shared
prefix; advice first, nothing is decoded.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from atm.constants import ADVICES
from atm.eval.backends.openai import OpenAIProvider
from atm.eval.providers import (RAW_KEEP, Prediction, RequestProvider, item_messages, model_contract,
                                parsed_prediction, token_counts)
from atm.prompting.answer import most_likely, probs_from_logliks
from atm.runtime.llamacpp import common_prefix


class AtmProvider(RequestProvider):
    """``atm:TAG`` (a registry name): llama.cpp in process (``atm.runtime.llamacpp``), or a
    ``llama-server`` (``atm.runtime.llama_server``, with its own random key) for --concurrency > 1."""

    supports_loglik = True

    def __init__(self, spec: str, arg: str, **options: Any):
        super().__init__(spec, arg, **options)
        from atm.eval.providers import resolve_registry

        self.entry = resolve_registry(spec, arg)
        self.contract = model_contract(options, self.entry)
        self._answer = self.contract.answer_format
        self.schema = self.contract.schema
        self._pieces = self.contract.pieces
        self.template_check = self._check_template(options)
        if self.template_check.get("mismatch"):
            self._note("the model's prompt template differs from the one the items were rendered with "
                       f"({self.template_check['mismatch']}): the original experiment's failure mode")
        self._server = None  # atm.runtime.llama_server.LlamaServer
        self._delegate: OpenAIProvider | None = None
        self._runner = None  # atm.runtime.llamacpp.LlamaCppRunner
        self._grammar = None
        self._change_grammar = None
        self._lock = threading.Lock()
        # the engine of generate mode, chosen once: llama-server for --concurrency > 1 where it exists
        self.use_server = False
        if self.concurrency > 1:
            from atm.export.llamacpp import find_tool

            self.use_server = find_tool("llama-server") is not None
            if not self.use_server:
                self._note("llama-server not found (build it with `atm doctor --build`): ran in process, "
                           "one request at a time")
                self.concurrency = 1
        self.batch_size = 16 if self.concurrency == 1 else 4 * self.concurrency
        if not self.use_server:
            self._load()  # load now: a broken file fails before any item, and load time is not item time

    # ------------------------------------------------------------ checks
    def _check_template(self, options: dict[str, Any]) -> dict[str, Any]:
        from atm.prompting.template import Template

        from atm.prompting.contract import dataset_template_of

        ds = dataset_template_of(options.get("dataset_meta"))
        if not ds or not self.entry.template:
            return {"checked": False}
        a = Template.from_yaml(self.entry.template, source=f"{self.entry.ref} template").spec
        b = Template.from_yaml(ds, source="the dataset's template").spec
        diff = [k for k in ("system", "instruction", "input", "answer") if getattr(a, k) != getattr(b, k)]
        return {"checked": True, "mismatch": ", ".join(diff) if diff else None}

    # ------------------------------------------------------------ engines
    def _start_server(self, options: dict[str, Any]) -> None:
        from atm.runtime.llama_server import LlamaServer

        log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "atm-eval-logs"
        self._server = LlamaServer(self.entry.path, name=self.entry.ref, alias=self.entry.ref,
                                   parallel=self.concurrency, ctx_size=self._n_ctx(), threads=self.gen.threads,
                                   threads_batch=False, metrics=False, log_dir=log_dir).start()
        base = self._server.base_url
        # llama-server's prompt cache: each slot keeps its last prompt's KV and a request reuses the
        # longest prefix it shares (the prefix every item starts with); cache_prompt says so
        # explicitly. The grammar is the in-process one (compact JSON in the schema's order): the
        # server's own json_schema grammar admits whitespace, and the model then pretty-prints
        # (SmolLM2: ~42 answer tokens instead of ~28).
        body = {"cache_prompt": bool(self.gen.prefix_cache), "grammar": self.contract.grammar}
        self._delegate = OpenAIProvider(f"openai:{self.entry.ref}@{base}", f"{self.entry.ref}@{base}",
                                        **{**self.options, "api_key": self._server.api_key, "extra_body": body,
                                           "contract": self.contract})
        self.batch_size = self._delegate.batch_size

    def _n_ctx(self) -> int:
        """The suite's context size, capped at the model's trained context."""
        n = int(self.gen.n_ctx)
        return min(n, int(self.entry.context_length)) if self.entry.context_length else n

    def _load(self):
        if self._runner is None:
            from atm.runtime.llamacpp import LlamaCppRunner

            self._runner = LlamaCppRunner(self.entry.path, n_ctx=self._n_ctx(), threads=self.gen.threads,
                                          n_batch=512, seed=0, name=self.entry.ref,
                                          prefix_reuse=bool(self.gen.prefix_cache))
            self._grammar = self._runner.grammar(self.contract.grammar)
            self._change_grammar = self._runner.grammar(self.contract.change_grammar)
        return self._runner

    # ------------------------------------------------------------ generate / loglik in process
    def _attempt(self, item: dict, mode: str) -> Prediction:
        runner = self._load()
        msgs = item_messages(item)
        with self._lock:
            t0 = time.perf_counter()
            if mode == "loglik":
                return self._loglik(item["id"], msgs, t0)
            out = runner.chat(msgs, grammar=self._grammar, temperature=float(self.gen.temperature),
                              max_tokens=int(self.gen.max_tokens), seed=0)
            lat = time.perf_counter() - t0
            st = runner.last
        return parsed_prediction(item["id"], out.text, lat, finish_reason=out.finish_reason,
                                 tokens=token_counts(st.prompt, st.prompt_eval, st.completion),
                                 engine_s=round(st.decode_s, 6))

    def prompt_text(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """The prompt loglik scores after: ``messages`` under the GGUF's chat template, and whether
        tokenizing it adds bos."""
        return self._load().prompt(messages)

    def _loglik(self, item_id: str, msgs: list[dict[str, str]], t0: float) -> Prediction:
        """Class probabilities from the log-prob of each answer continuation.

        Everything is tokenized as ONE string (prompt + answer), exactly as in training: tokenizing
        the answer separately would add a spurious word-start token with sentencepiece-style
        vocabularies and merge differently at the boundaries ('NOOP"}' is one token in the tiny model).

        Advice first (``answer_format: advice-first``): nothing is decoded; the options are scored
        right after ``{"advice": "``, through the token that closes the advice string (what follows
        is the change, not the advice). Change first: the change is decoded greedily under its
        grammar, then the options are scored with the rest of the answer (``"}``). The prompt and
        the answer text before the options are evaluated once (and only past the cached prefix),
        each option's tokens on top of them (``LlamaCppRunner.score``).
        """
        runner = self._runner
        prompt, add_bos = self.prompt_text(msgs)

        def tok(text: str) -> list[int]:
            return runner.tokenize(text, add_bos)

        n_prompt = len(tok(prompt))
        pcs = self._pieces
        change = None
        n_gen = 0
        reused = None
        decode_s = 0.0
        if pcs["advice_first"]:
            prefix = prompt + pcs["before_advice"]
            tail = pcs["after_advice"]
        else:
            # the change comes first: decode just its digits (grammar = the schema's pattern), greedily
            out = runner.generate(tok(prompt + pcs["before_change"]), grammar=self._change_grammar, max_tokens=24,
                                  stop=['"'])
            text = out.text
            st = runner.last
            n_gen, reused, decode_s, gen_evaluated = st.completion, st.reused, st.decode_s, st.evaluated
            if not re.fullmatch(self.contract.change_pattern, text):
                return Prediction(id=item_id, raw=text[:RAW_KEEP], valid=False,
                                  reason=f"bad number: decoded predicted_open_change {text[:40]!r} is not valid",
                                  latency=time.perf_counter() - t0, extra={"mode": "loglik"},
                                  tokens=token_counts(n_prompt, n_prompt - st.reused, n_gen))
            change = text
            prefix = prompt + pcs["before_change"] + change + pcs["between"]
            tail = pcs["after_advice"]
        seqs = [tok(prefix + a + tail) for a in ADVICES]
        shared = seqs[0]
        start = min(len(s) for s in seqs)
        for v in seqs[1:]:
            start = min(start, common_prefix(shared, v))
        ends = [len(s) for s in seqs]
        if pcs["advice_first"]:
            ends = [self._closing_token(runner, s, start, tail) for s in seqs]
        lp_lists = runner.score(seqs, start, ends, prompt=n_prompt)
        st = runner.last
        lps = {a: float(sum(v)) for a, v in zip(ADVICES, lp_lists)}
        probs = probs_from_logliks(lps)
        adv = most_likely(probs)
        raw = self._answer.format(change=change or "0.00000000", advice=adv)
        lat = time.perf_counter() - t0
        if reused is None:  # advice first: the prompt went through score()
            tokens = token_counts(n_prompt, st.prompt_eval, 0, st.scored)
        else:  # the change's decode evaluated the prompt (and the answer's start); score() the options
            p_eval = max(n_prompt - reused, 0)
            tokens = token_counts(n_prompt, p_eval, n_gen, max(gen_evaluated + st.evaluated - p_eval - n_gen, 0))
        return Prediction(id=item_id, raw=raw, advice=adv, predicted_change=float(change) if change else None,
                          probs=probs, valid=True, latency=lat, tokens=tokens,
                          extra={"logprob": lps, "option_mass": float(sum(math.exp(v) for v in lps.values())),
                                 "decoded_tokens": n_gen, "scored_tokens": [e - start for e in ends],
                                 "engine_s": round(decode_s + st.decode_s, 6), "mode": "loglik"})

    @staticmethod
    def _closing_token(runner, seq: list[int], start: int, tail: str) -> int:
        """The end (exclusive) of the tokens through the one holding the advice's closing quote, the
        first character of ``tail``: token pieces are concatenated bytes of the text after
        ``start``. Everything when the pieces do not add up (then nothing is cut)."""
        pieces = [runner.llm.detokenize([t]) for t in seq[start:]]
        total = sum(len(p) for p in pieces)
        quote = total - len(tail.encode("utf-8"))  # byte offset of the closing quote in these pieces
        if not tail or quote < 0 or b"".join(pieces)[quote:] != tail.encode("utf-8"):
            return len(seq)
        acc = 0
        for k, p in enumerate(pieces):
            acc += len(p)
            if acc > quote:
                return start + k + 1
        return len(seq)

    def answer_format(self) -> str:
        return self._answer

    # ------------------------------------------------------------ dispatch
    def prepare(self, mode: str) -> None:
        """Start the engine this mode uses before the timed loop (a server's start-up is not item time)."""
        if mode == "generate" and self.use_server and self._delegate is None:
            self._start_server(self.options)
        elif mode == "loglik" or not self.use_server:
            self._load()

    def predict_iter(self, items: Sequence[dict], mode: str = "generate") -> Iterator[Prediction]:
        # loglik always runs in process: exact option log-probs from the logits (a server only returns
        # top-k logprobs of a generated answer, no faster); --concurrency serves generate mode.
        if mode == "generate" and self.use_server:
            if self._delegate is None:
                self._start_server(self.options)
            assert self._delegate is not None
            yield from self._delegate.predict_iter(items, mode)
            if self._delegate.mode_note:
                self._note(self._delegate.mode_note)
            return
        if mode == "loglik" and self.concurrency > 1:
            self._note("loglik ran in process (exact option log-probs); --concurrency applies to generate")
        self._load()
        for it in items:  # in process: one item at a time (the runner holds one context)
            yield self.ask(it, mode)

    def describe(self) -> dict[str, Any]:
        from atm.utils import versions

        d = {"spec": self.spec, "ref": self.entry.ref, "path": self.entry.path, "sha256": self.entry.sha256,
             "quant": self.entry.quant, "llamacpp": self.entry.llamacpp, "template_check": self.template_check,
             "engine": "llama-server" if self._delegate else "llama-cpp-python in process",
             "gpu_offload": self._runner.gpu_offload if self._runner is not None else None,
             "concurrency": self.concurrency,
             "constraint": "the answer contract's GBNF (atm.prompting.contract)",
             "llama-cpp-python": versions(("llama-cpp-python",)).get("llama-cpp-python")}
        return d

    def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
        if self._runner is not None:
            self._runner.close()
            self._runner = None
