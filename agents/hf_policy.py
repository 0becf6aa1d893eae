"""TransformersPolicy: batched sampling with a KV cache, exact ids and raw log-probs.

Our own decode loop rather than ``model.generate``: it records the raw log-probability of
each sampled token from one ``[batch, vocab]`` logits row per step (``generate`` would keep
every step's logits, GBs for a 150k vocabulary), checks the action stop strings on the decoded
tail of each row, and stops each row at its first stop string or EOS. Prompts are left-padded
with explicit position ids, so a batch gives the same tokens as one prompt at a time under
greedy decoding (up to float rounding across batch shapes).

Multi-turn cost. A rollout calls ``generate`` once per turn with each episode's whole history
(prompt + earlier turns + observations). Re-encoding that history every turn made the prefill,
not the decoding, the bulk of a rollout's time. So the policy keeps the KV cache of its last
call, one entry per row (the ids it covers: the prompt plus every generated token but the last);
a new prompt that extends an entry reuses it and only its new tokens (the last action's last
token and the observation) are prefilled. The prefill computes logits for the last position
only, and a row that stops leaves the batch (its cache is cut out), so the remaining decode
steps run on the live rows only. ``clear_cache()`` drops the kept cache (``rollout`` calls it
at its start and end); it is also dropped when the weights change in place (tensor version
counters) or the active adapter changes - call it yourself after swapping weights any other
way. ``TransformersPolicy(..., reuse_cache=False)`` turns reuse off.

Works with any causal LM in transformers, with or without a peft adapter, on CPU or GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from agents.policy import Completion, SamplingParams, TokenizerPolicy, first_stop


@dataclass
class _CacheEntry:
    """The KV cache of one row: ``ids`` (the tokens it covers) and per layer (keys, values),
    each ``[kv_heads, len(ids), head_dim]``."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]


class TransformersPolicy(TokenizerPolicy):
    def __init__(self, model, tokenizer, device: str | torch.device | None = None, reuse_cache: bool = True):
        self.model = model
        self.reuse_cache = reuse_cache
        self._cache: list[_CacheEntry] = []  # rows of the last generate call
        self._cache_weights = None  # _weights_key() when the cache was made
        self._logits_to_keep = True  # pass logits_to_keep=1 to the prefill (dropped if the model refuses it)
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        eos = set()
        for src in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple)):
                eos.update(int(x) for x in src)
        self.eos_ids = eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
        self.pad_id = int(pad)

    def clear_cache(self) -> None:
        """Forget the KV cache kept from the last ``generate`` call."""
        self._cache = []

    def _weights_key(self) -> tuple:
        """Changes when the weights are updated in place (optimizer steps, ``load_state_dict``,
        ``copy_``: each bumps a tensor's version counter) or the active peft adapter changes."""
        return (sum(p._version for p in self.model.parameters()), str(getattr(self.model, "active_adapter", "")))

    # -- sampling -------------------------------------------------------------------------------
    @staticmethod
    def _sample(logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
        if sp.temperature == 0:
            return logits.argmax(-1)
        logits = logits / sp.temperature
        if sp.top_k:
            kth = torch.topk(logits, min(sp.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if sp.top_p < 1.0:
            sorted_l, idx = torch.sort(logits, descending=True, dim=-1)
            probs = torch.softmax(sorted_l, -1)
            drop = probs.cumsum(-1) - probs > sp.top_p
            sorted_l = sorted_l.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_l)
        probs = torch.softmax(logits.float(), -1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    # -- KV cache kept across calls -------------------------------------------------------------
    def _lookup(self, prompt: list[int]) -> tuple[_CacheEntry | None, int]:
        """The kept entry covering the longest prefix of ``prompt`` and how many of its positions
        to reuse (at most ``len(prompt) - 1``: the last prompt token is always fed)."""
        best, n = None, 0
        for e in self._cache:
            k = min(len(e.ids), len(prompt) - 1)
            if k > n and prompt[:k] == e.ids[:k]:
                best, n = e, k
        return best, n

    @staticmethod
    def _plain_layers(past) -> list | None:
        """The cache layers when ``past`` is a plain full-attention DynamicCache, else None."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        if not isinstance(past, DynamicCache):
            return None
        layers = getattr(past, "layers", None)
        if not layers or not all(type(layer) is DynamicLayer for layer in layers):
            return None
        return layers

    def _forward(self, **kwargs):
        if kwargs["input_ids"].shape[1] > 1 and self._logits_to_keep:
            try:
                return self.model(**kwargs, logits_to_keep=1)
            except TypeError:  # a model whose forward has no logits_to_keep
                self._logits_to_keep = False
        return self.model(**kwargs)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, contexts=None) -> list[Completion]:
        if not prompts:
            return []
        sp = sampling
        gen = None
        if sp.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(sp.seed)
        prompts = [[int(x) for x in p] for p in prompts]
        B = len(prompts)
        if self.reuse_cache and self._cache and self._cache_weights != self._weights_key():
            self._cache = []  # made with other weights
        hits = [self._lookup(p) if self.reuse_cache else (None, 0) for p in prompts]
        self._cache = []  # entries are rebuilt from this call's rows (the old ones may be reused below)
        reused = [n for _, n in hits]
        C = max(reused)
        S = max(len(p) - n for p, n in zip(prompts, reused))
        # row i: [pad]*(C - c_i) + cached c_i | [pad]*(S - s_i) + its s_i new tokens
        input_ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, C + S), dtype=torch.long)
        for i, (p, n) in enumerate(zip(prompts, reused)):
            new = p[n:]
            if new:
                input_ids[i, S - len(new):] = torch.tensor(new, dtype=torch.long)
                attn[i, C + S - len(new):] = 1
            attn[i, C - n : C] = 1
        past = None
        if C:
            from transformers.cache_utils import DynamicCache

            n_layers = len(next(e for e, n in hits if n).layers)
            data = []
            for layer in range(n_layers):
                kv = []
                for which in (0, 1):
                    ref = next(e for e, n in hits if n).layers[layer][which]
                    t = torch.zeros((B, ref.shape[0], C, ref.shape[-1]), dtype=ref.dtype, device=ref.device)
                    for i, (e, n) in enumerate(hits):
                        if n:
                            t[i, :, C - n :] = e.layers[layer][which][:, :n]
                    kv.append(t)
                data.append(tuple(kv))
            past = DynamicCache()
            for layer, (k, v) in enumerate(data):
                past.update(k, v, layer)
        input_ids, attn = input_ids.to(self.device), attn.to(self.device)
        pos = ((attn.cumsum(-1) - 1).clamp(min=0))[:, C:]
        out = self._forward(input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1, :]
        keep_cache = self.reuse_cache and self._plain_layers(past) is not None
        if keep_cache:
            self._cache_weights = self._weights_key()
        can_drop = hasattr(past, "batch_select_indices")
        next_pos = pos[:, -1] + 1
        ids: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        reason = [""] * B
        rows = list(range(B))  # prompt index of each batch row
        max_stop = max((len(s) for s in sp.stop), default=0)
        for step in range(sp.max_new_tokens):
            tok = self._sample(logits, sp, gen)
            logp = torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None]).squeeze(-1)
            tok_l, logp_l = tok.tolist(), logp.tolist()
            last = step == sp.max_new_tokens - 1
            live = []  # batch rows still decoding after this token
            for b, i in enumerate(rows):
                if reason[i]:  # ended earlier (only when rows cannot leave the batch)
                    continue
                ids[i].append(tok_l[b])
                lps[i].append(logp_l[b])
                if tok_l[b] in self.eos_ids:
                    reason[i] = "eos"
                elif sp.stop:
                    tail = self.tokenizer.decode(ids[i][-(max_stop + 2):], skip_special_tokens=False)
                    if any(s in tail for s in sp.stop):
                        reason[i] = "stop"
                if keep_cache and (reason[i] or last):  # the row's cache: everything fed so far
                    self._keep(past, attn, b, prompts[i] + ids[i][:-1])
                if not reason[i]:
                    live.append(b)
            if not live or last:
                break
            if can_drop and len(live) < len(rows):  # finished rows leave the batch
                sel = torch.tensor(live, device=self.device)
                past.batch_select_indices(sel)
                tok, attn, next_pos = tok[sel], attn[sel], next_pos[sel]
                rows = [rows[b] for b in live]
            elif len(live) < len(rows):
                done = torch.tensor([bool(reason[i]) for i in rows], device=self.device)
                tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            attn = torch.cat([attn, torch.ones((len(rows), 1), dtype=attn.dtype, device=self.device)], dim=1)
            out = self.model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1, :]
            next_pos = next_pos + 1
        results = []
        for i in range(B):
            text = self.decode(ids[i])
            if reason[i] == "stop":
                # the stop string ends inside the last token: keep the token, report text up to it
                cut = first_stop(text, sp.stop)
                text = text[:cut] if cut >= 0 else text
            results.append(Completion(ids[i], lps[i], text, reason[i] or "length"))
        return results

    def _keep(self, past, attn: torch.Tensor, b: int, covered: list[int]) -> None:
        cols = attn[b].bool()
        layers = [(layer.keys[b][:, cols], layer.values[b][:, cols]) for layer in self._plain_layers(past)]
        assert layers[0][0].shape[1] == len(covered), (layers[0][0].shape, len(covered))
        self._cache.append(_CacheEntry(covered, layers))
