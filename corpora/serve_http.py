"""The retrieval server over HTTP: :class:`RetrievalServer` (a :class:`common.httpserver.GuardedServer`
holding the retriever, its micro-batcher and request statistics) and :class:`RetrievalHandler`
(``POST /retrieve``, ``GET``/``POST /page``, ``GET /health``). The API is in ``corpora.serve``'s
docstring; ``python -m corpora.serve`` runs it."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict

from common.httpserver import GuardedHandler, GuardedServer
from corpora.jsonguard import JSONGuardError
from corpora.jsonguard import loads as guarded_loads
from corpora.serve_batcher import MicroBatcher
from corpora.serve_request import JSON_DEPTH, Limits, RequestError, format_result, parse_request

log = logging.getLogger("corpora.serve")  # the server's one log, as ``python -m corpora.serve`` names it


def percentile(sorted_vals: list[float], p: float) -> float:
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
                    "latency_ms_recent": {"n": len(lat), "p50": round(1000 * percentile(lat, 50), 3),
                                          "p99": round(1000 * percentile(lat, 99), 3)}}

    def take_window(self) -> tuple[list[float], int, int]:
        with self._lock:
            lat, errs, q = self._since_summary, self._errors_since, self._queries_since
            self._since_summary, self._errors_since, self._queries_since = [], 0, 0
            return lat, errs, q


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
        self._pages_lock = threading.Lock()
        super().__init__(address, RetrievalHandler, max_connections=max_connections, idle_timeout=idle_timeout,
                         read_timeout=read_timeout)

    @property
    def pages(self):
        """The retriever's page store (``corpora.pages.PageStore``), made on first use; None if it has none."""
        if not hasattr(self, "_pages"):
            with self._pages_lock:
                if not hasattr(self, "_pages"):
                    from corpora.pages import PageStore

                    self._pages = PageStore(self.retriever) if hasattr(self.retriever, "titles") else None
        return self._pages

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
            "connections": {**self.connection_stats(), "request_timeout_s": self.request_timeout},
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
    routes = {"/retrieve": ("POST",), "/page": ("GET", "POST"), "/passages": ("POST",), "/health": ("GET",)}
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
            elif path == "/passages":
                status = self._passages()
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

    def _passages(self) -> int:
        """``POST /passages`` ``{"titles": [str, ...]}``: every passage of each title, in corpus
        order (what ``WebQAEnv.privileged()`` gives in process: an opsd teacher's gold passages)."""
        limits = self.server.limits
        body = self.read_body(limits.max_body_bytes)
        if isinstance(body, int):
            return body
        usage = 'a /passages body is JSON {"titles": [str, ...]}'
        try:
            req = guarded_loads(body, max_bytes=limits.max_body_bytes, max_depth=JSON_DEPTH)
        except JSONGuardError as exc:
            self._error(400, f"{usage}: {exc}")
            return 400
        titles = req.get("titles") if isinstance(req, dict) else None
        if not isinstance(titles, list) or not all(isinstance(t, str) for t in titles):
            self._error(400, usage)
            return 400
        if len(titles) > limits.max_queries:
            self._error(413, f"too many titles: {len(titles)} > {limits.max_queries} per request")
            return 413
        retriever = self.server.retriever
        index = getattr(retriever, "titles", None)
        if index is None:
            self._error(501, "this server's retriever has no title index")
            return 501
        found = {t: [{"id": retriever.docs[i].id, "contents": retriever.docs[i].contents()} for i in index.get(t, [])]
                 for t in titles}
        self._send_json(200, {"passages": found})
        return 200

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
