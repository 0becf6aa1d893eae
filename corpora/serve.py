"""A Search-R1-compatible BM25 retrieval server with a micro-batcher (standard library only).

    python -m corpora.serve --index DIR --host 127.0.0.1 --port 8000

``--index`` takes an index folder (BM25, dense or hybrid, by its ``meta.json`` ``kind``), a corpus
file or ``bundled`` (``corpora.retrievers``).

## API
``POST /retrieve`` with ``{"queries": [str, ...], "topk": k, "return_scores": bool}`` (``topk``
defaults to ``--topk``, ``return_scores`` to false, as in Search-R1's ``retrieval_server.py``)
answers ``{"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}`` with one list per
query, best first; with ``return_scores`` false each list holds the documents only.
``contents`` is ``'"Title"\\ntext'`` (``Passage.contents()``). ``GET /health`` answers the index
size, uptime, request counts by status, batch statistics and recent latencies.
``POST /page`` with ``{"title": str}`` (or ``GET /page?title=...``) answers
``{"title": canonical title, "text": full page text}`` from the index's page store
(``corpora.pages``: full pages where the index has them, else the title's passages), with the
same forgiving title lookup as the env's ``browse`` (URLs, underscores, case); an unknown title
is a 404 ``{"error", "suggestions": [titles of the best BM25 hits]}``.
``POST /passages`` with ``{"titles": [str, ...]}`` answers ``{"passages": {title: [{"id",
"contents"}, ...]}}``: every passage of each title in corpus order (an unknown title: ``[]``), so
``WebQAEnv.privileged()`` over HTTP gives an opsd teacher the same gold passages as in process.
Errors are JSON ``{"error": message}``: 400 for malformed JSON, wrong fields or a ``topk``,
query or query count over the limits; 413 for a body over ``--max-body-bytes`` or more results
than ``--max-results``; 411 without a ``Content-Length``; 408 for a request that did not arrive
in time; 404/405 for other paths and methods; 503 while shutting down or when every connection
slot is taken. A bad request never stops the server.

## Limits
Every request is bounded, so one client cannot take the server's memory or threads:

* JSON bodies go through :mod:`corpora.jsonguard` (size, nesting depth 16, integers of at most
  64 digits): deep nesting or a 5,000-digit ``topk`` is a 400, not a dropped connection.
* ``--max-body-bytes`` (1 MiB), ``--max-queries`` (256) per request, ``--max-query-chars``
  (4096) per query, ``--max-topk`` (100), and ``--max-results`` (4096) on ``queries x topk``: a
  response holds at most that many passages (a few MB), where 256 queries at ``topk`` 100 made
  20 MB.
* ``--max-connections`` (128) connections are served at once, each by its own thread; one more
  gets a 503 and is closed, so half-open connections cannot pile up threads.
* ``--idle-timeout`` (60 s) closes a keep-alive connection that sends nothing; ``--read-timeout``
  (30 s) is the deadline for a whole request (line, headers and body) from its first byte, so a
  client sending a byte every few seconds is cut off (408), and for writing the response;
  ``--request-timeout`` (60 s) bounds the wait for the index (503).
* Memory comes back after large requests: a handler that read or wrote 1 MB or more calls
  ``malloc_trim`` (:func:`common.httpserver.trim_memory`), and ``main`` pins glibc's mmap threshold
  (:func:`common.httpserver.tune_malloc`). ``python -m benchmarks.hostile`` measures RSS around each hostile case.

## Why the standard library
``http.server.ThreadingHTTPServer`` (a thread per connection, HTTP/1.1 keep-alive) needs no
dependency, and the cost that matters is the index call, not HTTP parsing: BM25 top-k over a
large index is memory-bound work done in numba, so it is done once per batch, not once per
request. An ASGI stack (FastAPI + uvicorn, as Search-R1 uses) would add two dependencies and
an event loop for no gain in that part.

## Micro-batching
Handler threads put their request on a queue and wait. One worker thread takes the first
waiting request, then everything else already waiting (and what arrives within
``--batch-wait-ms``), up to ``--max-batch`` queries and ``--max-results`` queries x topk (so a
batch never holds more hits than one largest request), makes one ``search(all queries, max topk)``
call, and hands each request its rows (cut to its own ``topk``; the ranking is total, score
then corpus position, so a top-k is a prefix of a top-K). Under load, requests pile up while a
batch runs, so batches grow by themselves. The default wait is 0 (take only what is already
waiting): on the bundled index a 1 ms wait added 1.2 ms to every lone request and no
throughput; on a large index, where one index call costs much more than HTTP, a few ms of
wait makes bigger batches that numba spreads over all cores.

## Operations
Binds to loopback by default (there is no authentication). Logs one summary line every
``--log-every`` seconds when there was traffic (requests, errors, queries, batches, mean batch,
p50/p99 latency) and each request at DEBUG. SIGTERM or SIGINT stops accepting, lets requests in
flight finish (up to ``--grace`` s), drains the batcher and exits 0.

## Modules
This file is the command line and :class:`ServerProcess` (the server in a subprocess, for tests
and benchmarks); the request protocol is ``corpora.serve_request``, the batcher
``corpora.serve_batcher``, the HTTP server and handler ``corpora.serve_http``, and what both
servers share (connection bounds, deadlines, JSON errors) ``common.httpserver``. The names
this module always had are importable from it still.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from common.httpserver import (BIG_BYTES, GuardedHandler, GuardedServer, add_connection_args, stop_on_signals, trim_memory,
                               tune_malloc, with_suppressed)
from corpora.serve_batcher import MicroBatcher
from corpora.serve_http import RetrievalHandler, RetrievalServer, Stats, percentile
from corpora.serve_request import JSON_DEPTH, Limits, RequestError, format_result, parse_request
from common.subprocess_server import SubprocessServer, free_port

__all__ = ["BIG_BYTES", "JSON_DEPTH", "GuardedHandler", "GuardedServer", "Limits", "MicroBatcher", "RequestError",
           "RetrievalHandler", "RetrievalServer", "ServerProcess", "Stats", "SubprocessServer", "format_result",
           "free_port", "load_retriever", "main", "parse_request", "trim_memory", "tune_malloc", "with_suppressed"]

log = logging.getLogger("corpora.serve")


def _summary_loop(server: RetrievalServer, every: float) -> None:
    last = time.monotonic()
    while not server.stopping.wait(every):
        _log_summary(server, time.monotonic() - last)
        last = time.monotonic()


def _log_summary(server: RetrievalServer, seconds: float, force: bool = False) -> None:
    lat, errors, queries = server.stats.take_window()
    if not lat and not errors and not force:
        return
    lat.sort()
    b = server.batcher.stats()
    log.info("%.0f s: %d ok requests (%.1f/s), %d errors, %d queries; totals: %d batches, %.2f queries/batch; "
             "latency p50 %.1f ms, p99 %.1f ms", seconds, len(lat), len(lat) / max(seconds, 1e-9), errors, queries,
             b["batches"], b["mean_queries_per_batch"], 1000 * percentile(lat, 50), 1000 * percentile(lat, 99))


def load_retriever(spec: str, backend: str = "bm25"):
    """An in-process retriever for ``spec`` (index folder, corpus file or ``bundled``)."""
    if spec.startswith(("http://", "https://")):
        raise ValueError("--index must be an index folder, a corpus file or 'bundled', not a URL")
    from corpora.retrievers import open_index, resolve_index_dir

    return open_index(resolve_index_dir(spec, backend), backend)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m corpora.serve", description=__doc__.split("\n\n")[0],
        epilog="Limits: every request is bounded by the --max-* flags (over one: 400, or 413 for size), JSON "
               f"bodies by corpora.jsonguard (nesting depth {JSON_DEPTH}, integers of at most 64 digits), each "
               "connection by --idle-timeout and --read-timeout (408, then closed), the connection count by "
               "--max-connections (503 beyond it), the wait for the index by --request-timeout (503).")
    ap.add_argument("--index", default="bundled", help="index folder, corpus file, or 'bundled'")
    ap.add_argument("--backend", default="bm25", choices=["bm25", "rank_bm25", "dense", "hybrid", "bm25s"],
                    help="BM25 backend (bm25s: the old name of bm25), or dense/hybrid to open a dense folder as that kind "
                         "(default: the folder's kind)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--topk", type=int, default=Limits.default_topk, help="topk when a request gives none (default %(default)s)")
    ap.add_argument("--max-topk", type=int, default=Limits.max_topk, help="largest topk a request may ask (default %(default)s)")
    ap.add_argument("--max-queries", type=int, default=Limits.max_queries, help="queries per request (default %(default)s; more: 413)")
    ap.add_argument("--max-query-chars", type=int, default=Limits.max_query_chars, help="characters per query or page title (default %(default)s)")
    ap.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, help="request body size (default %(default)s; more: 413)")
    ap.add_argument("--max-results", type=int, default=Limits.max_results,
                    help="queries x topk per request, which bounds the response size (default %(default)s; more: 413)")
    add_connection_args(ap, max_connections=128)
    ap.add_argument("--request-timeout", type=float, default=60.0,
                    help="seconds a request may wait for the index (default %(default)s; then 503)")
    ap.add_argument("--max-batch", type=int, default=512, help="queries per index call")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0, help="how long a batch waits for more requests (0: only those waiting)")
    ap.add_argument("--log-every", type=float, default=60.0, help="seconds between summary lines")
    ap.add_argument("--grace", type=float, default=10.0, help="seconds to finish requests on shutdown")
    ap.add_argument("--log-level", default="INFO")
    return ap


def _limits(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Limits:
    """The request limits the flags ask for; exits with a usage error on a flag out of range."""
    limits = Limits(args.max_queries, args.max_query_chars, args.max_body_bytes, args.max_topk, args.topk, args.max_results)
    if not 1 <= limits.default_topk <= limits.max_topk:
        ap.error("--topk must be between 1 and --max-topk")
    for flag in ("max_queries", "max_query_chars", "max_body_bytes", "max_results", "max_connections", "idle_timeout",
                 "read_timeout", "request_timeout"):
        if getattr(args, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be positive")
    return limits


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = _limits(ap, args)
    # Numba's OpenMP workers (started at the first kernel call) busy-wait by default; on a small
    # machine that made one query take 12 ms instead of 0.2 ms (2 cores) and starved the HTTP
    # threads. The setting must be in place before that first call.
    tune_malloc()
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    t0 = time.perf_counter()
    try:
        retriever = load_retriever(args.index, args.backend)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        log.error("%s", exc)
        return 2
    retriever.search(["warm up"], k=limits.default_topk)  # load numba kernels before the first client
    retriever.search(["warm up", "two queries"], k=limits.default_topk)
    index_name = str(getattr(retriever, "folder", args.index))
    try:
        server = RetrievalServer((args.host, args.port), retriever, limits, args.max_batch, args.batch_wait_ms,
                                 request_timeout=args.request_timeout, index_name=index_name,
                                 max_connections=args.max_connections, idle_timeout=args.idle_timeout,
                                 read_timeout=args.read_timeout)
    except OSError as exc:
        log.error("cannot bind %s:%d: %s", args.host, args.port, exc)
        return 3
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: this server has no authentication", args.host)
    stop_on_signals(server, log, "finishing")
    threading.Thread(target=_summary_loop, args=(server, args.log_every), daemon=True).start()
    host, port = server.server_address[:2]
    log.info("serving %s passages from %s on http://%s:%d (POST /retrieve, POST /page, POST /passages, GET /health); loaded in %.1f s",
             f"{len(retriever):,}", index_name, host, port, time.perf_counter() - t0)
    server.serve_forever(poll_interval=0.1)
    server.close_gracefully(args.grace)
    _log_summary(server, args.log_every)  # the last partial window, if it had traffic
    snap, b = server.stats.snapshot(), server.batcher.stats()
    log.info("stopped after %.0f s: %d requests %s, %d queries in %d batches", time.time() - server.started,
             snap["total"], snap["by_status"], snap["queries"], b["batches"])
    return 0


# -- for tests and benchmarks: the server in a subprocess on a free loopback port ----------------
class ServerProcess(SubprocessServer):
    """``python -m corpora.serve`` in a subprocess on a free loopback port; a context manager.

    ``url`` is ``http://127.0.0.1:PORT``; ``kill()`` sends SIGKILL, ``stop()`` SIGTERM and waits.
    The server's log goes to ``log_path`` (a temp file unless given).
    """

    module = "corpora.serve"

    def __init__(self, index: str | Path, extra_args: Sequence[str] = (), log_path: str | Path | None = None,
                 startup_timeout: float = 120.0, env: dict | None = None):
        self.index = str(index)
        super().__init__(["--index", self.index], extra_args, log_path, startup_timeout, env, log_prefix="corpora-serve-")

    @property
    def url(self) -> str:
        return self.base


if __name__ == "__main__":
    sys.exit(main())
