"""The model side of ``agents.openai_server``: :func:`load_backend` (``--model`` -> model and
tokenizer) and :class:`ModelWorker`, the one thread that runs every forward pass, batching
generation requests that share their sampling settings."""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field, replace
from typing import Any

from agents.openai_request import Waiter


def load_backend(model: str, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer, tokenizer_name)`` for ``--model``.

    ``tiny-random`` (or ``tiny-random:VOCAB`` with VOCAB ``bytes``/``small``/...) is the seeded
    :func:`agents.models.tiny_random_model` used by tests; anything else goes to
    :func:`agents.models.load_model` (embedded name, folder or hub id).
    """
    from agents.models import load_model, tiny_random_model

    if model == "tiny-random" or model.startswith("tiny-random:"):
        vocab = model.partition(":")[2] or "bytes"
        m, tok = tiny_random_model(vocab, seed=0)
        return m, tok, vocab
    m, tok = load_model(model, dtype=dtype, device=device)
    return m, tok, model


@dataclass
class GenJob:
    prompt_ids: list[int]
    sampling: Any  # agents.policy.SamplingParams
    future: Future
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self):
        sp = self.sampling
        if sp.seed is not None:  # a seeded request gets its own generator, so it runs alone
            return ("seeded", id(self))
        return (sp.temperature, sp.top_p, sp.top_k, sp.stop)


class ModelWorker:
    """Owns the model: one thread runs every forward pass; generation requests with the same
    sampling settings that are waiting together run as one batch."""

    def __init__(self, model, tokenizer, max_batch: int = 8, batch_wait_ms: float = 0.0):
        from agents.hf_policy import TransformersPolicy

        self.policy = TransformersPolicy(model, tokenizer)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait = max(1, max_batch), batch_wait_ms / 1000.0
        self.queue: queue.Queue = queue.Queue()
        self.batches = 0
        self.requests = 0
        self.cancelled = 0  # generation jobs stopped (running) or dropped (queued) for their client
        self.thread = threading.Thread(target=self._loop, daemon=True, name="model-worker")
        self.thread.start()

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], sampling) -> GenJob:
        """Queue a generation; ``job.future`` gets the Completion. ``job.cancel.set()`` stops it
        at its next decode step, ``job.future.cancel()`` drops it while it is still queued."""
        job = GenJob(prompt_ids, sampling, Future())
        self.queue.put(job)
        return job

    def generate(self, prompt_ids: list[int], sampling, waiter: Waiter | None = None) -> Any:
        job = self.submit(prompt_ids, sampling)
        return (waiter or Waiter()).wait(job.future, job.cancel)

    def score(self, ids: list[int], k: int, waiter: Waiter | None = None) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """Log-prob of each token of ``ids`` given the ones before it (first: None), and the top
        ``k`` (id, log-prob) at each position (first: None; empty lists when k = 0)."""
        fut: Future = Future()
        self.queue.put(("score", ids, k, fut))
        return (waiter or Waiter()).wait(fut)

    # -- the worker ----------------------------------------------------------------------------
    def _loop(self) -> None:
        pending: list = []
        while True:
            job = pending.pop(0) if pending else self.queue.get()
            if job is None:
                return
            try:
                if isinstance(job, tuple):
                    _, ids, k, fut = job
                    if fut.set_running_or_notify_cancel():
                        fut.set_result(self._score(ids, k))
                    continue
                batch = [job]
                deadline = time.monotonic() + self.batch_wait
                while len(batch) < self.max_batch:
                    try:
                        nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic())) if self.batch_wait else self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(nxt, GenJob) and nxt.key == job.key:
                        batch.append(nxt)
                    else:
                        pending.append(nxt)
                        if nxt is None:
                            break
                self._run_batch(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                futs = [job[3]] if isinstance(job, tuple) else [j.future for j in batch]
                for f in futs:
                    if not f.done():
                        try:
                            f.set_exception(exc)
                        except Exception:  # noqa: BLE001 - a future cancelled meanwhile
                            pass

    def _run_batch(self, batch: list[GenJob]) -> None:
        runnable = [j for j in batch if j.future.set_running_or_notify_cancel()]
        self.cancelled += len(batch) - len(runnable)
        batch = []
        for j in runnable:
            if j.cancel.is_set():  # cancelled between the queue and here
                j.future.set_exception(CancelledError())
                self.cancelled += 1
            else:
                batch.append(j)
        if not batch:
            return
        sp = replace(batch[0].sampling, max_new_tokens=max(j.sampling.max_new_tokens for j in batch))

        def should_stop(n: int) -> bool:  # every job cancelled, or past its own budget
            return all(j.cancel.is_set() or n >= j.sampling.max_new_tokens for j in batch)

        outs = self.policy.generate([j.prompt_ids for j in batch], sp, should_stop=should_stop)
        self.batches += 1
        self.requests += len(batch)
        self.cancelled += sum(j.cancel.is_set() for j in batch)
        for j, c in zip(batch, outs):
            n = j.sampling.max_new_tokens
            if len(c.token_ids) > n:  # ran longer for a batch-mate: cut back to this request's budget
                from agents.policy import Completion

                c = Completion(c.token_ids[:n], c.logprobs[:n], self.policy.decode(c.token_ids[:n]), "length")
            j.future.set_result(c)

    def _score(self, ids: list[int], k: int):
        import torch

        if not ids:
            return [], []
        with torch.no_grad():
            x = torch.tensor([ids], device=self.policy.device)
            logits = self.model(input_ids=x).logits[0]
            lps: list[float | None] = [None]
            tops: list[list[tuple[int, float]] | None] = [None]
            for s in range(0, len(ids) - 1, 512):  # log_softmax a slice at a time: [T, vocab] float32 is large
                lp = torch.log_softmax(logits[s : min(s + 512, len(ids) - 1)].float(), -1)
                tgt = x[0, s + 1 : s + 1 + lp.shape[0]]
                lps += lp.gather(-1, tgt[:, None]).squeeze(-1).tolist()
                if k:
                    v, i = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
                    tops += [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
                else:
                    tops += [[] for _ in range(lp.shape[0])]
        return lps, tops

    def close(self) -> None:
        self.queue.put(None)
