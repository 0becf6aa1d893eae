"""Instrumentation for :mod:`benchmarks.rollout_speed`: every model forward timed, and a policy
proxy that times the rollout's calls into the policy.

:class:`ForwardTimer` hooks a model's top-level forward and splits the time into prefill (input
length > 1: tokens fed, padded slots), decode steps (batch slots) and packed forwards (joining
rows' tokens plus the decode batch's step, no padding). :class:`TimedPolicy` wraps a policy (and
its turn scheduler, :class:`TimedScheduler`) to time ``generate``/``advance`` and ``encode``,
to note when the last episode starts (the queue empties and the drain begins), and to run
interleaved jobs between scheduler calls, off the rollout's clock.
"""
from __future__ import annotations

import time
from contextlib import contextmanager


class Counts:
    """What :class:`ForwardTimer` counts: forwards and their seconds, by kind."""

    def __init__(self):
        self.prefill_s = self.decode_s = self.packed_s = 0.0
        self.prefill_calls = self.decode_steps = 0
        self.prefill_slots = self.prefill_tokens = self.decode_slots = 0
        self.decode_ctx = []  # (kv length, seconds) per decode step
        self.packed_calls = self.packed_tokens = self.packed_batch_rows = 0


class ForwardTimer:
    """Times every top-level forward of a model, split into prefill and decode calls."""

    def __init__(self, model):
        import torch  # noqa: F401

        self.model = model
        self.cuda = model.device.type == "cuda"  # kernels run asynchronously: synchronise to time them whole
        self.reset()
        self._t = 0.0
        self._h = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]

    def reset(self):
        self.c = Counts()

    @contextmanager
    def counting(self, counts: Counts):
        """Count the forwards inside the block into ``counts`` instead (generate's batches run
        in between a rollout's steps)."""
        saved, self.c = self.c, counts
        try:
            yield
        finally:
            self.c = saved

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _pre(self, module, args, kwargs):
        self._sync()
        self._t = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        self._sync()
        dt = time.perf_counter() - self._t
        ids = kwargs.get("input_ids", args[0] if args else None)
        attn = kwargs.get("attention_mask")
        b, n = ids.shape
        c = self.c
        plan = kwargs.get("webqa_packed")
        if plan is not None:  # joining rows' new ids side by side, after the decode batch's tokens
            rows = 0 if plan.batch is None else len(plan.batch.ids)
            c.packed_s += dt
            c.packed_calls += 1
            c.packed_tokens += n
            c.packed_batch_rows += rows
            c.decode_slots += rows
        elif n > 1:
            c.prefill_s += dt
            c.prefill_calls += 1
            c.prefill_slots += b * n
            c.prefill_tokens += int(attn[:, -n:].sum()) if attn is not None else b * n  # new tokens only
        else:
            c.decode_s += dt
            c.decode_steps += 1
            c.decode_slots += b
            c.decode_ctx.append((int(attn.shape[1]) if attn is not None else -1, dt))

    def stats(self, c: Counts | None = None) -> dict:
        c = c or self.c
        ctx = c.decode_ctx
        return {
            "prefill_seconds": round(c.prefill_s, 3),
            "prefill_calls": c.prefill_calls,
            "prefill_tokens": c.prefill_tokens,
            "prefill_padded_slots": c.prefill_slots,
            "decode_seconds": round(c.decode_s, 3),
            "decode_steps": c.decode_steps,
            "decode_slots": c.decode_slots,
            "ms_per_decode_step": round(1000 * c.decode_s / max(c.decode_steps, 1), 2),
            "mean_decode_context": round(sum(n for n, _ in ctx) / max(len(ctx), 1), 1),
            "packed_seconds": round(c.packed_s, 3),
            "packed_calls": c.packed_calls,
            "packed_tokens": c.packed_tokens,  # fed: joining rows' ids + one per decode-batch row
            "packed_batch_rows": c.packed_batch_rows,
        }

    def close(self):
        for h in self._h:
            h.remove()


class TimedScheduler:
    def __init__(self, sched, owner):
        self.s, self.o = sched, owner
        self.started: set = set()

    def __getattr__(self, name):
        return getattr(self.s, name)

    def submit(self, key, ids, max_new_tokens, context=None):
        if key not in self.started:
            self.started.add(key)
            if len(self.started) == self.o.episodes and self.o.episodes > self.o.batch:
                # the last episode starts: the queue is empty and the drain begins. Sampled so
                # far: the turns returned, plus the ids of the turns under way in the batch.
                rows, batch = self.s.rows, set(self.s.batch)
                live = sum(len(r.ids) - r.start for k, r in rows.items() if k in batch)
                self.o.queue_empty = (self.o.elapsed(), sum(map(sum, self.o.completions)) + live)
        return self.s.submit(key, ids, max_new_tokens, context)

    def advance(self):
        t = time.perf_counter()
        out = self.s.advance()
        self.o.generate_s += time.perf_counter() - t
        self.o.generate_calls += 1
        self.o.completions.append([len(c.token_ids) for _, c in out])
        self.o.between()
        return out


class TimedPolicy:
    """A policy proxy that times ``generate`` (or its turn scheduler's ``advance``) and
    ``encode`` (observation tokenising)."""

    def __init__(self, policy, episodes: int = 0, batch: int = 0, interleave=None):
        self.p = policy
        self.episodes, self.batch = episodes, batch  # for the time the queue empties (TimedScheduler)
        self.t0, self.queue_empty = time.perf_counter(), None
        self.generate_s = self.encode_s = self.paused_s = 0.0
        self.generate_calls = 0
        self.completions = []
        self.due = list(interleave or [])  # (seconds, job): each job runs once the rollout's own time passes its seconds

    def __getattr__(self, name):
        return getattr(self.p, name)

    def elapsed(self) -> float:
        """Seconds since ``t0``, less the time spent in interleaved jobs."""
        return time.perf_counter() - self.t0 - self.paused_s

    def between(self) -> None:
        """Between two scheduler calls (or lockstep turns): run the interleaved jobs now due,
        off the rollout's clock."""
        while self.due and self.elapsed() >= self.due[0][0]:
            t = time.perf_counter()
            self.due.pop(0)[1]()
            self.paused_s += time.perf_counter() - t

    def generate(self, prompts, sampling, contexts=None):
        t = time.perf_counter()
        out = self.p.generate(prompts, sampling, contexts)
        self.generate_s += time.perf_counter() - t
        self.generate_calls += 1
        self.completions.append([len(c.token_ids) for c in out])
        self.between()
        return out

    def turn_scheduler(self, sampling):
        sched = self.p.turn_scheduler(sampling)
        return None if sched is None else TimedScheduler(sched, self)

    def encode(self, text):
        t = time.perf_counter()
        out = self.p.encode(text)
        self.encode_s += time.perf_counter() - t
        return out
