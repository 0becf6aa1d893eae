"""common.httpserver on its own, in process: a GuardedServer with a two-route handler answers
JSON errors (404, 405 with Allow, 411, 413), refuses a connection past --max-connections with a
503, and add_connection_args gives both servers the same flags."""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time

import pytest

from common.httpserver import GuardedHandler, GuardedServer, add_connection_args


class Echo(GuardedHandler):
    routes = {"/echo": ("POST",), "/health": ("GET",)}

    def do_GET(self):  # noqa: N802
        if self.route("GET"):
            self.send_json(200, {"ok": True, "connections": self.server.connection_stats()})

    def do_POST(self):  # noqa: N802
        if self.route("POST"):
            body = self.read_body(max_bytes=64)
            if isinstance(body, bytes):
                self.send_json(200, {"echo": body.decode()})


@pytest.fixture
def server():
    srv = GuardedServer(("127.0.0.1", 0), Echo, max_connections=2, idle_timeout=5, read_timeout=5)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def call(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), dict(resp.getheaders())
    finally:
        conn.close()
        settle(srv)


def settle(srv, timeout: float = 5.0) -> None:
    """Wait until the server's handler threads have seen their connections close and freed the
    slots: the next call must not find two slots still held (a 503) on a loaded machine."""
    deadline = time.monotonic() + timeout
    while srv.open_connections and time.monotonic() < deadline:
        time.sleep(0.01)


def raw(srv, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=5) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


def test_routes_bodies_and_json_errors(server):
    status, body, _ = call(server, "POST", "/echo", b'{"a": 1}')
    assert (status, body) == (200, {"echo": '{"a": 1}'})
    status, body, _ = call(server, "GET", "/health")
    assert status == 200 and body["connections"]["max"] == 2
    status, body, _ = call(server, "POST", "/nowhere", b"{}")
    assert status == 404 and body["status"] == 404 and "/echo" in body["error"]
    status, body, headers = call(server, "GET", "/echo")
    assert status == 405 and headers["Allow"] == "POST"
    status, body, _ = call(server, "DELETE", "/health")
    assert status == 405
    status, body, _ = call(server, "POST", "/echo", b"x" * 65)
    assert status == 413 and "over the limit of 64" in body["error"]
    status, body, _ = call(server, "POST", "/echo", b"{}", headers={"Content-Length": "-1"})
    assert status == 400


def test_no_content_length_is_411(server):
    answer = raw(server, b"POST /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411") and b'"status": 411' in answer


def test_a_connection_past_the_limit_gets_503(server):
    port = server.server_address[1]
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        answer = raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"--max-connections" in answer
        assert server.refused == 1
    finally:
        for s in held:
            s.close()


def test_add_connection_args():
    ap = argparse.ArgumentParser()
    add_connection_args(ap, max_connections=7)
    args = ap.parse_args(["--read-timeout", "2.5"])
    assert (args.max_connections, args.idle_timeout, args.read_timeout) == (7, 60.0, 2.5)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        GuardedServer(("127.0.0.1", 0), Echo, max_connections=0)
