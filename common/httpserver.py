"""HTTP machinery both servers share (``corpora.serve`` and ``agents.openai_server``): standard library only.

* :class:`GuardedServer` - a ``ThreadingHTTPServer`` that bounds its connections (count, idle
  wait, time to receive a request or take a response), counts requests in flight and has a
  ``stopping`` event; :func:`stop_on_signals` sets it on SIGTERM / SIGINT.
* :class:`GuardedHandler` - request handling under those deadlines: JSON error bodies (408, 404,
  405, 411, 413, http.server's own), a strict ``Content-Length`` body reader, ``client_gone``.
* :func:`trim_memory`, :func:`tune_malloc` - give the memory of large requests back to the OS.

Running one of these servers in a subprocess (tests, benchmarks) is :mod:`common.subprocess_server`.
"""
from __future__ import annotations

import io
import json
import logging
import re
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

log = logging.getLogger(__name__)


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
    from its first byte or to take a response. Handlers derive from :class:`GuardedHandler`;
    they ``track(+1)`` / ``track(-1)`` around a request, so that a shutdown can wait for those in
    flight, and look at ``stopping`` (set on shutdown) before starting work."""

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
        self.stopping = threading.Event()
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        super().__init__(address, handler)

    @property
    def open_connections(self) -> int:
        return self._open

    def connection_stats(self) -> dict:
        """The ``connections`` part of ``GET /health``."""
        return {"open": self.open_connections, "max": self.max_connections, "refused": self.refused,
                "idle_timeout_s": self.idle_timeout, "read_timeout_s": self.read_timeout}

    def track(self, delta: int) -> None:
        with self._inflight_lock:
            self._inflight += delta

    @property
    def inflight(self) -> int:
        return self._inflight

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


def stop_on_signals(server: GuardedServer, logger: logging.Logger, doing: str) -> None:
    """On SIGTERM or SIGINT: log ``stopping ({doing} N requests in flight)``, set
    ``server.stopping`` and shut the server down (``serve_forever`` returns)."""

    def on_signal(signum, frame):
        if not server.stopping.is_set():
            logger.info("%s: stopping (%s %d requests in flight)", signal.Signals(signum).name, doing, server.inflight)
            server.stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def add_connection_args(ap, max_connections: int) -> None:
    """The connection flags both servers share: --max-connections, --idle-timeout, --read-timeout."""
    ap.add_argument("--max-connections", type=int, default=max_connections,
                    help="connections served at once, a thread each (default %(default)s; more get 503 and are closed)")
    ap.add_argument("--idle-timeout", type=float, default=60.0,
                    help="seconds a keep-alive connection may wait without sending a request (default %(default)s)")
    ap.add_argument("--read-timeout", type=float, default=30.0,
                    help="seconds to receive a whole request from its first byte, and to send the response "
                         "(default %(default)s; a slower client gets 408 and is closed)")
