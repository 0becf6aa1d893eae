"""A small OpenAI-compatible HTTP server over a transformers model (CPU or GPU).

    python -m agents.openai_server --model small --port 8001          # SmolLM2-135M, loopback only
    python -m agents.openai_server --model teacher --threads 2        # Qwen2.5-Coder-1.5B
    python -m agents.openai_server --model tiny-random                # tests: seeded random model

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST
/v1/chat/completions``. Generation goes through :class:`agents.hf_policy.TransformersPolicy`,
so the ids and log-probs a client gets are those the in-process policy would produce.

What a client can ask for, beyond plain OpenAI:

* ``prompt`` as a string, a list of token ids, or a list of either (one choice per prompt).
* ``logprobs: k`` - OpenAI legacy ``{tokens, token_logprobs, top_logprobs, text_offset}``.
  ``token_logprobs`` are the raw (temperature 1) log-probs recorded while sampling, as vLLM
  reports them. ``top_logprobs`` come from one extra forward pass over prompt + completion
  (``k = 0`` skips it and lists only the sampled token).
* ``echo: true`` (``max_tokens: 0`` allowed) - the prompt tokens come back too, with log-probs
  from one forward pass over the prompt ids (``log_softmax`` then gather; the first is null).
  This is how a remote teacher scores a student's tokens.
* ``return_tokens_as_token_ids: true`` - tokens are ``"token_id:123"`` strings, as in vLLM.
* ``include_stop_str_in_output`` (vLLM): the text keeps the stop string (default: cut before
  it). The token list always holds every generated token, the one that completed the stop
  included; ``stop_reason`` names the stop string (null at EOS or length), as in vLLM.
* ``top_k`` (vLLM), ``seed``.
* ``n`` (at most ``--max-n``): several choices per prompt; with a ``seed``, choice ``j`` uses
  ``seed + j``.

Requests that can share one batched ``generate`` call (same sampling settings, no seed) are
grouped by a micro-batcher (``--max-batch``, ``--batch-wait-ms``); one worker thread owns the
model, so requests never run the model concurrently. Malformed JSON or fields give 400 with
a message; an unexpected error gives 500 and the server goes on. No authentication: it binds
127.0.0.1 unless told otherwise.

Limits (each a flag; a request over one gets 400, or 413 for the body, naming the flag):
``--max-body-bytes`` (8 MiB), ``--max-prompt-chars`` (text is refused before it is tokenised:
a 20 MB prompt used to take the tokenizer out of memory), ``--max-prompt-tokens`` (default the
model's context) and prompt + ``max_tokens`` within the context (``--max-model-len``),
``--max-new-tokens`` (the largest ``max_tokens``), ``--max-prompts``, ``--max-n``, ``--max-stop``
and ``--max-logprobs``; ``temperature`` is 0 or in [0.01, 100] (smaller ones overflow the
logits), ``top_p`` in (0, 1], ``seed`` a 64-bit signed integer. JSON bodies go through
:mod:`corpora.jsonguard`. A request is cancelled between two decode steps
(``TransformersPolicy.generate(should_stop=...)``) when its client closes the connection, when
it passes ``--request-timeout`` (503) or when the server stops; one still queued never runs.
Connections are bounded as in ``corpora.serve`` (``--max-connections``, ``--idle-timeout``,
``--read-timeout``: 503, or 408 and a close); a wrong method on a known path is a 405.
SIGTERM or SIGINT stops accepting, cancels what is running (those requests get 503), and exits
0 within ``--grace`` seconds.
"""
from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from corpora.jsonguard import JSONGuardError
from corpora.jsonguard import loads as guarded_loads
from corpora.serve import GuardedHandler, GuardedServer, SubprocessServer, free_port

log = logging.getLogger("agents.openai_server")

JSON_DEPTH = 32  # nesting allowed in a request body (chat tools carry JSON schemas)
MIN_TEMPERATURE = 0.01  # below it (but above 0, greedy) logits / temperature overflow: vLLM clamps there too
MAX_TEMPERATURE = 100.0
MAX_STOP_CHARS = 1000
INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass
class ServerLimits:
    """What one request may ask for (each is a command-line flag)."""

    max_body_bytes: int = 8 << 20
    max_prompt_chars: int | None = None  # default: 32 x max_prompt_tokens
    max_prompt_tokens: int | None = None  # default: the model's context
    max_model_len: int | None = None  # default: config.max_position_embeddings
    max_new_tokens: int = 4096
    max_prompts: int = 64
    max_n: int = 8
    max_stop: int = 16
    max_logprobs: int = 20
    request_timeout: float = 600.0

    def resolved(self, model) -> "ServerLimits":
        """These limits with the defaults that depend on the model filled in."""
        ctx = self.max_model_len or int(getattr(model.config, "max_position_embeddings", 0) or 0) or 8192
        tokens = min(self.max_prompt_tokens or ctx, ctx)
        return replace(self, max_model_len=ctx, max_prompt_tokens=tokens, max_prompt_chars=self.max_prompt_chars or 32 * tokens)


class BadRequest(ValueError):
    """A client error: the server answers 400 (or ``status``) with this message."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class Cancelled(Exception):
    """A request stopped before its answer: the client went away (``status`` 0: nothing to send),
    its deadline passed or the server is stopping (503)."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


@dataclass
class Waiter:
    """How a request waits for the model worker: it polls, and on ``gone()`` (the client closed
    its connection), past ``deadline`` (``time.monotonic()``) or once ``stopping`` is set it
    cancels the job and raises :class:`Cancelled`. The default waits as long as it takes."""

    deadline: float | None = None
    timeout: float | None = None  # for the message
    gone: Callable[[], bool] = lambda: False
    stopping: threading.Event | None = None

    def check(self) -> None:
        if self.gone():
            raise Cancelled("the client closed the connection", status=0)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Cancelled(f"the request took longer than its deadline of {self.timeout:g} s (--request-timeout)")
        if self.stopping is not None and self.stopping.is_set():
            raise Cancelled("the server is shutting down")

    def wait(self, fut: Future, cancel: threading.Event | None = None):
        while True:
            try:
                return fut.result(timeout=0.05)
            except FutureTimeout:
                pass
            try:
                self.check()
            except Cancelled:
                if cancel is not None:
                    cancel.set()  # a running job stops at its next decode step
                fut.cancel()  # a queued one never runs
                raise


# ---------------------------------------------------------------------------------------------
# The model side
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Requests -> responses
# ---------------------------------------------------------------------------------------------


def _get(body: dict, name: str, types, default=None, *, check=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRequest(f"'{name}' must be {what or types}, got {value!r}", name)
    if not isinstance(value, types):
        raise BadRequest(f"'{name}' must be {what or getattr(types, '__name__', types)}, got {type(value).__name__}", name)
    if check is not None and not check(value):
        raise BadRequest(f"'{name}' must be {what}, got {value!r}", name)
    return value


def _is_ids(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class OpenAIApp:
    """Turns request bodies into response bodies; no HTTP in here (the handler passes a
    :class:`Waiter` that knows about its connection)."""

    def __init__(self, worker: ModelWorker, model_name: str, tokenizer_name: str, limits: ServerLimits | None = None):
        self.worker, self.tok = worker, worker.tokenizer
        self.model_name, self.tokenizer_name = model_name, tokenizer_name
        self.vocab = max(len(self.tok), int(getattr(worker.model.config, "vocab_size", 0) or 0))  # padded rows count
        self.limits = (limits or ServerLimits()).resolved(worker.model)
        self.created = int(time.time())

    # -- shared field parsing ---------------------------------------------------------------------
    def _sampling(self, body: dict, allow_zero: bool):
        """(SamplingParams with a placeholder budget, the explicit max_tokens or None, n)."""
        from agents.policy import SamplingParams

        lim = self.limits
        max_tokens = _get(body, "max_tokens", int, None, check=lambda v: v >= 0, what="an integer >= 0")
        if "max_completion_tokens" in body:
            max_tokens = _get(body, "max_completion_tokens", int, check=lambda v: v >= 0, what="an integer >= 0")
        if max_tokens == 0 and not allow_zero:
            raise BadRequest("'max_tokens' must be >= 1 (0 is only allowed with echo)", "max_tokens")
        if max_tokens is not None and max_tokens > lim.max_new_tokens:
            raise BadRequest(f"'max_tokens' {max_tokens} is over this server's limit of {lim.max_new_tokens} "
                             "(--max-new-tokens)", "max_tokens")
        temperature = float(_get(body, "temperature", (int, float), 1.0,
                                 check=lambda v: v == 0 or MIN_TEMPERATURE <= v <= MAX_TEMPERATURE,
                                 what=f"0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}]"))
        top_p = float(_get(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, what="a number in (0, 1]"))
        top_k = _get(body, "top_k", int, 0, check=lambda v: -1 <= v <= INT64[1], what="an integer >= -1")
        seed = _get(body, "seed", int, None, check=lambda v: INT64[0] <= v <= INT64[1] - lim.max_n,
                    what=f"a 64-bit signed integer (at most {INT64[1] - lim.max_n})")
        stop = body.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= lim.max_stop:
            stop = tuple(stop)
        else:
            raise BadRequest(f"'stop' must be a string or a list of at most {lim.max_stop} non-empty strings "
                             "(--max-stop)", "stop")
        if stop == ("",):
            raise BadRequest("'stop' strings must not be empty", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise BadRequest(f"'stop' strings must be at most {MAX_STOP_CHARS} characters", "stop")
        n = _get(body, "n", int, 1, check=lambda v: 1 <= v <= lim.max_n, what=f"an integer in [1, {lim.max_n}] (--max-n)")
        if body.get("stream"):
            raise BadRequest("streaming is not supported", "stream")
        sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=max(0, top_k), max_new_tokens=1,
                            stop=stop, seed=seed)
        return sp, max_tokens, n

    def _budget(self, n_prompt: int, max_tokens: int | None, default: int) -> int:
        """The generation budget of a prompt of ``n_prompt`` tokens: ``max_tokens``, or the default
        cut to what the context leaves; 400 when the prompt or the sum is over a limit."""
        lim = self.limits
        if n_prompt > lim.max_prompt_tokens:
            raise BadRequest(f"the prompt has {n_prompt} tokens, over this server's limit of {lim.max_prompt_tokens} "
                             "(--max-prompt-tokens)", "prompt")
        room = lim.max_model_len - n_prompt
        if max_tokens is None:
            if room < 1:
                raise BadRequest(f"the prompt has {n_prompt} tokens and leaves no room for a completion in the model's "
                                 f"context of {lim.max_model_len} tokens (--max-model-len)", "prompt")
            return min(default, room, lim.max_new_tokens)
        if max_tokens > room:
            raise BadRequest(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) is over the model's context "
                             f"of {lim.max_model_len} tokens (--max-model-len)", "max_tokens")
        return max_tokens

    def _check_text(self, chars: int, param: str) -> None:
        """Refuse text that cannot fit before tokenising it (tokenising 20 MB exhausted memory)."""
        if chars > self.limits.max_prompt_chars:
            raise BadRequest(f"the prompt has {chars} characters, over this server's limit of {self.limits.max_prompt_chars} "
                             "(--max-prompt-chars)", param)

    def _token_str(self, tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else self.tok.decode([tid], skip_special_tokens=False)

    def _check_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise BadRequest(f"token id {bad[0]} is out of range [0, {self.vocab})", param)

    # -- /v1/completions -------------------------------------------------------------------------
    def completions(self, body: dict, waiter: Waiter | None = None) -> dict:
        waiter = waiter or Waiter()
        lim = self.limits
        prompt = body.get("prompt")
        if isinstance(prompt, str) or _is_ids(prompt) and prompt:
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (_is_ids(p) and p) for p in prompt):
            prompts = prompt
        else:
            raise BadRequest("'prompt' must be a string, a non-empty list of token ids, or a list of those", "prompt")
        if len(prompts) > lim.max_prompts:
            raise BadRequest(f"{len(prompts)} prompts are over this server's limit of {lim.max_prompts} per request "
                             "(--max-prompts)", "prompt")
        echo = bool(_get(body, "echo", bool, False))
        as_ids = bool(_get(body, "return_tokens_as_token_ids", bool, False))
        keep_stop = bool(_get(body, "include_stop_str_in_output", bool, False))
        k = _get(body, "logprobs", int, None, check=lambda v: 0 <= v <= lim.max_logprobs,
                 what=f"an integer in [0, {lim.max_logprobs}] (--max-logprobs)")
        sp, max_tokens, n = self._sampling(body, allow_zero=echo)
        tokenised = []
        for p in prompts:  # every prompt checked before any runs
            if isinstance(p, str):
                self._check_text(len(p), "prompt")
                ids = list(self.tok(p, add_special_tokens=True)["input_ids"])
            else:
                ids = p
            if not ids:
                raise BadRequest("the prompt is empty after tokenisation", "prompt")
            budget = self._budget(len(ids), max_tokens, 16)
            self._check_ids(ids, "prompt")
            tokenised.append((list(ids), budget))
        choices, n_prompt, n_completion = [], 0, 0
        for index, (ids, budget) in enumerate(tokenised):
            for j, gen in enumerate(self._generate(ids, sp, budget, n, waiter)):
                choice, n_gen = self._complete_one(index * n + j, ids, gen, echo, as_ids, keep_stop, k, waiter)
                choices.append(choice)
                n_completion += n_gen
            n_prompt += len(ids)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion},
        }

    def _generate(self, ids: list[int], sp, max_tokens: int, n: int, waiter: Waiter) -> list[tuple]:
        """``n`` samples, each (token ids, sampling log-probs, finish_reason, stop_reason, text with
        the stop kept). The jobs are queued together (the worker batches them) and all cancelled
        when the request stops."""
        if max_tokens == 0:
            return [([], [], "length", None, "")] * n
        sp = replace(sp, max_new_tokens=max_tokens)
        jobs = [self.worker.submit(ids, sp if sp.seed is None or not j else replace(sp, seed=sp.seed + j)) for j in range(n)]
        out = []
        try:
            for job in jobs:
                c = waiter.wait(job.future, job.cancel)
                if c.finish_reason == "stop":
                    # TransformersPolicy cut the text right after the earliest stop string
                    stop_reason = max((s for s in sp.stop if c.text.endswith(s)), key=len, default=None)
                    out.append((c.token_ids, c.logprobs, "stop", stop_reason, c.text))
                else:
                    out.append((c.token_ids, c.logprobs, "stop" if c.finish_reason == "eos" else "length", None, c.text))
        except BaseException:
            for job in jobs:
                job.cancel.set()
                job.future.cancel()
            raise
        return out

    @staticmethod
    def _strip_stop(text: str, stop_reason, keep_stop: bool) -> str:
        if stop_reason and not keep_stop and text.endswith(stop_reason):
            return text[: -len(stop_reason)]
        return text

    def _complete_one(self, index, ids, gen, echo, as_ids, keep_stop, k, waiter: Waiter):
        gen_ids, gen_lps, finish, stop_reason, gen_text = gen
        text = self._strip_stop(gen_text, stop_reason, keep_stop)
        if echo:
            text = self.tok.decode(ids, skip_special_tokens=False) + text
        logprobs = None
        if k is not None:
            toks: list[int] = []
            lps: list[float | None] = []
            tops: list[list[tuple[int, float]] | None] = []
            if echo or k > 0:
                s_lps, s_tops = self.worker.score(ids + gen_ids, k, waiter)
            if echo:
                toks += ids
                lps += s_lps[: len(ids)]
                tops += s_tops[: len(ids)] if k else [None] + [[(t, lp)] for t, lp in zip(ids[1:], s_lps[1 : len(ids)])]
            toks += gen_ids
            lps += gen_lps
            if k:
                tops += s_tops[len(ids):]
            else:
                tops += [[(t, lp)] for t, lp in zip(gen_ids, gen_lps)]
            pieces = [self.tok.decode([t], skip_special_tokens=False) for t in toks]
            strs = [f"token_id:{t}" for t in toks] if as_ids else pieces
            offsets, pos = [], 0
            for piece in pieces:  # offsets into the returned text, by per-token decoded lengths (as vLLM does)
                offsets.append(pos)
                pos += len(piece)
            top_dicts = [None if top is None else {self._token_str(i, as_ids): v for i, v in top} for top in tops]
            logprobs = {"tokens": strs, "token_logprobs": lps, "top_logprobs": top_dicts, "text_offset": offsets}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
                "stop_reason": stop_reason}, len(gen_ids)

    # -- /v1/chat/completions ---------------------------------------------------------------------
    def chat(self, body: dict, waiter: Waiter | None = None) -> dict:
        waiter = waiter or Waiter()
        lim = self.limits
        msgs = body.get("messages")
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), (str, type(None)))
            for m in msgs)
        if not ok:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects with string content", "messages")
        msgs = [{**m, "content": m.get("content") or ""} for m in msgs]
        want_lp = bool(_get(body, "logprobs", bool, False))
        k = _get(body, "top_logprobs", int, 0, check=lambda v: 0 <= v <= lim.max_logprobs,
                 what=f"an integer in [0, {lim.max_logprobs}] (--max-logprobs)")
        keep_stop = bool(_get(body, "include_stop_str_in_output", bool, False))
        cont = bool(_get(body, "continue_final_message", bool, False))
        add_gen = bool(_get(body, "add_generation_prompt", bool, not cont))
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BadRequest("'tools' must be a list", "tools")
        if cont and msgs[-1]["role"] != "assistant":
            raise BadRequest("continue_final_message needs a final assistant message", "continue_final_message")
        sp, max_tokens, n = self._sampling(body, allow_zero=False)
        if not getattr(self.tok, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template; use /v1/completions", "messages")
        self._check_text(sum(len(m["content"]) + len(m["role"]) for m in msgs) + (len(repr(tools)) if tools else 0), "messages")
        try:
            out = self.tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=add_gen,
                                               continue_final_message=cont, tokenize=True)
        except Exception as exc:  # noqa: BLE001 - template errors are the client's messages
            raise BadRequest(f"chat template failed on these messages: {exc}", "messages") from None
        ids = [int(x) for x in (out["input_ids"] if hasattr(out, "keys") else out)]
        budget = self._budget(len(ids), max_tokens, 512)
        choices, n_completion = [], 0
        for index, (gen_ids, gen_lps, finish, stop_reason, gen_text) in enumerate(self._generate(ids, sp, budget, n, waiter)):
            text = self._strip_stop(gen_text, stop_reason, keep_stop)
            if finish == "stop" and stop_reason is None and gen_ids and gen_ids[-1] in self.worker.policy.eos_ids:
                text = self.tok.decode(gen_ids[:-1], skip_special_tokens=False)  # no end-of-turn token in the content
            logprobs = None
            if want_lp:
                tops = self.worker.score(ids + gen_ids, k, waiter)[1][len(ids):] if k else [[] for _ in gen_ids]
                content = []
                for t, lp, top in zip(gen_ids, gen_lps, tops):
                    s = self.tok.decode([t], skip_special_tokens=False)
                    content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                                    "top_logprobs": [{"token": (u := self.tok.decode([i], skip_special_tokens=False)),
                                                      "logprob": v, "bytes": list(u.encode())} for i, v in top]})
                logprobs = {"content": content}
            choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                            "finish_reason": finish, "stop_reason": stop_reason})
            n_completion += len(gen_ids)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n_completion, "total_tokens": len(ids) + n_completion},
        }

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "webqa-gym", "tokenizer": self.tokenizer_name,
                                            "max_model_len": self.limits.max_model_len}]}


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


class Handler(GuardedHandler):
    server_version = "webqa-gym-openai/0.1"
    routes = {"/health": ("GET",), "/v1/models": ("GET",), "/models": ("GET",),
              "/v1/completions": ("POST",), "/v1/chat/completions": ("POST",)}
    apps = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}  # POST path -> OpenAIApp method
    server: "OpenAIServer"

    @staticmethod
    def error_payload(status: int, message: str, param: str | None = None) -> dict:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": status}}

    def log_message(self, fmt, *args):  # route access lines to logging at debug level
        log.debug("%s " + fmt, self.address_string(), *args)

    def _error(self, status: int, message: str, param: str | None = None, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_json(status, self.error_payload(status, message, param), headers)

    def do_GET(self):  # noqa: N802
        path = self.route("GET")
        if path == "/health":
            self.send_json(200, self.server.health())
        elif path in ("/v1/models", "/models"):
            self.send_json(200, self.server.app.models())

    def do_POST(self):  # noqa: N802
        self.server.track(+1)  # in flight until its answer is written: SIGTERM waits for it
        try:
            self._post()
        finally:
            self.server.track(-1)

    def _post(self) -> None:
        srv = self.server
        path = self.route("POST")
        if path is None:
            return srv.count(self.status_sent)
        raw = self.read_body(srv.app.limits.max_body_bytes)
        if isinstance(raw, int):
            return srv.count(raw)
        try:
            body = guarded_loads(raw, max_bytes=srv.app.limits.max_body_bytes, max_depth=JSON_DEPTH)
        except JSONGuardError as exc:
            return self._fail(400, f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return self._fail(400, "request body must be a JSON object")
        if srv.stopping.is_set():
            self.close_connection = True
            return self._fail(503, "the server is shutting down")
        timeout = srv.app.limits.request_timeout
        waiter = Waiter(deadline=time.monotonic() + timeout, timeout=timeout, gone=self.client_gone, stopping=srv.stopping)
        try:
            out = getattr(srv.app, self.apps[path])(body, waiter)
        except BadRequest as exc:
            return self._fail(exc.status, str(exc), exc.param)
        except Cancelled as exc:
            if not exc.status:  # the client is gone: nothing to answer
                self.close_connection = True
                log.info("%s %s: cancelled, the client closed the connection", self.command, path)
                return srv.count(499)
            self.close_connection = srv.stopping.is_set()
            return self._fail(exc.status, str(exc))
        except Exception as exc:  # noqa: BLE001 - never take the server down
            log.exception("error serving %s", path)
            return self._fail(500, f"internal error: {type(exc).__name__}: {exc}")
        srv.count(200)
        self.send_json(200, out)

    def _fail(self, status: int, message: str, param: str | None = None) -> None:
        self.server.count(status)
        self._error(status, message, param)


class OpenAIServer(GuardedServer):
    def __init__(self, address, app: OpenAIApp, max_connections: int = 64, idle_timeout: float = 60.0,
                 read_timeout: float = 30.0):
        self.app = app
        self.stopping = threading.Event()
        self.by_status: dict[int, int] = {}
        self._inflight = 0
        self._lock = threading.Lock()
        super().__init__(address, Handler, max_connections=max_connections, idle_timeout=idle_timeout,
                         read_timeout=read_timeout)

    def track(self, delta: int) -> None:
        with self._lock:
            self._inflight += delta

    @property
    def inflight(self) -> int:
        return self._inflight

    def count(self, status: int) -> None:
        with self._lock:
            self.by_status[status] = self.by_status.get(status, 0) + 1

    def health(self) -> dict:
        w = self.app.worker
        return {"status": "stopping" if self.stopping.is_set() else "ok", "model": self.app.model_name, "pid": os.getpid(),
                "requests": {"by_status": {str(k): v for k, v in sorted(self.by_status.items())}, "in_flight": self.inflight},
                "jobs": {"batches": w.batches, "requests": w.requests, "cancelled": w.cancelled, "queued": w.queue.qsize()},
                "connections": {"open": self.open_connections, "max": self.max_connections, "refused": self.refused,
                                "idle_timeout_s": self.idle_timeout, "read_timeout_s": self.read_timeout},
                "limits": asdict(self.app.limits)}


# ---------------------------------------------------------------------------------------------
# Running it, and a subprocess helper for tests
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    d = ServerLimits()
    ap = argparse.ArgumentParser(
        prog="python -m agents.openai_server", description=__doc__.split("\n\n")[0],
        epilog="Limits: a request over a --max-* limit gets 400 (413 for the body) naming the flag; JSON bodies are "
               f"checked by corpora.jsonguard (nesting depth {JSON_DEPTH}, integers of at most 64 digits); a request "
               "is cancelled between decode steps when its client disconnects or it passes --request-timeout (503).")
    ap.add_argument("--model", default="small", help="small|student|teacher|PATH|hub id|tiny-random[:VOCAB]")
    ap.add_argument("--served-model-name", default=None, help="the id /v1/models reports (default: --model)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--max-batch", type=int, default=8, help="generation requests batched together (1: one at a time)")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0, help="how long a batch waits for more requests")
    ap.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body size (default %(default)s; more: 413)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="context length: prompt + max_tokens must fit (default: the model's max_position_embeddings)")
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="tokens in one prompt (default: the context)")
    ap.add_argument("--max-prompt-chars", type=int, default=None,
                    help="characters of a text prompt or of all chat messages, checked before tokenising "
                         "(default: 32 x --max-prompt-tokens)")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="the largest max_tokens (default %(default)s)")
    ap.add_argument("--max-prompts", type=int, default=d.max_prompts, help="prompts in one request (default %(default)s)")
    ap.add_argument("--max-n", type=int, default=d.max_n, help="choices per prompt, n (default %(default)s)")
    ap.add_argument("--max-stop", type=int, default=d.max_stop, help="stop strings per request (default %(default)s)")
    ap.add_argument("--max-logprobs", type=int, default=d.max_logprobs, help="logprobs / top_logprobs (default %(default)s)")
    ap.add_argument("--request-timeout", type=float, default=d.request_timeout,
                    help="seconds a request may run before it is cancelled with a 503 (default %(default)s)")
    ap.add_argument("--max-connections", type=int, default=64,
                    help="connections served at once, a thread each (default %(default)s; more get 503 and are closed)")
    ap.add_argument("--idle-timeout", type=float, default=60.0,
                    help="seconds a keep-alive connection may wait without sending a request (default %(default)s)")
    ap.add_argument("--read-timeout", type=float, default=30.0,
                    help="seconds to receive a whole request from its first byte, and to send the response "
                         "(default %(default)s; a slower client gets 408 and is closed)")
    ap.add_argument("--grace", type=float, default=10.0, help="seconds to finish up on SIGTERM (default %(default)s)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    for flag in ("max_body_bytes", "max_model_len", "max_prompt_tokens", "max_prompt_chars", "max_new_tokens", "max_prompts",
                 "max_n", "max_stop", "request_timeout", "max_connections", "idle_timeout", "read_timeout"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be positive")
    if args.max_logprobs < 0:
        ap.error("--max-logprobs must be >= 0")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        model, tok, tok_name = load_backend(args.model, args.dtype, args.device)
    except Exception as exc:  # noqa: BLE001 - a clear line instead of a traceback for a bad --model
        log.error("cannot load model %r: %s", args.model, exc)
        return 2
    limits = ServerLimits(args.max_body_bytes, args.max_prompt_chars, args.max_prompt_tokens, args.max_model_len,
                          args.max_new_tokens, args.max_prompts, args.max_n, args.max_stop, args.max_logprobs,
                          args.request_timeout)
    worker = ModelWorker(model, tok, args.max_batch, args.batch_wait_ms)
    app = OpenAIApp(worker, args.served_model_name or args.model, tok_name, limits)
    try:
        server = OpenAIServer((args.host, args.port), app, args.max_connections, args.idle_timeout, args.read_timeout)
    except OSError as exc:
        log.error("cannot bind %s:%d: %s", args.host, args.port, exc)
        return 3
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: this server has no authentication", args.host)

    def on_signal(signum, frame):
        if not server.stopping.is_set():
            log.info("%s: stopping (cancelling %d requests in flight)", signal.Signals(signum).name, server.inflight)
            server.stopping.set()  # waiting requests cancel their jobs and answer 503
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.server_address[:2]
    lim = app.limits
    log.info("serving %s (tokenizer %s) on http://%s:%d/v1 (transformers backend, loaded in %.1f s); context %d, "
             "max_tokens <= %d, body <= %d bytes, %d connections", app.model_name, tok_name, host, port,
             time.perf_counter() - t0, lim.max_model_len, lim.max_new_tokens, lim.max_body_bytes, args.max_connections)
    server.serve_forever(poll_interval=0.1)
    deadline = time.monotonic() + args.grace
    while server.inflight and time.monotonic() < deadline:
        time.sleep(0.02)
    server.server_close()
    worker.close()
    worker.thread.join(max(0.1, deadline - time.monotonic()))
    log.info("stopped after %d requests in %d batches (%d cancelled)", worker.requests, worker.batches, worker.cancelled)
    return 0


class ModelServerProcess(SubprocessServer):
    """``python -m agents.openai_server`` in a subprocess on a free loopback port; a context manager.

    ``url`` is ``http://127.0.0.1:PORT/v1``; ``kill()`` sends SIGKILL, ``stop()`` SIGTERM and
    waits. Same pattern as :class:`corpora.serve.ServerProcess`.
    """

    def __init__(self, model: str = "tiny-random", extra_args: Sequence[str] = (), log_path: str | Path | None = None,
                 startup_timeout: float = 120.0, env: dict | None = None, port: int | None = None):
        import tempfile

        self.model, self.extra_args = model, list(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="openai-server-", suffix=".log")[1])
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port = port or 0
        self._fixed_port = port is not None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base + "/v1"

    def start(self, wait: bool = True) -> "ModelServerProcess":

        for _attempt in range(3):  # a free port can be taken between the probe and the bind
            if not self._fixed_port:
                self.port = free_port()
            env = dict(os.environ if self.env is None else self.env)
            root = str(Path(__file__).resolve().parents[1])  # the child imports this very package
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            cmd = [sys.executable, "-m", "agents.openai_server", "--model", self.model, "--host", "127.0.0.1",
                   "--port", str(self.port), *self.extra_args]
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
            if not wait:
                return self
            if self.wait_ready():
                return self
            if self.proc.returncode != 3 or self._fixed_port:  # 3: could not bind, try another port
                break
        raise RuntimeError(f"model server exited with {self.proc.returncode}; log: {self.log_text()[-2000:]}")

    def wait_ready(self) -> bool:
        """True once /health answers; False if the process exited; TimeoutError after the timeout."""
        import urllib.request

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=1) as r:
                    if r.status == 200:
                        return True
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"model server did not answer /health within {self.startup_timeout} s; log: {self.log_text()[-2000:]}")


if __name__ == "__main__":
    raise SystemExit(main())
