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
query or query count over the limits; 413 for a body over ``--max-body-bytes``; 404/405 for
other paths and methods; 503 while shutting down. A bad request never stops the server.

## Why the standard library
``http.server.ThreadingHTTPServer`` (a thread per connection, HTTP/1.1 keep-alive) needs no
dependency, and the cost that matters is the index call, not HTTP parsing: BM25 top-k over a
large index is memory-bound work done in numba, so it is done once per batch, not once per
request. An ASGI stack (FastAPI + uvicorn, as Search-R1 uses) would add two dependencies and
an event loop for no gain in that part.

## Micro-batching
Handler threads put their request on a queue and wait. One worker thread takes the first
waiting request, then everything else already waiting (and what arrives within
``--batch-wait-ms``), up to ``--max-batch`` queries, makes one ``search(all queries, max topk)``
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
import json
import logging
import os
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

log = logging.getLogger("corpora.serve")


@dataclass
class Limits:
    max_queries: int = 256  # queries in one request
    max_query_chars: int = 4096  # characters in one query
    max_body_bytes: int = 1 << 20  # request body
    max_topk: int = 100
    default_topk: int = 3


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_request(body: bytes, limits: Limits) -> tuple[list[str], int, bool]:
    """A /retrieve body -> (queries, topk, return_scores), or RequestError(400, why)."""
    try:
        req = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
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

    def __init__(self, search: Callable[[Sequence[str], int], list], max_batch: int = 512, max_wait_ms: float = 0.0):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.search, self.max_batch, self.max_wait = search, max_batch, max_wait_ms / 1000.0
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
        batch, n = [first], len(first.queries)
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
            if n + len(job.queries) > self.max_batch:
                self._carry = job  # first in the next batch
                break
            batch.append(job)
            n += len(job.queries)
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


# -- HTTP ----------------------------------------------------------------------------------------
class RetrievalServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address, retriever, limits: Limits | None = None, max_batch: int = 512,
                 batch_wait_ms: float = 0.0, request_timeout: float = 120.0, index_name: str = ""):
        self.retriever = retriever
        self.limits = limits or Limits()
        self.batcher = MicroBatcher(retriever.search, max_batch=max_batch, max_wait_ms=batch_wait_ms)
        self.stats = Stats()
        self.request_timeout = request_timeout
        self.index_name = index_name
        self.started = time.time()
        self.stopping = threading.Event()
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        super().__init__(address, RetrievalHandler)

    @property
    def pages(self):
        """The retriever's page store (``corpora.pages.PageStore``), made on first use; None if it has none."""
        if not hasattr(self, "_pages"):
            with self._inflight_lock:
                if not hasattr(self, "_pages"):
                    from corpora.pages import PageStore

                    self._pages = PageStore(self.retriever) if hasattr(self.retriever, "titles") else None
        return self._pages

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # a client went away: not our error
            log.debug("connection from %s ended: %r", client_address, exc)
        else:
            log.exception("error while handling a request from %s", client_address)

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
        }

    def close_gracefully(self, grace: float = 10.0) -> None:
        """After ``shutdown()``: wait for requests in flight, drain the batcher, close the socket."""
        deadline = time.monotonic() + grace
        while self.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.batcher.close(timeout=max(0.1, deadline - time.monotonic()))
        self.server_close()


class RetrievalHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections
    server_version = "corpora-serve/1"
    timeout = 60  # idle keep-alive connections are closed after this many seconds
    disable_nagle_algorithm = True  # headers and body are two writes: do not hold the second back
    server: RetrievalServer

    def log_message(self, fmt: str, *args) -> None:  # route http.server's own lines to logging
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send_json(self, status: int, obj: dict) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message, "status": status})

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send_json(200, self.server.health())
        elif path == "/retrieve":
            self._error(405, "use POST /retrieve with a JSON body")
        elif path == "/page":
            from urllib.parse import parse_qs

            title = parse_qs(self.path.split("?", 1)[1] if "?" in self.path else "").get("title", [""])[0]
            self._page(title)
        else:
            self._error(404, f"no route {path!r}; use POST /retrieve, POST /page or GET /health")

    def do_POST(self) -> None:
        t0 = time.perf_counter()
        srv = self.server
        srv.track(+1)
        status, n = 500, 0
        try:
            if self.path.split("?", 1)[0] == "/page":
                status = self._page_post()
            else:
                status, n = self._retrieve()
        finally:
            srv.track(-1)
            dt = time.perf_counter() - t0
            srv.stats.record(status, n, dt)
            log.debug("POST %s -> %d (%d queries, %.1f ms)", self.path, status, n, 1000 * dt)

    def _read_body(self) -> bytes | int:
        """The request body, or the status of the error already sent."""
        limits = self.server.limits
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._error(411, "chunked bodies are not supported: send Content-Length")
            return 411
        try:
            length = int(self.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            self._error(411, "a Content-Length header is required")
            return 411
        if length > limits.max_body_bytes:
            # Read and discard a moderately large body so that the client sees the 413 (not a reset
            # connection) and the connection stays usable; close it on anything larger.
            if length <= 16 * limits.max_body_bytes:
                left = length
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
                self.close_connection = left > 0
            else:
                self.close_connection = True
            self._error(413, f"request body of {length} bytes is over the limit of {limits.max_body_bytes}")
            return 413
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            return 400  # the client went away mid-body
        return body

    def _retrieve(self) -> tuple[int, int]:
        srv, limits = self.server, self.server.limits
        path = self.path.split("?", 1)[0]
        if path != "/retrieve":
            self.close_connection = True
            self._error(404, f"no route {path!r}; use POST /retrieve, POST /page or GET /health")
            return 404, 0
        body = self._read_body()
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
            self._error(503, f"retrieval took longer than {srv.request_timeout} s")
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
        body = self._read_body()
        if isinstance(body, int):
            return body
        try:
            req = json.loads(body)
            title = req["title"]
            if not isinstance(title, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
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
    ap = argparse.ArgumentParser(prog="python -m corpora.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", default="bundled", help="index folder, corpus file, or 'bundled'")
    ap.add_argument("--backend", default="bm25s", choices=["bm25s", "rank_bm25"])
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--topk", type=int, default=Limits.default_topk, help="topk when a request gives none")
    ap.add_argument("--max-topk", type=int, default=Limits.max_topk)
    ap.add_argument("--max-queries", type=int, default=Limits.max_queries, help="queries per request")
    ap.add_argument("--max-query-chars", type=int, default=Limits.max_query_chars)
    ap.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    ap.add_argument("--max-batch", type=int, default=512, help="queries per index call")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0, help="how long a batch waits for more requests (0: only those waiting)")
    ap.add_argument("--log-every", type=float, default=60.0, help="seconds between summary lines")
    ap.add_argument("--grace", type=float, default=10.0, help="seconds to finish requests on shutdown")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits(args.max_queries, args.max_query_chars, args.max_body_bytes, args.max_topk, args.topk)
    if not 1 <= limits.default_topk <= limits.max_topk:
        ap.error("--topk must be between 1 and --max-topk")
    # Numba's OpenMP workers (started at the first kernel call) busy-wait by default; on a small
    # machine that made one query take 12 ms instead of 0.2 ms (2 cores) and starved the HTTP
    # threads. The setting must be in place before that first call.
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
                                 index_name=index_name)
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
