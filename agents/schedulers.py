"""Turn schedulers: how ``agents.rollout`` drives a policy, one episode turn at a time.

Both implement :class:`agents.policy.TurnScheduler`. :class:`Lockstep` serves any policy (one
batched ``generate`` per turn over every submitted episode); :class:`ContinuousScheduler` is the
transformers policy's (``TransformersPolicy.turn_scheduler``): an episode whose turn ends leaves
the decode batch and rejoins it, observation prefilled, while the others keep decoding.

torch is imported where it is used, so that importing this module (``agents.policy`` does, for
:class:`Lockstep`) stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # agents.policy re-exports Lockstep: importing it here would be a cycle
    import torch

    from agents.hf_policy import TransformersPolicy
    from agents.policy import Completion, Policy, SamplingParams


class Lockstep:
    """One batched ``policy.generate`` per ``advance`` for every submitted episode (the classic
    lockstep rollout: a turn lasts until its longest row stops). Turn ``t`` samples with seed
    ``sampling.seed + t``; ``max_new_tokens`` is the largest asked for (the rollout cuts each
    completion to its own budget)."""

    def __init__(self, policy: Policy, sampling: SamplingParams):
        self.policy, self.sampling, self.turn = policy, sampling, 0
        self.pending: dict[int, tuple[list[int], int, dict | None]] = {}

    def submit(self, key: int, ids: Sequence[int], max_new_tokens: int, context: dict | None = None) -> None:
        self.pending[key] = (list(ids), max_new_tokens, context)

    def release(self, key: int) -> None:
        self.pending.pop(key, None)

    def advance(self) -> list[tuple[int, Completion]]:
        if not self.pending:
            raise RuntimeError("advance() with no submitted episode")
        self.turn += 1
        keys = list(self.pending)
        rows = [self.pending.pop(k) for k in keys]
        changes: dict[str, Any] = {"max_new_tokens": max(m for _, m, _ in rows)}
        if self.sampling.seed is not None:
            changes["seed"] = self.sampling.seed + self.turn
        sp = replace(self.sampling, **changes)
        contexts = [c if c is not None else {} for _, _, c in rows]
        return list(zip(keys, self.policy.generate([ids for ids, _, _ in rows], sp, contexts)))


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
        import torch

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

    def advance(self) -> list[tuple[int, Completion]]:
        import torch

        with torch.no_grad():
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
        import torch

        self.attn = torch.cat([self.attn, torch.ones((len(self.batch), 1), dtype=self.attn.dtype, device=self.p.device)], 1)

    def _take(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """Sample each row's next token from its logits row (all its ids were just fed); the
        indices of the rows whose turn that ended."""
        import torch

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
        import torch

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
        from agents.packed import Batch, Seq, packed_forward

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
        import torch

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
