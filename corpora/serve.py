"""A Search-R1-compatible BM25 retrieval server with a micro-batcher (standard library only).

    python -m corpora.serve --index DIR --host 127.0.0.1 --port 8000

``--index`` takes an index folder, a corpus file or ``bundled`` (``corpora.retrievers``).

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
  ``malloc_trim`` (:func:`trim_memory`), and ``main`` pins glibc's mmap threshold
  (:func:`tune_malloc`). ``python -m benchmarks.hostile`` measures RSS around each hostile case.

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
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from queue import Empty, Queue
from typing import Callable, Sequence

from corpora.jsonguard import JSONGuardError
from corpora.jsonguard import loads as guarded_loads

log = logging.getLogger("corpora.serve")


@dataclass
class Limits:
    max_queries: int = 256  # queries in one request
    max_query_chars: int = 4096  # characters in one query
    max_body_bytes: int = 1 << 20  # request body
    max_topk: int = 100
    default_topk: int = 3
    max_results: int = 4096  # queries x topk in one request: bounds the response (a few MB)


JSON_DEPTH = 16  # nesting allowed in a request body (a valid one needs 2)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_request(body: bytes, limits: Limits) -> tuple[list[str], int, bool]:
    """A /retrieve body -> (queries, topk, return_scores), or RequestError(400, why)."""
    try:
        req = guarded_loads(body, max_bytes=limits.max_body_bytes, max_depth=JSON_DEPTH)
    except JSONGuardError as exc:
        raise RequestError(400 if len(body) <= limits.max_body_bytes else 413, str(exc)) from None
    if not isinstance(req, dict):
        raise RequestError(400, 'request must be a JSON object {"queries": [...], "topk": k, "return_scores": bool}')
    unknown = sorted(set(req) - {"queries", "topk", "return_scores"})
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; expected queries, topk, return_scores")
    queries = req.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise RequestError(400, "'queries' must be a list of strings")
    if len(queries) > limits.max_queries:
        raise RequestError(413, f"too many queries: {len(queries)} > {limits.max_queries} per request; split the batch")
    for i, q in enumerate(queries):
        if len(q) > limits.max_query_chars:
            raise RequestError(400, f"query {i} has {len(q)} characters, over the limit of {limits.max_query_chars}")
    topk = req.get("topk")
    if topk is None:
        topk = limits.default_topk
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise RequestError(400, f"'topk' must be an integer, got {type(topk).__name__}")
    if not 1 <= topk <= limits.max_topk:
        raise RequestError(400, f"'topk' must be between 1 and {limits.max_topk}, got {topk}")
    if len(queries) * topk > limits.max_results:
        raise RequestError(413, f"{len(queries)} queries x topk {topk} = {len(queries) * topk} results is over the limit "
                                f"of {limits.max_results} per request (--max-results); split the batch or lower topk")
    scores = req.get("return_scores", False)
    if not isinstance(scores, bool):
        raise RequestError(400, f"'return_scores' must be true or false, got {type(scores).__name__}")
    return queries, topk, scores


def format_result(rows, return_scores: bool) -> dict:
    """Hits -> Search-R1's response body."""
    out = []
    for hits in rows:
        docs = [{"id": h.doc_id, "contents": f'"{h.title}"\n{h.text}'} for h in hits]
        out.append([{"document": d, "score": h.score} for d, h in zip(docs, hits)] if return_scores else docs)
    return {"result": out}



# -- micro-batcher -----------------------------------------------------------------------------
class _Job:
    __slots__ = ("queries", "k", "future")

    def __init__(self, queries: list[str], k: int):
        self.queries, self.k, self.future = queries, k, Future()


class MicroBatcher:
    """Coalesce concurrent ``submit`` calls into single ``search(queries, k)`` calls (one thread)."""

    _STOP = object()

    def __init__(self, search: Callable[[Sequence[str], int], list], max_batch: int = 512, max_wait_ms: float = 0.0,
                 max_results: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.search, self.max_batch, self.max_wait = search, max_batch, max_wait_ms / 1000.0
        self.max_results = max_results  # queries x k in one batch (None: no cap): bounds the hits held at once
        self._queue: Queue = Queue()
        self._carry: _Job | None = None
        self._closed = False
        self._lock = threading.Lock()
        self.batches = 0
        self.batched_queries = 0
        self.batched_requests = 0
        self.max_seen = 0
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, queries: list[str], k: int, timeout: float | None = None) -> list:
        """Rows of hits for ``queries`` (blocks until the batch with them has run)."""
        if not queries:
            return []
        job = _Job(queries, k)
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.put(job)
        return job.future.result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(self._STOP)
        self._thread.join(timeout)

    def _next_batch(self) -> tuple[list[_Job], bool]:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is self._STOP:
            return [], True
        batch, n, k = [first], len(first.queries), first.k
        deadline = time.monotonic() + self.max_wait
        while n < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = self._queue.get(timeout=left)
                except Empty:
                    break
            if job is self._STOP:
                return batch, True
            too_many = self.max_results is not None and (n + len(job.queries)) * max(k, job.k) > self.max_results
            if n + len(job.queries) > self.max_batch or too_many:
                self._carry = job  # first in the next batch
                break
            batch.append(job)
            n, k = n + len(job.queries), max(k, job.k)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop or self._carry is not None:
            if stop:  # a carried job after the stop marker: run it alone
                batch, self._carry = [self._carry], None
            else:
                batch, stop = self._next_batch()
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except Exception:
                # One bad request must not fail its batch-mates: run them one by one.
                for job in batch:
                    if not job.future.done():
                        try:
                            self._run_batch([job])
                        except Exception as exc:
                            job.future.set_exception(exc)
            batch = job = None  # do not hold the last batch's rows (MBs of passages) while waiting

    def _run_batch(self, batch: list[_Job]) -> None:
        queries = [q for job in batch for q in job.queries]
        rows = self.search(queries, max(job.k for job in batch))
        if len(rows) != len(queries):
            raise RuntimeError(f"search returned {len(rows)} rows for {len(queries)} queries")
        self.batches += 1
        self.batched_queries += len(queries)
        self.batched_requests += len(batch)
        self.max_seen = max(self.max_seen, len(queries))
        i = 0
        for job in batch:
            job.future.set_result([row[: job.k] for row in rows[i : i + len(job.queries)]])
            i += len(job.queries)

    def stats(self) -> dict:
        b = max(self.batches, 1)
        return {"batches": self.batches, "queries": self.batched_queries, "requests": self.batched_requests,
                "mean_queries_per_batch": round(self.batched_queries / b, 2),
                "mean_requests_per_batch": round(self.batched_requests / b, 2), "max_queries_in_batch": self.max_seen,
                "max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1000.0}


# -- statistics --------------------------------------------------------------------------------
def _percentile(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return 0.0
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


class Stats:
    """Thread-safe request counters and a bounded window of recent latencies."""

    def __init__(self, window: int = 10_000):
        self._lock = threading.Lock()
        self.by_status: Counter = Counter()
        self.queries = 0
        self.latencies: deque = deque(maxlen=window)
        self._since_summary: list[float] = []
        self._errors_since = 0
        self._queries_since = 0

    def record(self, status: int, n_queries: int, seconds: float) -> None:
        with self._lock:
            self.by_status[status] += 1
            if status == 200:
                self.queries += n_queries
                self._queries_since += n_queries
                self.latencies.append(seconds)
                if len(self._since_summary) < 100_000:
                    self._since_summary.append(seconds)
            else:
                self._errors_since += 1

    def snapshot(self) -> dict:
        with self._lock:
            lat = sorted(self.latencies)
            return {"total": sum(self.by_status.values()), "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                    "queries": self.queries,
                    "latency_ms_recent": {"n": len(lat), "p50": round(1000 * _percentile(lat, 50), 3),
                                          "p99": round(1000 * _percentile(lat, 99), 3)}}

    def take_window(self) -> tuple[list[float], int, int]:
        with self._lock:
            lat, errs, q = self._since_summary, self._errors_since, self._queries_since
            self._since_summary, self._errors_since, self._queries_since = [], 0, 0
            return lat, errs, q


# -- HTTP hardening shared by both servers (this one and agents.openai_server) ---------------------
class _DeadlineReader(io.RawIOBase):
    """A connection's read side under its handler's deadline: each ``recv`` waits at most until
    ``handler.read_deadline``, so a client that sends a byte every few seconds cannot stretch one
    request past it. The first byte of a request moves the deadline from the idle wait to
    ``--read-timeout`` after that byte."""

    def __init__(self, sock: socket.socket, handler: "GuardedHandler"):
        super().__init__()
        self.sock, self.handler = sock, handler

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        h = self.handler
        left = h.read_deadline - time.monotonic()
        if left <= 0:
            h.timed_out = True
            raise TimeoutError("the read deadline passed")
        self.sock.settimeout(left)
        try:
            n = self.sock.recv_into(buf)
        except TimeoutError:
            h.timed_out = True
            raise
        if n and not h.request_started:
            h.request_started = True
            h.read_deadline = time.monotonic() + h.server.read_timeout
        return n


class GuardedServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` that bounds what a connection can hold: at most
    ``max_connections`` at once (one thread each; one more gets a 503 and is closed),
    ``idle_timeout`` seconds without a request, ``read_timeout`` seconds to send a whole request
    from its first byte or to take a response. Handlers derive from :class:`GuardedHandler`."""

    daemon_threads = True
    block_on_close = False  # shutdown does not wait for idle keep-alive connections
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address, handler, *, max_connections: int = 128, idle_timeout: float = 60.0,
                 read_timeout: float = 30.0):
        if max_connections < 1 or idle_timeout <= 0 or read_timeout <= 0:
            raise ValueError("max_connections, idle_timeout and read_timeout must be positive")
        self.max_connections, self.idle_timeout, self.read_timeout = max_connections, idle_timeout, read_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open = 0
        self._open_lock = threading.Lock()
        self.refused = 0
        super().__init__(address, handler)

    @property
    def open_connections(self) -> int:
        return self._open

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self._refuse(request)
            return
        with self._open_lock:
            self._open += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        with self._open_lock:
            self._open -= 1
        self._slots.release()

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _refuse(self, request) -> None:
        """Answer 503 and close, from the accepting thread (no thread is started for it)."""
        message = f"all {self.max_connections} connection slots are in use (--max-connections); retry later"
        body = json.dumps(self.RequestHandlerClass.error_payload(503, message)).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(0.2)
            request.sendall(head + body)
            request.setblocking(False)
            request.recv(1 << 16)  # what the client already sent: closing with unread data would reset
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # a client went away: not our error
            log.debug("connection from %s ended: %r", client_address, exc)
        else:
            log.exception("error while handling a request from %s", client_address)


class GuardedHandler(BaseHTTPRequestHandler):
    """Request handling under :class:`GuardedServer`'s deadlines, with JSON errors, 405 for a
    known path with the wrong method (``routes``: path -> methods) and a strict body reader."""

    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections
    disable_nagle_algorithm = True  # headers and body are two writes: do not hold the second back
    routes: dict[str, tuple[str, ...]] = {}
    server: GuardedServer

    @staticmethod
    def error_payload(status: int, message: str) -> dict:
        return {"error": message, "status": status}

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self), 1 << 16)

    def handle_one_request(self) -> None:
        self.read_deadline = time.monotonic() + self.server.idle_timeout
        self.request_started = self.timed_out = self.big = False
        self.status_sent = 0
        super().handle_one_request()  # closes the connection on a TimeoutError
        if self.big:
            trim_memory()
        if self.timed_out and self.request_started and not self.status_sent:
            self.close_connection = True
            for name, value in (("request_version", "HTTP/1.1"), ("requestline", ""), ("command", "")):
                if not getattr(self, name, ""):
                    setattr(self, name, value)
            with_suppressed(lambda: self._error(408, f"the request did not arrive within {self.server.read_timeout:g} s "
                                                     "of its first byte (--read-timeout)"))

    def log_message(self, fmt: str, *args) -> None:  # route http.server's own lines to logging
        log.debug("%s %s", self.address_string(), fmt % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (414, 431, a malformed request line, 501) as JSON too."""
        self.close_connection = True
        self._error(code, message or self.responses.get(code, ("error",))[0])

    def send_json(self, status: int, obj: dict, headers: Sequence[tuple[str, str]] = ()) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.connection.settimeout(self.server.read_timeout)  # a client that does not read its answer is cut off
        self.status_sent = status
        self.big = self.big or len(body) >= BIG_BYTES
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_json(status, self.error_payload(status, message), headers)

    def route(self, method: str) -> str | None:
        """The path when ``routes`` serves it with ``method``; else None after a 404 or 405."""
        path = self.path.split("?", 1)[0]
        if path != "/":
            path = path.rstrip("/")
        methods = self.routes.get(path)
        if methods is not None and method in methods:
            return path
        if method != "GET":
            self.close_connection = True  # its body is not read
        if methods is None:
            where = ", ".join(f"{' or '.join(m)} {p}" for p, m in self.routes.items())
            self._error(404, f"no route {method} {path[:200]!r}; use {where}")
        else:
            self._error(405, f"{method} is not allowed on {path}; use {' or '.join(methods)}",
                        headers=[("Allow", ", ".join(methods))])
        return None

    def do_PUT(self) -> None:  # noqa: N802 - only ever an error here
        self.route(self.command)

    do_DELETE = do_PATCH = do_PUT

    def read_body(self, max_bytes: int) -> bytes | int:
        """The request body (exactly ``Content-Length`` bytes, at most ``max_bytes``), or the
        status of the error already sent (411, 400, 413, 408)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._error(411, "chunked bodies are not supported: send Content-Length")
            return 411
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            self._error(411, "a Content-Length header is required")
            return 411
        if not re.fullmatch(r"\s*\d{1,18}\s*", raw):
            self.close_connection = True
            self._error(400, f"Content-Length {raw[:40]!r} is not a non-negative integer")
            return 400
        length = int(raw)
        self.big = length >= BIG_BYTES
        if length > max_bytes:
            self.close_connection = True
            self._error(413, f"request body of {length} bytes is over the limit of {max_bytes} (--max-body-bytes)")
            # Then read and discard what the client sends (until the read deadline), so that closing
            # does not reset the connection before the client has read the 413.
            left = length if length <= 1 << 28 else 0
            try:
                while left > 0:
                    chunk = self.rfile.read1(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            except OSError:  # TimeoutError included
                pass
            return 413
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            self._error(408, f"the request body did not arrive within {self.server.read_timeout:g} s (--read-timeout)")
            return 408
        if len(body) < length:
            self.close_connection = True
            return 400  # the client went away mid-body
        return body

    def client_gone(self) -> bool:
        """True when the client closed its side of the connection (checked while it waits)."""
        try:
            poller = select.poll()  # not select(): no limit on the descriptor's number
            poller.register(self.connection, select.POLLIN)
            return bool(poller.poll(0)) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or already closed
            return True


def trim_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere). Without it
    the memory of a large answer or a refused large body stays resident after it is freed, in the
    handler thread's malloc arena, and RSS creeps up with every such request."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
BIG_BYTES = 1 << 20  # a request or answer this large is followed by trim_memory()


def tune_malloc(mmap_threshold: int = 128 << 10) -> None:
    """Serve blocks of ``mmap_threshold`` bytes or more from their own mappings, returned to the OS
    on free (glibc ``mallopt(M_MMAP_THRESHOLD)``; a no-op elsewhere). glibc raises that threshold
    by itself after the first large free, after which large answers built by several handler
    threads at once stay resident in their arenas (one per thread, up to 8 per core): 8 clients
    fetching 4,096-passage answers took the retrieval server from 200 to 280 MB. Also caps the
    arenas at two. Process-wide, so only the server's ``main`` calls it."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(mmap_threshold))  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX: handler threads share two arenas (they hold the GIL anyway)
    except (OSError, AttributeError):
        pass


def with_suppressed(fn: Callable[[], object]) -> None:
    """Run ``fn`` and ignore socket errors: a best-effort answer to a client that may be gone."""
    try:
        fn()
    except OSError:
        pass


# -- the retrieval server -------------------------------------------------------------------------
class RetrievalServer(GuardedServer):
    def __init__(self, address, retriever, limits: Limits | None = None, max_batch: int = 512,
                 batch_wait_ms: float = 0.0, request_timeout: float = 60.0, index_name: str = "",
                 max_connections: int = 128, idle_timeout: float = 60.0, read_timeout: float = 30.0):
        self.retriever = retriever
        self.limits = limits or Limits()
        self.batcher = MicroBatcher(retriever.search, max_batch=max_batch, max_wait_ms=batch_wait_ms,
                                    max_results=self.limits.max_results)
        self.stats = Stats()
        self.request_timeout = request_timeout
        self.index_name = index_name
        self.started = time.time()
        self.stopping = threading.Event()
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        super().__init__(address, RetrievalHandler, max_connections=max_connections, idle_timeout=idle_timeout,
                         read_timeout=read_timeout)

    @property
    def pages(self):
        """The retriever's page store (``corpora.pages.PageStore``), made on first use; None if it has none."""
        if not hasattr(self, "_pages"):
            with self._inflight_lock:
                if not hasattr(self, "_pages"):
                    from corpora.pages import PageStore

                    self._pages = PageStore(self.retriever) if hasattr(self.retriever, "titles") else None
        return self._pages

    def track(self, delta: int) -> None:
        with self._inflight_lock:
            self._inflight += delta

    @property
    def inflight(self) -> int:
        return self._inflight

    def health(self) -> dict:
        return {
            "status": "stopping" if self.stopping.is_set() else "ok",
            "index": self.index_name,
            "num_passages": len(self.retriever) if hasattr(self.retriever, "__len__") else None,
            "uptime_s": round(time.time() - self.started, 3),
            "pid": os.getpid(),
            "requests": self.stats.snapshot(),
            "batcher": self.batcher.stats(),
            "limits": asdict(self.limits),
            "connections": {"open": self.open_connections, "max": self.max_connections, "refused": self.refused,
                            "idle_timeout_s": self.idle_timeout, "read_timeout_s": self.read_timeout,
                            "request_timeout_s": self.request_timeout},
        }

    def close_gracefully(self, grace: float = 10.0) -> None:
        """After ``shutdown()``: wait for requests in flight, drain the batcher, close the socket."""
        deadline = time.monotonic() + grace
        while self.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.batcher.close(timeout=max(0.1, deadline - time.monotonic()))
        self.server_close()


class RetrievalHandler(GuardedHandler):
    server_version = "corpora-serve/1"
    routes = {"/retrieve": ("POST",), "/page": ("GET", "POST"), "/health": ("GET",)}
    server: RetrievalServer

    def _send_json(self, status: int, obj: dict) -> None:
        self.send_json(status, obj)

    def do_GET(self) -> None:  # noqa: N802
        path = self.route("GET")
        if path == "/health":
            self._send_json(200, self.server.health())
        elif path == "/page":
            from urllib.parse import parse_qs

            title = parse_qs(self.path.split("?", 1)[1] if "?" in self.path else "").get("title", [""])[0]
            self._page(title)

    def do_POST(self) -> None:  # noqa: N802
        t0 = time.perf_counter()
        srv = self.server
        srv.track(+1)
        status, n = 500, 0
        try:
            path = self.route("POST")
            if path is None:
                status = self.status_sent
            elif path == "/page":
                status = self._page_post()
            else:
                status, n = self._retrieve()
        finally:
            srv.track(-1)
            dt = time.perf_counter() - t0
            srv.stats.record(status, n, dt)
            log.debug("POST %s -> %d (%d queries, %.1f ms)", self.path, status, n, 1000 * dt)

    def _retrieve(self) -> tuple[int, int]:
        srv, limits = self.server, self.server.limits
        body = self.read_body(limits.max_body_bytes)
        if isinstance(body, int):
            return body, 0
        try:
            queries, topk, scores = parse_request(body, limits)
        except RequestError as exc:
            self._error(exc.status, exc.message)
            return exc.status, 0
        if srv.stopping.is_set():
            self.close_connection = True
            self._error(503, "the server is shutting down")
            return 503, 0
        try:
            rows = srv.batcher.submit(queries, topk, timeout=srv.request_timeout)
        except FutureTimeout:
            self._error(503, f"retrieval took longer than {srv.request_timeout:g} s (--request-timeout)")
            return 503, 0
        except RuntimeError as exc:
            if srv.batcher._closed:
                self._error(503, "the server is shutting down")
                return 503, 0
            log.exception("search failed")
            self._error(500, f"search failed: {exc}")
            return 500, 0
        except Exception as exc:  # a bug in the index: report it, stay up
            log.exception("search failed")
            self._error(500, f"search failed: {type(exc).__name__}: {exc}")
            return 500, 0
        self._send_json(200, format_result(rows, scores))
        return 200, len(queries)

    def _page_post(self) -> int:
        body = self.read_body(self.server.limits.max_body_bytes)
        if isinstance(body, int):
            return body
        try:
            req = guarded_loads(body, max_bytes=self.server.limits.max_body_bytes, max_depth=JSON_DEPTH)
        except JSONGuardError as exc:
            self._error(400, f'a /page body is JSON {{"title": str}}: {exc}')
            return 400
        title = req.get("title") if isinstance(req, dict) else None
        if not isinstance(title, str):
            self._error(400, 'a /page body is JSON {"title": str}')
            return 400
        return self._page(title)

    def _page(self, title: str) -> int:
        store = self.server.pages
        if store is None:
            self._error(501, "this server's retriever has no page store")
            return 501
        if not title.strip() or len(title) > self.server.limits.max_query_chars:
            self._error(400, f"title must be non-empty and at most {self.server.limits.max_query_chars} characters")
            return 400
        canonical = store.resolve(title)
        if canonical is None:
            self._send_json(404, {"error": f"no page titled {title[:200]!r}", "status": 404, "suggestions": store.suggest(title)})
            return 404
        self._send_json(200, {"title": canonical, "text": store.text(canonical)})
        return 200


# -- running ---------------------------------------------------------------------------------
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
             b["batches"], b["mean_queries_per_batch"], 1000 * _percentile(lat, 50), 1000 * _percentile(lat, 99))


def load_retriever(spec: str, backend: str = "bm25s"):
    """An in-process retriever for ``spec`` (index folder, corpus file or ``bundled``)."""
    if spec.startswith(("http://", "https://")):
        raise ValueError("--index must be an index folder, a corpus file or 'bundled', not a URL")
    from corpora.index import BM25Index
    from corpora.retrievers import resolve_index_dir

    return BM25Index(resolve_index_dir(spec, backend), backend=backend)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m corpora.serve", description=__doc__.split("\n\n")[0],
        epilog="Limits: every request is bounded by the --max-* flags (over one: 400, or 413 for size), JSON "
               f"bodies by corpora.jsonguard (nesting depth {JSON_DEPTH}, integers of at most 64 digits), each "
               "connection by --idle-timeout and --read-timeout (408, then closed), the connection count by "
               "--max-connections (503 beyond it), the wait for the index by --request-timeout (503).")
    ap.add_argument("--index", default="bundled", help="index folder, corpus file, or 'bundled'")
    ap.add_argument("--backend", default="bm25s", choices=["bm25s", "rank_bm25"])
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--topk", type=int, default=Limits.default_topk, help="topk when a request gives none (default %(default)s)")
    ap.add_argument("--max-topk", type=int, default=Limits.max_topk, help="largest topk a request may ask (default %(default)s)")
    ap.add_argument("--max-queries", type=int, default=Limits.max_queries, help="queries per request (default %(default)s; more: 413)")
    ap.add_argument("--max-query-chars", type=int, default=Limits.max_query_chars, help="characters per query or page title (default %(default)s)")
    ap.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, help="request body size (default %(default)s; more: 413)")
    ap.add_argument("--max-results", type=int, default=Limits.max_results,
                    help="queries x topk per request, which bounds the response size (default %(default)s; more: 413)")
    ap.add_argument("--max-connections", type=int, default=128,
                    help="connections served at once, a thread each (default %(default)s; more get 503 and are closed)")
    ap.add_argument("--idle-timeout", type=float, default=60.0,
                    help="seconds a keep-alive connection may wait without sending a request (default %(default)s)")
    ap.add_argument("--read-timeout", type=float, default=30.0,
                    help="seconds to receive a whole request from its first byte, and to send the response "
                         "(default %(default)s; a slower client gets 408 and is closed)")
    ap.add_argument("--request-timeout", type=float, default=60.0,
                    help="seconds a request may wait for the index (default %(default)s; then 503)")
    ap.add_argument("--max-batch", type=int, default=512, help="queries per index call")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0, help="how long a batch waits for more requests (0: only those waiting)")
    ap.add_argument("--log-every", type=float, default=60.0, help="seconds between summary lines")
    ap.add_argument("--grace", type=float, default=10.0, help="seconds to finish requests on shutdown")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits(args.max_queries, args.max_query_chars, args.max_body_bytes, args.max_topk, args.topk, args.max_results)
    if not 1 <= limits.default_topk <= limits.max_topk:
        ap.error("--topk must be between 1 and --max-topk")
    for flag in ("max_queries", "max_query_chars", "max_body_bytes", "max_results", "max_connections", "idle_timeout",
                 "read_timeout", "request_timeout"):
        if getattr(args, flag) <= 0:
            ap.error(f"--{flag.replace('_', '-')} must be positive")
    # Numba's OpenMP workers (started at the first kernel call) busy-wait by default; on a small
    # machine that made one query take 12 ms instead of 0.2 ms (2 cores) and starved the HTTP
    # threads. The setting must be in place before that first call.
    tune_malloc()
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    t0 = time.perf_counter()
    try:
        retriever = load_retriever(args.index, args.backend)
    except (FileNotFoundError, ValueError) as exc:
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

    def on_signal(signum, frame):
        if not server.stopping.is_set():
            log.info("%s: stopping (finishing %d requests in flight)", signal.Signals(signum).name, server.inflight)
            server.stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=_summary_loop, args=(server, args.log_every), daemon=True).start()
    host, port = server.server_address[:2]
    log.info("serving %s passages from %s on http://%s:%d (POST /retrieve, POST /page, GET /health); loaded in %.1f s",
             f"{len(retriever):,}", index_name, host, port, time.perf_counter() - t0)
    server.serve_forever(poll_interval=0.1)
    server.close_gracefully(args.grace)
    _log_summary(server, args.log_every)  # the last partial window, if it had traffic
    snap, b = server.stats.snapshot(), server.batcher.stats()
    log.info("stopped after %.0f s: %d requests %s, %d queries in %d batches", time.time() - server.started,
             snap["total"], snap["by_status"], snap["queries"], b["batches"])
    return 0


# -- for tests and benchmarks: a server in a subprocess on a free loopback port ------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SubprocessServer:
    """What a server run as a subprocess shares: its log, ``kill()`` (SIGKILL), ``stop()``
    (SIGTERM, then SIGKILL after ``timeout``) and use as a context manager (``start()`` on
    entry). Subclasses set ``proc`` and ``log_path`` and define ``start``."""

    proc: "subprocess.Popen | None" = None
    log_path: Path

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for a clean exit (SIGKILL after ``timeout``); returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(SubprocessServer):
    """``python -m corpora.serve`` in a subprocess on a free loopback port; a context manager.

    ``url`` is ``http://127.0.0.1:PORT``; ``kill()`` sends SIGKILL, ``stop()`` SIGTERM and waits.
    The server's log goes to ``log_path`` (a temp file unless given).
    """

    def __init__(self, index: str | Path, extra_args: Sequence[str] = (), log_path: str | Path | None = None,
                 startup_timeout: float = 120.0, env: dict | None = None):
        import tempfile

        self.index, self.extra_args = str(index), list(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="corpora-serve-", suffix=".log")[1])
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        import urllib.request

        for _attempt in range(3):  # a free port can be taken between the probe and the bind
            self.port = free_port()
            env = dict(os.environ if self.env is None else self.env)
            # the child imports this very package, even where another copy is installed
            root = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            cmd = [sys.executable, "-m", "corpora.serve", "--index", self.index, "--host", "127.0.0.1",
                   "--port", str(self.port), *self.extra_args]
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    time.sleep(0.05)
            if self.proc.poll() is None:
                self.kill()
                raise TimeoutError(f"server did not answer /health within {self.startup_timeout} s; log: {self.log_text()[-2000:]}")
            if self.proc.returncode != 3:  # 3: could not bind, try another port
                break
        raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_text()[-2000:]}")


if __name__ == "__main__":
    sys.exit(main())
