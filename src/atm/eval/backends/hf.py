"""``hf:PATH``: a transformers causal LM (batched; on GPU when one is present), constrained by the
answer contract's grammar (``atm.prompting.hf_constraint``: its regex, the answers llama.cpp admits).
``loglik`` scores the options with the contract's answer pieces in one batched forward pass (the
change decoded first when the answer writes it first).
"""

from __future__ import annotations

import re
import time
from typing import Any, Iterator, Sequence

from atm.artifacts import ModelCard
from atm.constants import ADVICES
from atm.errors import require
from atm.eval.providers import (Prediction, Provider, generation_spec, item_messages, model_contract,
                                parsed_prediction, token_counts)
from atm.prompting.answer import most_likely, probs_from_logliks


class HFProvider(Provider):
    """``hf:PATH``: a transformers causal LM (batched; on GPU when one is present)."""

    supports_loglik = True

    def __init__(self, spec: str, arg: str, **options: Any):
        super().__init__(spec, arg, **options)
        self.gen = generation_spec(options)
        self.path = arg
        self.batch_size = int(options.get("batch_size") or 16)
        self._model = None
        card = ModelCard.read(self.path)  # written by `atm finetune merge`: template + schema
        self.contract = model_contract(options, card)
        self._answer_format = self.contract.answer_format
        self._pieces = self.contract.pieces
        self.schema = self.contract.schema

    def _load(self):
        if self._model is None:
            from atm.runtime.hf import load_causal_lm

            lm = load_causal_lm(self.path)
            self._model, self.tok, self.device = lm.model, lm.tokenizer, lm.device
            self._torch = require("torch", "train")
        return self._model

    def _prompts(self, items: Sequence[dict]) -> list[str]:
        return [self.tok.apply_chat_template(item_messages(it), add_generation_prompt=True, tokenize=False)
                for it in items]

    def predict_iter(self, items: Sequence[dict], mode: str = "generate") -> Iterator[Prediction]:
        self._load()
        for i in range(0, len(items), self.batch_size):
            chunk = list(items[i:i + self.batch_size])
            yield from (self._loglik(chunk) if mode == "loglik" else self._generate(chunk))

    def _generate(self, items: list[dict], max_new: int | None = None) -> list[Prediction]:
        torch = self._torch
        t0 = time.perf_counter()
        enc = self.tok(self._prompts(items), return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        from atm.prompting.hf_constraint import schema_processor

        with torch.no_grad():  # constrained to the schema, as every other engine is
            out = self._model.generate(**enc, max_new_tokens=max_new or int(self.gen.max_tokens), do_sample=False,
                                       pad_token_id=self.tok.pad_token_id,
                                       logits_processor=[schema_processor(self.tok, self.schema)])
        new = out[:, enc["input_ids"].shape[1]:]
        texts = self.tok.batch_decode(new, skip_special_tokens=True)
        lat = (time.perf_counter() - t0) / len(items)
        n_prompt = enc["attention_mask"].sum(dim=1).tolist()
        n_new = self._generated_lengths(new)
        # a batch evaluates every prompt whole (no prefix cache across batches)
        return [parsed_prediction(it["id"], txt, lat, batch=len(items), tokens=token_counts(p, p, c))
                for it, txt, p, c in zip(items, texts, n_prompt, n_new)]

    def _generated_lengths(self, new) -> list[int]:
        """Tokens each row generated: up to and including its first eos (the rest is padding)."""
        eos = self.tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        out = []
        for row in new.tolist():
            n = len(row)
            for k, t in enumerate(row):
                if t in eos_ids:
                    n = k + 1
                    break
            out.append(n)
        return out

    def _loglik(self, items: list[dict]) -> list[Prediction]:
        """Score 'prefix + option + closing quote' for the 3 options in one batched forward pass."""
        torch = self._torch
        t0 = time.perf_counter()
        pcs = self._pieces
        prompts = self._prompts(items)
        changes: list[str | None] = [None] * len(items)
        gen_tokens = [0] * len(items)
        if pcs["advice_first"]:
            prefixes = [p + pcs["before_advice"] for p in prompts]
        else:  # the change comes first: decode the answer greedily, take its change (strictly parsed)
            gens = self._generate(items, max_new=int(self.gen.max_tokens))
            for k, g in enumerate(gens):
                gen_tokens[k] = (g.tokens or {}).get("completion") or 0
                if g.valid and g.raw:
                    m = re.search(self.contract.change_pattern, g.raw)
                    changes[k] = m.group(0) if m else None
            prefixes = [p + pcs["before_change"] + (c or "0.00000000") + pcs["between"] for p, c in zip(prompts, changes)]
        seqs, plen = [], []
        n_prompts = [len(self.tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        # what follows the advice value, as the atm: provider scores it: change first, the rest of
        # the answer; advice first, through the token that holds the closing quote (the change
        # follows, not the advice)
        tail = pcs["after_advice"]
        for pre in prefixes:
            ids_pre = self.tok(pre, add_special_tokens=False)["input_ids"]
            for a in ADVICES:
                ids = self._through_quote(pre + a + tail, len(pre + a)) if pcs["advice_first"] else \
                    self.tok(pre + a + tail, add_special_tokens=False)["input_ids"]
                k = 0
                while k < min(len(ids_pre), len(ids)) and ids[k] == ids_pre[k]:
                    k += 1
                seqs.append(ids)
                plen.append(k)
        L = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id
        inp = torch.full((len(seqs), L), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), L), dtype=torch.long)
        for r, s in enumerate(seqs):  # left padding: the options end at the same column
            inp[r, L - len(s):] = torch.tensor(s)
            att[r, L - len(s):] = 1
        with torch.no_grad():
            logits = self._model(input_ids=inp.to(self.device), attention_mask=att.to(self.device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        out = []
        lat = (time.perf_counter() - t0) / len(items)
        for k, it in enumerate(items):
            lps = {}
            for j, a in enumerate(ADVICES):
                r = 3 * k + j
                s = seqs[r]
                off = L - len(s)
                lps[a] = float(sum(logp[r, off + q - 1, s[q]] for q in range(plen[r], len(s))))
            probs = probs_from_logliks(lps)
            adv = most_likely(probs)
            ch = changes[k]
            raw = self._answer_format.format(change=ch or "0.00000000", advice=adv)
            # each option is a whole row of the batch: the prompt is evaluated with each of them, so
            # what is evaluated past the prompt's first pass is counted as scored (nothing is cached)
            n_prompt = int(n_prompts[k])
            evaluated = sum(len(seqs[3 * k + j]) for j in range(len(ADVICES)))
            tokens = token_counts(n_prompt, n_prompt, gen_tokens[k], evaluated - n_prompt)
            out.append(Prediction(id=it["id"], raw=raw, advice=adv, predicted_change=float(ch) if ch else None,
                                  probs=probs, valid=True, latency=lat, tokens=tokens,
                                  extra={"logprob": lps, "mode": "loglik", "change_decoded": ch is not None}))
        return out

    def _through_quote(self, text: str, quote: int) -> list[int]:
        """The token ids of ``text`` up to and including the token that holds character ``quote``."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc["input_ids"], enc["offset_mapping"]
        for k, (_, end) in enumerate(offs):
            if end > quote:
                return list(ids[:k + 1])
        return list(ids)

    def describe(self) -> dict[str, Any]:
        from atm.utils import versions

        return {"spec": self.spec, "path": self.path, "device": getattr(self, "device", None),
                "batch_size": self.batch_size,
                "constraint": "lm-format-enforcer RegexParser(the answer contract's grammar), greedy, strictly parsed",
                **versions(("torch", "transformers"))}
