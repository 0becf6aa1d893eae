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
steps run on the live rows only. The batch's keys/values live in buffers with room for the
tokens still to come (:mod:`agents.kv_buffer`): a decode step writes one position in place
instead of copying the whole cache, as transformers' ``DynamicCache`` does. ``clear_cache()``
drops the kept cache (``rollout`` calls it at its start and end); it is also dropped when the
weights change in place (tensor version counters) or the active adapter changes - call it
yourself after swapping weights any other way. ``TransformersPolicy(..., reuse_cache=False)``
turns reuse off.

In a continuous rollout (:class:`~agents.schedulers.ContinuousScheduler`) an episode whose
observation is in is prefilled inside the decode batch's next step, its new ids laid after the batch's tokens in one
unpadded forward (:mod:`agents.packed`): one pass over the weights serves both, and the joining
episode samples its first token there. ``packed=False``, or a model that
:func:`~agents.packed.packed_ok` refuses, prefills in separate padded forwards instead.

Works with any causal LM in transformers, with or without a peft adapter, on CPU or GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from agents.kv_buffer import _SpareLayer, _spare_cache
from agents.packed import packed_ok
from agents.policy import Completion, SamplingParams, TokenizerPolicy, first_stop
from agents.schedulers import ContinuousScheduler


@dataclass
class _CacheEntry:
    """The KV cache of one row: ``ids`` (the tokens it covers) and per layer (keys, values),
    each ``[kv_heads, len(ids), head_dim]``."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]


class TransformersPolicy(TokenizerPolicy):
    def __init__(self, model, tokenizer, device: str | torch.device | None = None, reuse_cache: bool = True,
                 packed: bool = True):
        self.model = model
        self.reuse_cache = reuse_cache
        self.packed = packed  # continuous scheduler: prefill joining rows inside a decode step (agents.packed)
        self._packed_ok: bool | None = None  # packed_ok(model), checked once
        self._cache: list[_CacheEntry] = []  # rows of the last generate call
        self._cache_weights = None  # _weights_key() when the cache was made
        self._continuous_ok: bool | None = None  # turn_scheduler() support, checked once
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
        if not isinstance(past, DynamicCache):
            return None
        layers = getattr(past, "layers", None)
        if not layers or not all(type(layer) in (DynamicLayer, _SpareLayer) for layer in layers):
            return None
        return layers

    def _left_padded(self, caches: list, news: list[list[int]], spare: int = 0, base=None):
        """One batch from per-row KV caches and the ids to feed next. ``caches[i]`` is a list of
        per-layer (keys, values) ``[kv_heads, c_i, head_dim]`` or None (``c_i = 0``); row ``i`` is
        ``[pad]*(C - c_i) + its cache | [pad]*(S - s_i) + news[i]``, with position ids counting
        its real tokens only. ``base = (layers, attention_mask)`` of a batch already built (the
        continuous scheduler's decode batch) puts its rows first, copied as they are, padding
        included (they get no new ids). The cache's buffers have room for ``S + spare`` new
        positions. Returns (past, input_ids, attention_mask, position_ids of the new ids)."""
        B0, C0 = (0, 0) if base is None else tuple(base[1].shape)
        B = B0 + len(news)
        lens = [0 if c is None else int(c[0][0].shape[1]) for c in caches]
        C, S = max([C0, *lens]), max((len(x) for x in news), default=0)
        input_ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, C + S), dtype=torch.long)
        if base is not None:
            attn[:B0, C - C0 : C] = base[1]
        for i, (new, c) in enumerate(zip(news, lens), start=B0):
            if new:
                input_ids[i, S - len(new):] = torch.tensor(new, dtype=torch.long)
                attn[i, C + S - len(new):] = 1
            attn[i, C - c : C] = 1
        layers = []
        if C:
            ref = base[0] if base is not None else caches[lens.index(C)]
            for layer in range(len(ref)):
                kv = []
                for which in (0, 1):
                    r = ref[layer][which]
                    t = r.new_zeros((B, r.shape[-3], C + S + spare, r.shape[-1]))
                    if base is not None:
                        t[:B0, :, C - C0 : C] = r
                    for i, c in enumerate(caches):
                        if lens[i]:
                            t[B0 + i, :, C - lens[i] : C] = c[layer][which]
                    kv.append(t)
                layers.append(_SpareLayer.holding(kv[0], kv[1], C, spare))
        past = _spare_cache(layers, spare)
        input_ids, attn = input_ids.to(self.device), attn.to(self.device)
        pos = ((attn.cumsum(-1) - 1).clamp(min=0))[:, C:]
        return past, input_ids, attn, pos

    def _row_layers(self, past, attn: torch.Tensor, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row ``b``'s own KV cache (its real positions only) out of a batched one."""
        cols = attn[b].bool()
        return [(layer.keys[b][:, cols], layer.values[b][:, cols]) for layer in self._plain_layers(past)]

    def turn_scheduler(self, sampling: SamplingParams):
        """A :class:`ContinuousScheduler` for ``agents.rollout`` (None when the model's KV cache is
        not a plain per-layer one, e.g. sliding-window attention: the rollout then runs lockstep)."""
        if self._continuous_ok is None:
            with torch.no_grad():
                out = self.model(input_ids=torch.full((1, 1), self.pad_id, device=self.device), use_cache=True)
            self._continuous_ok = self._plain_layers(out.past_key_values) is not None
        if self._continuous_ok and self.packed and self._packed_ok is None:
            self._packed_ok = packed_ok(self.model)
        return ContinuousScheduler(self, sampling, packed=self.packed and bool(self._packed_ok)) if self._continuous_ok else None

    def _forward(self, **kwargs):
        """A prefill forward (logits for the last position only)."""
        if kwargs["input_ids"].shape[1] > 1 and self._logits_to_keep:
            try:
                return self.model(**kwargs, logits_to_keep=1)
            except TypeError:  # a model whose forward has no logits_to_keep
                self._logits_to_keep = False
        return self.model(**kwargs)

    def _prefill(self, prompts: list[list[int]], spare: int):
        """The prompts' forward, from the kept cache where a prompt extends one of its entries (the
        kept entries are then dropped: this call's rows make the new ones), with room for
        ``spare`` new positions. Returns (past, attention mask, position of the next token, logits
        of the last position, whether to keep the rows' caches)."""
        if self.reuse_cache and self._cache and self._cache_weights != self._weights_key():
            self._cache = []  # made with other weights
        hits = [self._lookup(p) if self.reuse_cache else (None, 0) for p in prompts]
        self._cache = []  # entries are rebuilt from this call's rows (the old ones may be reused below)
        caches = [[(k[:, :n], v[:, :n]) for k, v in e.layers] if n else None for e, n in hits]
        past, input_ids, attn, pos = self._left_padded(caches, [p[n:] for p, (_, n) in zip(prompts, hits)], spare=spare)
        out = self._forward(input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1, :]
        keep_cache = self.reuse_cache and self._plain_layers(past) is not None
        if keep_cache:
            self._cache_weights = self._weights_key()
        return past, attn, pos[:, -1] + 1, logits, keep_cache

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, contexts=None,
                 should_stop: Callable[[int], bool] | None = None) -> list[Completion]:
        """``should_stop(n)``, when given, is called after each decode step with the number of tokens
        generated so far; True ends generation there (rows still going finish with "length"). The
        model server uses it to drop a request whose client went away or whose deadline passed."""
        if not prompts:
            return []
        sp = sampling
        gen = None
        if sp.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(sp.seed)
        prompts = [[int(x) for x in p] for p in prompts]
        B = len(prompts)
        past, attn, next_pos, logits, keep_cache = self._prefill(prompts, sp.max_new_tokens)
        can_drop = hasattr(past, "batch_select_indices")
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
                reason[i] = self._stopped(ids[i], sp.stop, max_stop)
                if keep_cache and (reason[i] or last):  # the row's cache: everything fed so far
                    self._keep(past, attn, b, prompts[i] + ids[i][:-1])
                if not reason[i]:
                    live.append(b)
            if not live or last or (should_stop is not None and should_stop(step + 1)):
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
        return [self._completion(ids[i], lps[i], reason[i] or "length", sp.stop) for i in range(B)]

    def _stopped(self, ids: list[int], stop: tuple[str, ...], max_stop: int) -> str:
        """"eos" or "stop" when the last id ends the turn, else ""."""
        if ids[-1] in self.eos_ids:
            return "eos"
        if stop and any(s in self.tokenizer.decode(ids[-(max_stop + 2):], skip_special_tokens=False) for s in stop):
            return "stop"
        return ""

    def _completion(self, ids: list[int], lps: list[float], reason: str, stop: tuple[str, ...]) -> Completion:
        text = self.decode(ids)
        if reason == "stop":
            # the stop string ends inside the last token: keep the token, report text up to it
            cut = first_stop(text, stop)
            text = text[:cut] if cut >= 0 else text
        return Completion(ids, lps, text, reason)

    def _keep(self, past, attn: torch.Tensor, b: int, covered: list[int]) -> None:
        layers = self._row_layers(past, attn, b)
        assert layers[0][0].shape[1] == len(covered), (layers[0][0].shape, len(covered))
        self._cache.append(_CacheEntry(covered, layers))
