"""The attack side of ``python -m benchmarks.hostile``: raw-socket clients that misbehave on
purpose (bodies cut short, one byte a second, idle or half-open connections, clients that hang
up mid-generation) and the catalogue :data:`CASES` of bad requests against the retrieval server
and the model server, each with the outcomes that count as handled. :data:`WARM_UP` is what runs
before the baseline RSS is taken. Only 127.0.0.1 is ever contacted.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import psutil

HOST = "127.0.0.1"


# -- talking to a server ------------------------------------------------------------------------------

def request(port: int, method: str, path: str, body: bytes | None = None, *, headers: dict | None = None,
            content_length: str | None = "auto", timeout: float = 30.0) -> tuple[int | str, str]:
    """One request on a fresh connection, sent raw; (status or 'closed'/'reset'/'timeout', detail)."""
    head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Content-Type: application/json", "Connection: close"]
    if content_length == "auto" and body is not None:
        head.append(f"Content-Length: {len(body)}")
    elif content_length not in (None, "auto"):
        head.append(f"Content-Length: {content_length}")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    data = ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered before reading it all: read that answer
            return _response(s)
    except TimeoutError:
        return "timeout", ""
    except OSError as exc:
        return "reset", type(exc).__name__


def _response(s: socket.socket) -> tuple[int | str, str]:
    resp = http.client.HTTPResponse(s)
    try:
        resp.begin()
        raw = resp.read()
    except (http.client.RemoteDisconnected, http.client.IncompleteRead, ConnectionResetError, http.client.BadStatusLine):
        return "closed", ""
    except TimeoutError:
        return "timeout", ""
    try:
        payload = json.loads(raw)
        err = payload.get("error") if isinstance(payload, dict) else None
        detail = (err.get("message") if isinstance(err, dict) else err) or ""
    except ValueError:
        detail = raw[:120].decode("utf-8", "replace")
    return resp.status, str(detail)[:160]


def post(port: int, path: str, obj, **kw) -> tuple[int | str, str]:
    return request(port, "POST", path, obj if isinstance(obj, bytes) else json.dumps(obj).encode(), **kw)


def slow_client(port: int, path: str, body: bytes, every: float, give_up: float) -> tuple[int | str, str]:
    """Send one byte every ``every`` s; the server's answer, or 'held' if it kept waiting past ``give_up`` s."""
    data = (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    t0 = time.monotonic()
    with socket.create_connection((HOST, port), timeout=10) as s:
        for byte in data:
            if time.monotonic() - t0 > give_up:
                return "held", f"still open after {give_up:.0f} s"
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            s.settimeout(every)
            try:
                first = s.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                continue
            except OSError:
                return "closed", "reset"
            if not first:
                return "closed", f"after {time.monotonic() - t0:.1f} s"
            s.settimeout(5)
            return _response(s)
        s.settimeout(give_up)
        return _response(s)


def idle_client(port: int, give_up: float) -> tuple[int | str, str]:
    """Connect and send nothing: 'closed' when the server hangs up within ``give_up`` s."""
    t0 = time.monotonic()
    with socket.create_connection((HOST, port), timeout=give_up) as s:
        try:
            got = s.recv(200)
        except TimeoutError:
            return "held", f"still open after {give_up:.0f} s"
        except OSError:
            return "closed", "reset"
    return ("closed", f"after {time.monotonic() - t0:.1f} s") if not got else (int(got[9:12]), got[:40].decode())


def half_open(port: int, n: int, pid: int) -> tuple[int | str, str]:
    """``n`` connections that send nothing, all at once: how many the server refused (503) and
    how many threads it grew; 503 when it refused the excess and kept its thread count bounded."""
    proc = psutil.Process(pid)
    base = proc.num_threads()
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection((HOST, port), timeout=5))
        time.sleep(0.5)
        grown = proc.num_threads() - base
        refused = 0
        for s in socks:
            s.settimeout(0.05)
            try:
                refused += s.recv(200).startswith(b"HTTP/1.1 503")
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()
    return (503 if refused else "accepted"), f"{n} half-open: {refused} refused with 503, threads +{grown}"


def abandon(port: int, path: str, obj, after: float, probe: Callable[[], tuple]) -> tuple[int | str, str]:
    """Send ``obj``, close the connection after ``after`` s, then time ``probe`` (the next request)."""
    body = json.dumps(obj).encode()
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        time.sleep(after)
    t0 = time.monotonic()
    status, detail = probe()
    return status, f"next request answered in {time.monotonic() - t0:.2f} s ({detail or 'ok'})"


def truncated(port: int, path: str) -> tuple[int | str, str]:
    """Promise 1000 bytes, send 10, hang up."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"queries"')
    return "closed", "client hung up mid-body"


# -- the catalogue ------------------------------------------------------------------------------------

@dataclass
class Case:
    server: str  # "retrieval" | "model"
    name: str
    expect: tuple  # acceptable outcomes
    run: Callable[["Target"], tuple[int | str, str]]


@dataclass
class Target:
    name: str
    port: int
    pid: int
    timeouts: float
    context: int = 0  # the model's


DEEP = b"[" * 100_000 + b"]" * 100_000
GIANT = b"9" * 5000
LONG = {"prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0, "stop": ["zzzz"]}


def _retrieval_cases() -> list[Case]:
    R = "retrieval"
    ok_body = {"queries": ["Ed Wood film director"], "topk": 3}
    return [
        Case(R, "valid request", (200,), lambda t: post(t.port, "/retrieve", ok_body)),
        Case(R, "20 MB body", (413,), lambda t: post(t.port, "/retrieve", b'{"queries":["' + b"x" * (20 << 20) + b'"]}')),
        Case(R, "100,000-deep nesting /retrieve", (400,), lambda t: post(t.port, "/retrieve", DEEP)),
        Case(R, "100,000-deep nesting /page", (400,), lambda t: post(t.port, "/page", DEEP)),
        Case(R, "topk of 5,000 digits", (400,), lambda t: post(t.port, "/retrieve", b'{"queries":["a"],"topk":' + GIANT + b"}")),
        Case(R, "title of 5,000 digits /page", (400,), lambda t: post(t.port, "/page", b'{"title":' + GIANT + b"}")),
        Case(R, "NaN and 1e999", (400,), lambda t: post(t.port, "/retrieve", b'{"queries":["a"],"topk":1e999}')),
        Case(R, "invalid UTF-8", (400,), lambda t: post(t.port, "/retrieve", b'{"queries":["\xff\xfe"]}')),
        Case(R, "256 queries x topk 100 (20 MB answer)", (413,),
             lambda t: post(t.port, "/retrieve", {"queries": ["Ed Wood film"] * 256, "topk": 100})),
        Case(R, "257 queries", (413,), lambda t: post(t.port, "/retrieve", {"queries": ["a"] * 257})),
        Case(R, "topk 10**30", (400,), lambda t: post(t.port, "/retrieve", b'{"queries":["a"],"topk":' + b"1" + b"0" * 30 + b"}")),
        Case(R, "query of 100,000 chars", (400,), lambda t: post(t.port, "/retrieve", {"queries": ["x" * 100_000]})),
        Case(R, "Content-Length: -1", (400,), lambda t: post(t.port, "/retrieve", b"{}", content_length="-1")),
        Case(R, "no Content-Length", (411,), lambda t: post(t.port, "/retrieve", b"{}", content_length=None)),
        Case(R, "Content-Length: 1e9 (garbage)", (400,), lambda t: post(t.port, "/retrieve", b"{}", content_length="1e9")),
        Case(R, "Content-Length: 10**30", (400,), lambda t: post(t.port, "/retrieve", b"{}", content_length="1" + "0" * 30)),
        Case(R, "chunked body", (411,), lambda t: post(t.port, "/retrieve", b"2\r\n{}\r\n0\r\n\r\n", content_length=None,
                                                        headers={"Transfer-Encoding": "chunked"})),
        Case(R, "GET /retrieve", (405,), lambda t: request(t.port, "GET", "/retrieve")),
        Case(R, "POST /health", (405,), lambda t: post(t.port, "/health", b"{}")),
        Case(R, "PUT /page", (405,), lambda t: request(t.port, "PUT", "/page", b"{}")),
        Case(R, "unknown path", (404,), lambda t: post(t.port, "/admin", b"{}")),
        Case(R, "70 KB request line", (414,), lambda t: request(t.port, "GET", "/page?title=" + "x" * 70_000)),
        Case(R, "200 headers", (431,), lambda t: request(t.port, "GET", "/health", headers={f"X-{i}": "y" for i in range(200)})),
        Case(R, "body cut short, client gone", ("closed",), lambda t: truncated(t.port, "/retrieve")),
        Case(R, "slow client, 1 byte/s", (408, "closed"),
             lambda t: slow_client(t.port, "/retrieve", b'{"queries": ["Ed Wood"]}', 1.0, t.timeouts + 3)),
        Case(R, "idle connection", ("closed",), lambda t: idle_client(t.port, t.timeouts + 3)),
        Case(R, "300 half-open connections", (503,), lambda t: half_open(t.port, 300, t.pid)),
        Case(R, "8 clients x 2 max-size answers", (200,), lambda t: _parallel(
            8, lambda: [post(t.port, "/retrieve", {"queries": ["Ed Wood film"] * 40, "topk": 100}) for _ in range(2)][-1])),
    ]


def _model_cases() -> list[Case]:
    M = "model"
    cmp, chat = "/v1/completions", "/v1/chat/completions"
    return [
        Case(M, "valid request", (200,), lambda t: post(t.port, cmp, {"prompt": "hi", "max_tokens": 4})),
        Case(M, "20 MB string prompt", (413,), lambda t: post(t.port, cmp, {"prompt": "x " * (10 << 20)})),
        Case(M, "600 KB string prompt", (400,), lambda t: post(t.port, cmp, {"prompt": "x " * 300_000})),
        Case(M, "600 KB chat message", (400,), lambda t: post(t.port, chat, {"messages": [{"role": "user", "content": "x " * 300_000}]})),
        Case(M, "1,000,000 prompt ids", (400,), lambda t: post(t.port, cmp, {"prompt": [65] * 1_000_000, "max_tokens": 1})),
        Case(M, "max_tokens 10**9", (400,), lambda t: post(t.port, cmp, {"prompt": "hi", "max_tokens": 1_000_000_000})),
        Case(M, "prompt past the context", (400,), lambda t: post(t.port, cmp, {"prompt": [65] * (t.context + 100), "max_tokens": 1})),
        Case(M, "prompt + max_tokens past the context", (400,),
             lambda t: post(t.port, cmp, {"prompt": [65] * (t.context - 10), "max_tokens": 100})),
        Case(M, "temperature 1e-300", (400,), lambda t: post(t.port, cmp, {"prompt": "hi", "temperature": 1e-300})),
        Case(M, "seed 10**30", (400,), lambda t: post(t.port, cmp, {"prompt": "hi", "seed": 10**30})),
        Case(M, "top_p 0", (400,), lambda t: post(t.port, cmp, {"prompt": "hi", "top_p": 0})),
        Case(M, "n 1000", (400,), lambda t: post(t.port, cmp, {"prompt": "hi", "n": 1000})),
        Case(M, "1000 stop strings", (400,), lambda t: post(t.port, cmp, {"prompt": "hi", "stop": [f"s{i}" for i in range(1000)]})),
        Case(M, "logprobs 1000", (400,), lambda t: post(t.port, cmp, {"prompt": "hi", "logprobs": 1000})),
        Case(M, "1000 prompts", (400,), lambda t: post(t.port, cmp, {"prompt": ["hi"] * 1000})),
        Case(M, "100,000-deep nesting", (400,), lambda t: post(t.port, cmp, DEEP)),
        Case(M, "100,000-deep nesting (chat)", (400,), lambda t: post(t.port, chat, DEEP)),
        Case(M, "max_tokens of 5,000 digits", (400,), lambda t: post(t.port, cmp, b'{"prompt":"hi","max_tokens":' + GIANT + b"}")),
        Case(M, "temperature 1e999", (400,), lambda t: post(t.port, cmp, b'{"prompt":"hi","temperature":1e999}')),
        Case(M, "Content-Length: -1", (400,), lambda t: post(t.port, cmp, b"{}", content_length="-1")),
        Case(M, "no Content-Length", (411,), lambda t: post(t.port, cmp, b"{}", content_length=None)),
        Case(M, "GET /v1/completions", (405,), lambda t: request(t.port, "GET", cmp)),
        Case(M, "POST /health", (405,), lambda t: post(t.port, "/health", b"{}")),
        Case(M, "8 prompts x n 8 x 2000 tokens past --request-timeout", (503,),
             lambda t: post(t.port, cmp, {**LONG, "prompt": [LONG["prompt"]] * 8, "n": 8})),
        Case(M, "client gone mid-generation (x3)", (200,), lambda t: _abandon_many(t, 3)),
        Case(M, "slow client, 1 byte/s", (408, "closed"),
             lambda t: slow_client(t.port, cmp, b'{"prompt": "hi"}', 1.0, t.timeouts + 3)),
        Case(M, "idle connection", ("closed",), lambda t: idle_client(t.port, t.timeouts + 3)),
        Case(M, "100 half-open connections", (503,), lambda t: half_open(t.port, 100, t.pid)),
        Case(M, "large valid request", (200,), lambda t: post(t.port, cmp, {"prompt": [65] * (t.context - 64), "max_tokens": 32})),
    ]


def _abandon_many(t: Target, n: int) -> tuple[int | str, str]:
    for seed in range(n - 1):  # seeded: each runs alone, so they queue
        body = json.dumps({**LONG, "seed": seed}).encode()
        s = socket.create_connection((HOST, t.port), timeout=10)
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        s.close()
    return abandon(t.port, "/v1/completions", {**LONG, "seed": n}, 0.5,
                   lambda: post(t.port, "/v1/completions", {"prompt": "hi", "max_tokens": 1}))


def _parallel(n: int, fn: Callable[[], tuple]) -> tuple[int | str, str]:
    out: list = [None] * n

    def work(i):
        out[i] = fn()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    statuses = sorted({o[0] for o in out if o}, key=str)
    return (statuses[0] if len(statuses) == 1 else "mixed"), f"{n} clients: {statuses}"


CASES = _retrieval_cases() + _model_cases()

# What runs before the baseline RSS is taken: one request of each kind at the largest valid size
# (the retrieval index reads passages lazily; the model server's first long prompt sizes its buffers).
WARM_UP = {
    "retrieval": lambda ctx: [("/retrieve", {"queries": ["Ed Wood film"] * 40, "topk": 100}), ("/page", {"title": "Ed Wood"})],
    "model": lambda ctx: [("/v1/completions", {"prompt": [65] * (ctx - 64), "max_tokens": 32}),
                          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})],
}
