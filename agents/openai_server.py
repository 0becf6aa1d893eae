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

Modules: this file is the HTTP handler and server, the command line and
:class:`ModelServerProcess`; the caps and the request's wait are ``agents.openai_request``, the
model worker ``agents.openai_worker``, request -> response ``agents.openai_app``, and the
connection handling both servers share ``common.httpserver``. The names this module always
had are importable from it still.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from agents.openai_app import OpenAIApp
from agents.openai_request import (INT64, JSON_DEPTH, MAX_STOP_CHARS, MAX_TEMPERATURE, MIN_TEMPERATURE, BadRequest,
                                   Cancelled, ServerLimits, Waiter)
from agents.openai_worker import GenJob, ModelWorker, load_backend
from common.httpserver import GuardedHandler, GuardedServer, add_connection_args, stop_on_signals
from corpora.jsonguard import JSONGuardError
from corpora.jsonguard import loads as guarded_loads
from common.subprocess_server import SubprocessServer, free_port

__all__ = ["INT64", "JSON_DEPTH", "MAX_STOP_CHARS", "MAX_TEMPERATURE", "MIN_TEMPERATURE", "BadRequest", "Cancelled",
           "GenJob", "Handler", "ModelServerProcess", "ModelWorker", "OpenAIApp", "OpenAIServer", "ServerLimits", "Waiter",
           "free_port", "load_backend", "main"]

log = logging.getLogger("agents.openai_server")


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
        self.by_status: dict[int, int] = {}
        self._lock = threading.Lock()
        super().__init__(address, Handler, max_connections=max_connections, idle_timeout=idle_timeout,
                         read_timeout=read_timeout)

    def count(self, status: int) -> None:
        with self._lock:
            self.by_status[status] = self.by_status.get(status, 0) + 1

    def health(self) -> dict:
        w = self.app.worker
        return {"status": "stopping" if self.stopping.is_set() else "ok", "model": self.app.model_name, "pid": os.getpid(),
                "requests": {"by_status": {str(k): v for k, v in sorted(self.by_status.items())}, "in_flight": self.inflight},
                "jobs": {"batches": w.batches, "requests": w.requests, "cancelled": w.cancelled, "queued": w.queue.qsize()},
                "connections": self.connection_stats(),
                "limits": asdict(self.app.limits)}


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
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
    add_connection_args(ap, max_connections=64)
    ap.add_argument("--grace", type=float, default=10.0, help="seconds to finish up on SIGTERM (default %(default)s)")
    ap.add_argument("--log-level", default="INFO")
    return ap


def _limits(ap: argparse.ArgumentParser, args: argparse.Namespace) -> ServerLimits:
    """The request limits the flags ask for; exits with a usage error on a flag out of range."""
    for flag in ("max_body_bytes", "max_model_len", "max_prompt_tokens", "max_prompt_chars", "max_new_tokens", "max_prompts",
                 "max_n", "max_stop", "request_timeout", "max_connections", "idle_timeout", "read_timeout"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be positive")
    if args.max_logprobs < 0:
        ap.error("--max-logprobs must be >= 0")
    return ServerLimits(args.max_body_bytes, args.max_prompt_chars, args.max_prompt_tokens, args.max_model_len,
                        args.max_new_tokens, args.max_prompts, args.max_n, args.max_stop, args.max_logprobs,
                        args.request_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    limits = _limits(ap, args)
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
    app = OpenAIApp(worker, args.served_model_name or args.model, tok_name, limits)
    try:
        server = OpenAIServer((args.host, args.port), app, args.max_connections, args.idle_timeout, args.read_timeout)
    except OSError as exc:
        log.error("cannot bind %s:%d: %s", args.host, args.port, exc)
        return 3
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: this server has no authentication", args.host)
    stop_on_signals(server, log, "cancelling")  # waiting requests cancel their jobs and answer 503
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


# -- for tests and benchmarks: the server in a subprocess on a free loopback port ----------------
class ModelServerProcess(SubprocessServer):
    """``python -m agents.openai_server`` in a subprocess on a free loopback port (or ``port``); a
    context manager.

    ``url`` is ``http://127.0.0.1:PORT/v1``; ``kill()`` sends SIGKILL, ``stop()`` SIGTERM and
    waits; ``start(wait=False)`` returns at once and ``wait_ready()`` waits later. Same pattern as
    :class:`corpora.serve.ServerProcess`.
    """

    module = "agents.openai_server"
    what = "model server"

    def __init__(self, model: str = "tiny-random", extra_args: Sequence[str] = (), log_path: str | Path | None = None,
                 startup_timeout: float = 120.0, env: dict | None = None, port: int | None = None):
        self.model = model
        super().__init__(["--model", model], extra_args, log_path, startup_timeout, env, port, log_prefix="openai-server-")

    @property
    def url(self) -> str:
        return self.base + "/v1"


if __name__ == "__main__":
    raise SystemExit(main())
