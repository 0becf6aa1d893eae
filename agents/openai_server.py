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

Requests that can share one batched ``generate`` call (same sampling settings, no seed) are
grouped by a micro-batcher (``--max-batch``, ``--batch-wait-ms``); one worker thread owns the
model, so requests never run the model concurrently. Malformed JSON or fields give 400 with
a message; an unexpected error gives 500 and the server goes on. No authentication: it binds
127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

from corpora.serve import SubprocessServer, free_port

log = logging.getLogger("agents.openai_server")

MAX_BODY_BYTES = 32 << 20
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 64


class BadRequest(ValueError):
    """A client error: the server answers 400 with this message."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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
        self.thread = threading.Thread(target=self._loop, daemon=True, name="model-worker")
        self.thread.start()

    # -- submitting ----------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], sampling) -> Any:
        fut: Future = Future()
        self.queue.put(GenJob(prompt_ids, sampling, fut))
        return fut.result()

    def score(self, ids: list[int], k: int) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """Log-prob of each token of ``ids`` given the ones before it (first: None), and the top
        ``k`` (id, log-prob) at each position (first: None; empty lists when k = 0)."""
        fut: Future = Future()
        self.queue.put(("score", ids, k, fut))
        return fut.result()

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
                        f.set_exception(exc)

    def _run_batch(self, batch: list[GenJob]) -> None:
        sp = replace(batch[0].sampling, max_new_tokens=max(j.sampling.max_new_tokens for j in batch))
        outs = self.policy.generate([j.prompt_ids for j in batch], sp)
        self.batches += 1
        self.requests += len(batch)
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
    """Turns request bodies into response bodies; no HTTP in here."""

    def __init__(self, worker: ModelWorker, model_name: str, tokenizer_name: str):
        self.worker, self.tok = worker, worker.tokenizer
        self.model_name, self.tokenizer_name = model_name, tokenizer_name
        self.vocab = max(len(self.tok), int(getattr(worker.model.config, "vocab_size", 0) or 0))  # padded rows count
        self.created = int(time.time())

    # -- shared field parsing ---------------------------------------------------------------------
    def _sampling(self, body: dict, max_tokens_default: int, allow_zero: bool):
        from agents.policy import SamplingParams

        max_tokens = _get(body, "max_tokens", int, max_tokens_default, check=lambda v: v >= 0, what="an integer >= 0")
        if "max_completion_tokens" in body:
            max_tokens = _get(body, "max_completion_tokens", int, check=lambda v: v >= 0, what="an integer >= 0")
        if max_tokens == 0 and not allow_zero:
            raise BadRequest("'max_tokens' must be >= 1 (0 is only allowed with echo)", "max_tokens")
        temperature = float(_get(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 100, what="a number >= 0"))
        top_p = float(_get(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, what="a number in (0, 1]"))
        top_k = _get(body, "top_k", int, 0, check=lambda v: v >= -1, what="an integer >= -1")
        seed = _get(body, "seed", int, None)
        stop = body.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= 16:
            stop = tuple(stop)
        else:
            raise BadRequest("'stop' must be a string or a list of at most 16 non-empty strings", "stop")
        if stop == ("",):
            raise BadRequest("'stop' strings must not be empty", "stop")
        n = _get(body, "n", int, 1)
        if n != 1:
            raise BadRequest("only n=1 is supported (send several requests)", "n")
        if body.get("stream"):
            raise BadRequest("streaming is not supported", "stream")
        sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=max(0, top_k), max_new_tokens=max(1, max_tokens),
                            stop=stop, seed=seed)
        return sp, max_tokens

    def _token_str(self, tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else self.tok.decode([tid], skip_special_tokens=False)

    def _check_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise BadRequest(f"token id {bad[0]} is out of range [0, {self.vocab})", param)

    # -- /v1/completions -------------------------------------------------------------------------
    def completions(self, body: dict) -> dict:
        prompt = body.get("prompt")
        if isinstance(prompt, str) or _is_ids(prompt) and prompt:
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (_is_ids(p) and p) for p in prompt):
            prompts = prompt
        else:
            raise BadRequest("'prompt' must be a string, a non-empty list of token ids, or a list of those", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise BadRequest(f"at most {MAX_PROMPTS} prompts per request", "prompt")
        echo = bool(_get(body, "echo", bool, False))
        as_ids = bool(_get(body, "return_tokens_as_token_ids", bool, False))
        keep_stop = bool(_get(body, "include_stop_str_in_output", bool, False))
        k = _get(body, "logprobs", int, None, check=lambda v: 0 <= v <= MAX_TOP_LOGPROBS, what=f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        sp, max_tokens = self._sampling(body, 16, allow_zero=echo)
        choices, n_prompt, n_completion = [], 0, 0
        for index, p in enumerate(prompts):
            ids = list(p) if isinstance(p, list) else list(self.tok(p, add_special_tokens=True)["input_ids"])
            self._check_ids(ids, "prompt")
            if not ids:
                raise BadRequest("the prompt is empty after tokenisation", "prompt")
            choice, n_gen = self._complete_one(index, ids, sp, max_tokens, echo, as_ids, keep_stop, k)
            choices.append(choice)
            n_prompt += len(ids)
            n_completion += n_gen
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion},
        }

    def _generate(self, ids: list[int], sp, max_tokens: int):
        """(token ids, sampling log-probs, finish_reason, stop_reason, text with the stop kept)."""
        if max_tokens == 0:
            return [], [], "length", None, ""
        c = self.worker.generate(ids, sp)
        if c.finish_reason == "stop":
            # TransformersPolicy cut the text right after the earliest stop string
            stop_reason = max((s for s in sp.stop if c.text.endswith(s)), key=len, default=None)
            return c.token_ids, c.logprobs, "stop", stop_reason, c.text
        return c.token_ids, c.logprobs, "stop" if c.finish_reason == "eos" else "length", None, c.text

    @staticmethod
    def _strip_stop(text: str, stop_reason, keep_stop: bool) -> str:
        if stop_reason and not keep_stop and text.endswith(stop_reason):
            return text[: -len(stop_reason)]
        return text

    def _complete_one(self, index, ids, sp, max_tokens, echo, as_ids, keep_stop, k):
        gen_ids, gen_lps, finish, stop_reason, gen_text = self._generate(ids, sp, max_tokens)
        text = self._strip_stop(gen_text, stop_reason, keep_stop)
        if echo:
            text = self.tok.decode(ids, skip_special_tokens=False) + text
        logprobs = None
        if k is not None:
            toks: list[int] = []
            lps: list[float | None] = []
            tops: list[list[tuple[int, float]] | None] = []
            if echo or k > 0:
                s_lps, s_tops = self.worker.score(ids + gen_ids, k)
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
    def chat(self, body: dict) -> dict:
        msgs = body.get("messages")
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), (str, type(None)))
            for m in msgs)
        if not ok:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects with string content", "messages")
        msgs = [{**m, "content": m.get("content") or ""} for m in msgs]
        want_lp = bool(_get(body, "logprobs", bool, False))
        k = _get(body, "top_logprobs", int, 0, check=lambda v: 0 <= v <= MAX_TOP_LOGPROBS, what=f"an integer in [0, {MAX_TOP_LOGPROBS}]")
        keep_stop = bool(_get(body, "include_stop_str_in_output", bool, False))
        cont = bool(_get(body, "continue_final_message", bool, False))
        add_gen = bool(_get(body, "add_generation_prompt", bool, not cont))
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BadRequest("'tools' must be a list", "tools")
        if cont and msgs[-1]["role"] != "assistant":
            raise BadRequest("continue_final_message needs a final assistant message", "continue_final_message")
        sp, max_tokens = self._sampling(body, 512, allow_zero=False)
        if not getattr(self.tok, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            out = self.tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=add_gen,
                                               continue_final_message=cont, tokenize=True)
        except Exception as exc:  # noqa: BLE001 - template errors are the client's messages
            raise BadRequest(f"chat template failed on these messages: {exc}", "messages") from None
        ids = [int(x) for x in (out["input_ids"] if hasattr(out, "keys") else out)]
        gen_ids, gen_lps, finish, stop_reason, gen_text = self._generate(ids, sp, max_tokens)
        text = self._strip_stop(gen_text, stop_reason, keep_stop)
        if finish == "stop" and stop_reason is None and gen_ids and gen_ids[-1] in self.worker.policy.eos_ids:
            text = self.tok.decode(gen_ids[:-1], skip_special_tokens=False)  # no end-of-turn token in the content
        logprobs = None
        if want_lp:
            tops = self.worker.score(ids + gen_ids, k)[1][len(ids):] if k else [[] for _ in gen_ids]
            content = []
            for t, lp, top in zip(gen_ids, gen_lps, tops):
                s = self.tok.decode([t], skip_special_tokens=False)
                content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                                "top_logprobs": [{"token": (u := self.tok.decode([i], skip_special_tokens=False)),
                                                  "logprob": v, "bytes": list(u.encode())} for i, v in top]})
            logprobs = {"content": content}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": finish, "stop_reason": stop_reason}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(gen_ids), "total_tokens": len(ids) + len(gen_ids)},
        }

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "webqa-gym", "tokenizer": self.tokenizer_name,
                                            "max_model_len": getattr(self.worker.model.config, "max_position_embeddings", None)}]}


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    server_version = "webqa-gym-openai/0.1"
    protocol_version = "HTTP/1.1"
    app: OpenAIApp  # set on the server class

    def log_message(self, fmt, *args):  # route access lines to logging at debug level
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send(200, {"status": "ok", "model": self.server.app.model_name})
        elif path in ("/v1/models", "/models"):
            self._send(200, self.server.app.models())
        else:
            self._error(404, f"no such endpoint: GET {self.path}")

    def do_POST(self):  # noqa: N802
        path = self.path.split("?")[0].rstrip("/")
        routes = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
        if path not in routes:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(min(length, MAX_BODY_BYTES))
            return self._error(404, f"no such endpoint: POST {self.path}")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._error(400, "bad Content-Length")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return self._error(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._error(400, f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return self._error(400, "request body must be a JSON object")
        try:
            out = getattr(self.server.app, routes[path])(body)
        except BadRequest as exc:
            return self._error(400, str(exc), exc.param)
        except Exception as exc:  # noqa: BLE001 - never take the server down
            log.exception("error serving %s", path)
            return self._error(500, f"internal error: {type(exc).__name__}: {exc}")
        self._send(200, out)


class OpenAIServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, app: OpenAIApp):
        self.app = app
        super().__init__(address, Handler)


# ---------------------------------------------------------------------------------------------
# Running it, and a subprocess helper for tests
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agents.openai_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", help="small|student|teacher|PATH|hub id|tiny-random[:VOCAB]")
    ap.add_argument("--served-model-name", default=None, help="the id /v1/models reports (default: --model)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--max-batch", type=int, default=8, help="generation requests batched together (1: one at a time)")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0, help="how long a batch waits for more requests")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
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
    worker = ModelWorker(model, tok, args.max_batch, args.batch_wait_ms)
    app = OpenAIApp(worker, args.served_model_name or args.model, tok_name)
    try:
        server = OpenAIServer((args.host, args.port), app)
    except OSError as exc:
        log.error("cannot bind %s:%d: %s", args.host, args.port, exc)
        return 3
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: this server has no authentication", args.host)

    def on_signal(signum, frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, port = server.server_address[:2]
    log.info("serving %s (tokenizer %s) on http://%s:%d/v1 (transformers backend, loaded in %.1f s)",
             app.model_name, tok_name, host, port, time.perf_counter() - t0)
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    worker.close()
    log.info("stopped after %d requests in %d batches", worker.requests, worker.batches)
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
