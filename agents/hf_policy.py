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
steps run on the live rows only. The batch's keys/values live in buffers with room
for the tokens still to come (:class:`_SpareLayer`): a decode step writes one position in place
instead of copying the whole cache, as transformers' ``DynamicCache`` does. ``clear_cache()``
drops the kept cache (``rollout`` calls it at its start and end); it is also dropped when the
weights change in place (tensor version counters) or the active adapter changes - call it
yourself after swapping weights any other way. ``TransformersPolicy(..., reuse_cache=False)``
turns reuse off.

In a continuous rollout (:class:`ContinuousScheduler`) an episode whose observation is in is
prefilled inside the decode batch's next step, its new ids laid after the batch's tokens in one
unpadded forward (:mod:`agents.packed`): one pass over the weights serves both, and the joining
episode samples its first token there. ``packed=False``, or a model that
:func:`~agents.packed.packed_ok` refuses, prefills in separate padded forwards instead.

Works with any causal LM in transformers, with or without a peft adapter, on CPU or GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from agents.packed import Batch, Seq, packed_forward, packed_ok
from agents.policy import Completion, SamplingParams, TokenizerPolicy, first_stop


class _SpareLayer(DynamicLayer):
    """A full-attention cache layer whose keys/values are the views ``[..., lo:hi, :]`` of buffers
    with spare positions after ``hi``, so ``update`` writes new positions in place.

    A plain ``DynamicLayer`` concatenates instead: every decode step copies the whole cache of
    every layer into fresh memory. On CPU at batch 8 and a thousand positions that copy took about
    as long as the rest of the step (the episodes of a rollout are long: prompt, turns and
    observations). ``lo`` moves forward when the first columns hold only padding
    (:meth:`ContinuousScheduler._leave`), so no copy is needed to shrink the batch's width either.
    """

    def __init__(self, spare: int = 0):
        super().__init__()
        self.spare = spare  # positions to keep free after a (re)allocation
        self.kb = self.vb = self._seen = None
        self.lo = self.hi = 0

    @classmethod
    def holding(cls, kb: torch.Tensor, vb: torch.Tensor, n: int, spare: int) -> "_SpareLayer":
        """A layer over buffers whose first ``n`` positions are filled."""
        layer = cls(spare)
        layer.lazy_initialization(kb, vb)
        layer.kb, layer.vb, layer.hi = kb, vb, n
        layer._view()
        return layer

    def _view(self) -> None:
        self.keys, self.values = self.kb[..., self.lo : self.hi, :], self.vb[..., self.lo : self.hi, :]
        self._seen = self.keys  # keys set by anyone else (e.g. DynamicLayer.crop) are copied on update

    def _move(self, cap: int) -> None:
        """New buffers of ``cap`` positions holding the current keys/values at their start."""
        k, v = self.keys, self.values
        n = k.shape[-2]
        self.kb = k.new_empty((*k.shape[:-2], cap, k.shape[-1]))
        self.vb = v.new_empty((*v.shape[:-2], cap, v.shape[-1]))
        self.kb[..., :n, :], self.vb[..., :n, :] = k, v
        self.lo, self.hi = 0, n

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.kb is None or self.keys is not self._seen:
            if self.keys.dim() != key_states.dim():  # empty
                self.keys = key_states[..., :0, :]
                self.values = value_states[..., :0, :]
            self._move(self.keys.shape[-2] + n + self.spare)  # first use, or keys set by someone else
        elif self.hi + n > self.kb.shape[-2]:
            length = self.hi - self.lo + n
            self._move(length + max(self.spare, length // 2))
        self.kb[..., self.hi : self.hi + n, :] = key_states
        self.vb[..., self.hi : self.hi + n, :] = value_states
        self.hi += n
        self._view()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.kb is None or self.keys is not self._seen:
            return super().batch_select_indices(indices)
        self.kb, self.vb = self.kb[indices, :, self.lo :], self.vb[indices, :, self.lo :]
        self.lo, self.hi = 0, self.hi - self.lo
        self._view()

    def drop_front(self, k: int) -> None:
        """Forget the first ``k`` positions (padding in every row)."""
        self.lo += k
        self._view()


def _spare_cache(layers: list | None = None, spare: int = 0) -> DynamicCache:
    """A DynamicCache of :class:`_SpareLayer` (``layers`` given, or made on first use)."""
    past = DynamicCache()
    past.layer_class_to_replicate = lambda: _SpareLayer(spare)
    past.layers.extend(layers or [])
    return past


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
        if self.reuse_cache and self._cache and self._cache_weights != self._weights_key():
            self._cache = []  # made with other weights
        hits = [self._lookup(p) if self.reuse_cache else (None, 0) for p in prompts]
        self._cache = []  # entries are rebuilt from this call's rows (the old ones may be reused below)
        caches = [[(k[:, :n], v[:, :n]) for k, v in e.layers] if n else None for e, n in hits]
        past, input_ids, attn, pos = self._left_padded(caches, [p[n:] for p, (_, n) in zip(prompts, hits)], spare=sp.max_new_tokens)
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


@dataclass
class _Row:
    """One episode in a :class:`ContinuousScheduler`."""

    ids: list[int]  # its whole history: prompt, turns, observations, this turn's ids so far
    cached: int = 0  # leading ids whose keys/values are computed
    layers: list | None = None  # its own KV cache while it is out of the decode batch
    start: int = 0  # where this turn's generated ids begin
    max_new: int = 1
    logprobs: list[float] = field(default_factory=list)
    reason: str = ""  # why its turn ended ("" while decoding)


class ContinuousScheduler:
    """Continuous batching across turns for ``agents.rollout`` (see ``agents.policy.TurnScheduler``).

    The decode batch holds every episode whose turn is under way. When a row's turn ends (a
    stop string, EOS or its ``max_new_tokens``), ``advance`` returns it at once and cuts its KV
    cache out of the batch; the others keep their place. When the rollout submits the row's next
    turn (its history now ends with the observation), the new ids but the last are prefilled in
    one forward for all such rows, then the row rejoins the decode batch. So a decode step never
    waits for the longest row of a turn, and a new episode can take the place of a finished one.
    New episodes start from the keys/values of the prefix they share with the last ones (the
    prompt template, or the whole prompt for a question's G samples), computed once.

    Each row's history is exactly the ids submitted plus the ids sampled (never re-encoded); the
    log-probs are the raw next-token ones, as in ``generate``. With a seed the sampling is
    reproducible for the same submissions, but it draws from one generator for the whole batch,
    so sampled tokens differ from those of the lockstep schedule; greedy decoding gives the same
    tokens up to float rounding across batch shapes.
    """

    def __init__(self, policy: TransformersPolicy, sampling: SamplingParams, packed: bool = False):
        self.p, self.sp = policy, sampling
        self.packed = packed  # joiners are prefilled by packed_forward, riding along a decode step
        self.gen = None
        if sampling.seed is not None:
            self.gen = torch.Generator(device=policy.device).manual_seed(sampling.seed)
        self.max_stop = max((len(s) for s in sampling.stop), default=0)
        self.rows: dict[int, _Row] = {}
        self.batch: list[int] = []  # keys of the rows in the batched cache, in batch order
        self.past = self.attn = self.pos = None
        self.joining: set[int] = set()  # submitted rows not yet in the batch
        self.prefix: tuple[list[int], list] | None = None  # (ids, per-layer KV) shared by new episodes

    def submit(self, key: int, ids: Sequence[int], max_new_tokens: int, context: dict | None = None) -> None:
        ids = [int(x) for x in ids]
        row = self.rows.get(key)
        if row is not None and not row.reason and key in self.batch:
            raise RuntimeError(f"episode {key} is still generating its turn")
        if row is None or ids[: row.cached] != row.ids[: row.cached] or len(ids) <= row.cached:
            row = self.rows[key] = _Row(ids)  # new, or not an extension of what is cached: start over
        row.ids, row.start, row.max_new, row.logprobs, row.reason = ids, len(ids), max(1, int(max_new_tokens)), [], ""
        self.joining.add(key)

    def release(self, key: int) -> None:
        self.rows.pop(key, None)
        self.joining.discard(key)

    @torch.no_grad()
    def advance(self) -> list[tuple[int, Completion]]:
        if self.joining:
            done = self._join_packed() if self.packed else self._join()
            if done:
                return done
        if not self.batch:
            raise RuntimeError("advance() with no submitted episode")
        p = self.p
        while True:
            tok = torch.tensor([[self.rows[k].ids[-1]] for k in self.batch], device=p.device)
            self._widen()
            out = p.model(input_ids=tok, attention_mask=self.attn, position_ids=self.pos[:, None],
                          past_key_values=self.past, use_cache=True)
            self.past, self.pos = out.past_key_values, self.pos + 1
            ended = self._take(out.logits[:, -1, :], [self.rows[k] for k in self.batch])
            if ended:
                return self._leave(ended)

    def _widen(self) -> None:
        """One more column in the batch's attention mask, for the token the next step feeds."""
        self.attn = torch.cat([self.attn, torch.ones((len(self.batch), 1), dtype=self.attn.dtype, device=self.p.device)], 1)

    def _take(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Sample each row's next token from its logits row (all its ids were just fed); the
        indices of the rows whose turn that ended."""
        p = self.p
        nxt = p._sample(logits, self.sp, self.gen)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, nxt[:, None]).squeeze(-1)
        ended = []
        for i, (row, t, lp) in enumerate(zip(rows, nxt.tolist(), logp.tolist())):
            row.cached = len(row.ids)
            row.ids.append(t)
            row.logprobs.append(lp)
            row.reason = p._stopped(row.ids[row.start :], self.sp.stop, self.max_stop)
            if not row.reason and len(row.ids) - row.start >= row.max_new:
                row.reason = "length"
            if row.reason:
                ended.append(i)
        return ended

    def _leave(self, ended: list[int]) -> list[tuple[int, Completion]]:
        """Cut the rows at batch positions ``ended`` out of the decode batch; their completions."""
        p, done = self.p, []
        for b in ended:
            k = self.batch[b]
            row = self.rows[k]
            row.layers = p._row_layers(self.past, self.attn, b)  # everything but the last sampled id
            done.append((k, p._completion(row.ids[row.start :], row.logprobs, row.reason, self.sp.stop)))
        stay = [b for b in range(len(self.batch)) if b not in ended]
        if stay:  # DynamicCache with plain layers (checked by turn_scheduler)
            sel = torch.tensor(stay, device=p.device)
            self.past.batch_select_indices(sel)
            self.batch, self.attn, self.pos = [self.batch[b] for b in stay], self.attn[sel], self.pos[sel]
            pad = int(self.attn.any(0).int().argmax())  # leading columns that are padding in every row
            if pad:  # the batch cache is ours (_left_padded): _SpareLayer throughout
                for layer in self.past.layers:
                    layer.drop_front(pad)
                self.attn = self.attn[:, pad:]
        else:
            self.batch, self.past, self.attn, self.pos = [], None, None, None
        return done

    def _join(self) -> list:
        """Prefill the joining rows' new ids (all but the last, which the next decode step feeds),
        then add them to the decode batch."""
        p = self.p
        self._share_prefix([self.rows[k] for k in self.joining if self.rows[k].cached == 0])
        feed = [self.rows[k] for k in self.joining if len(self.rows[k].ids) - self.rows[k].cached > 1]
        for rows in _prefill_groups(feed):
            past, ids, attn, pos = p._left_padded([r.layers if r.cached else None for r in rows],
                                                  [r.ids[r.cached : -1] for r in rows])
            out = p._forward(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True)
            for b, r in enumerate(rows):
                r.layers = p._row_layers(out.past_key_values, attn, b)
                r.cached = len(r.ids) - 1
        self._grow(sorted(self.joining))
        self.joining = set()
        return []

    def _join_packed(self) -> list[tuple[int, Completion]]:
        """:meth:`_join` in one :func:`~agents.packed.packed_forward`: every joining row's new ids
        side by side, without padding, and the decode batch's next step in the same forward (one
        pass over the weights instead of two). Each joining row samples its first token there
        too. Returns the completions of the rows whose turn ended with that token."""
        fresh = [self.rows[k] for k in self.joining if self.rows[k].cached == 0]
        self._share_prefix(fresh, forward=len(fresh) > 1)
        keys, self.joining = sorted(self.joining), set()
        new = [self.rows[k] for k in keys]
        seqs = [Seq(r.ids[r.cached :], r.cached, r.layers if r.cached else None) for r in new]
        batch, B = None, len(self.batch)
        if B:
            self._widen()
            batch = Batch([self.rows[k].ids[-1] for k in self.batch], self.pos, self.past.layers, self.attn)
        logits = packed_forward(self.p.model, seqs, batch)  # the batch's rows, then each joiner's last id
        for r, q in zip(new, seqs):
            r.layers = q.layers
        if fresh and self.prefix is None:  # a lone first episode: later ones reuse its template
            self.prefix = (list(fresh[0].ids), fresh[0].layers)  # all its ids were just fed
        if B:
            self.pos = self.pos + 1
        ended = self._take(logits, [self.rows[k] for k in self.batch] + new)
        done = self._leave([i for i in ended if i < B]) if any(i < B for i in ended) else []
        stopped = {i - B for i in ended if i >= B}  # a turn of one token: the row does not join
        for i in sorted(stopped):
            r = new[i]
            done.append((keys[i], self.p._completion(r.ids[r.start :], r.logprobs, r.reason, self.sp.stop)))
        if len(stopped) < len(keys):
            self._grow([k for i, k in enumerate(keys) if i not in stopped])
        return done

    def _grow(self, keys: list[int]) -> None:
        """Add rows (each with its own cache in ``layers``) to the decode batch: one new batch cache,
        the rows already decoding copied in as they are (their padding included), the new rows
        left-padded to the same width, with room for the rest of every row's turn."""
        p = self.p
        new = [self.rows[k] for k in keys]
        spare = 1 + max(r.max_new - (len(r.ids) - r.start) for r in [self.rows[k] for k in self.batch] + new)
        base = None
        if self.batch:
            base = ([(layer.keys, layer.values) for layer in p._plain_layers(self.past)], self.attn)
        self.past, _, self.attn, _ = p._left_padded([r.layers if r.cached else None for r in new], [[] for _ in new],
                                                    spare, base)
        cached = torch.tensor([r.cached for r in new], device=p.device)
        self.pos = cached if self.pos is None else torch.cat([self.pos, cached])
        for r in new:
            r.layers = None
        self.batch = self.batch + keys

    def _share_prefix(self, new: list[_Row], forward: bool = True) -> None:
        """Start new episodes from the keys/values of what they share: the prompt template, or a
        whole prompt for the G samples of one question. With ``forward``, a shared part not kept
        yet is prefilled once first (the packed join skips that for a lone new episode: its
        prompt goes into the packed forward as a whole). The shared keys/values are kept for the
        next new episodes, which usually share the template too."""
        if not new:
            return
        shared = new[0].ids[:-1]
        for r in new[1:]:
            shared = shared[: _common(shared, r.ids[:-1])]
        base = _common(self.prefix[0], shared) if self.prefix is not None else 0
        if forward and len(shared) >= _MIN_SHARED and base < len(shared):
            p = self.p
            start = [(k[:, :base], v[:, :base]) for k, v in self.prefix[1]] if base else None
            past, ids, attn, pos = p._left_padded([start], [shared[base:]])
            out = p._forward(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True)
            self.prefix = (shared, p._row_layers(out.past_key_values, attn, 0))
            base = len(shared)
        if base >= _MIN_SHARED:
            layers = [(k[:, :base], v[:, :base]) for k, v in self.prefix[1]]
            for r in new:
                r.layers, r.cached = layers, base


_MIN_SHARED = 8  # shorter common prefixes are not worth a forward of their own
_FORWARD_COST = 16  # the fixed cost of one forward, in padded token slots (CPU, 0.5B model: ~0.17 s vs ~9 ms a slot)


def _prefill_groups(rows: list[_Row]) -> list[list[_Row]]:
    """Split the rows to prefill into forwards: one padded forward costs about
    ``_FORWARD_COST + rows * longest`` slots, so rows of very different lengths go into separate
    forwards rather than padding the short ones to the long one (exact minimum over the groups
    of consecutive rows by length)."""
    if len(rows) <= 1:
        return [rows] if rows else []
    rows = sorted(rows, key=lambda r: len(r.ids) - r.cached)
    n = [len(r.ids) - r.cached - 1 for r in rows]
    best, cut = [0.0] + [float("inf")] * len(rows), [0] * (len(rows) + 1)
    for i in range(1, len(rows) + 1):
        for j in range(i):  # rows j..i-1 in one forward, padded to n[i-1]
            c = best[j] + _FORWARD_COST + (i - j) * n[i - 1]
            if c < best[i]:
                best[i], cut[i] = c, j
    groups, i = [], len(rows)
    while i:
        groups.append(rows[cut[i] : i])
        i = cut[i]
    return groups[::-1]


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
