"""The model server under hostile input (issue 18, items 1 and 4), on a real ``--model
tiny-random`` process on 127.0.0.1 (context 2048, byte vocabulary): every cap answers 400/413
naming its flag, generation stops when the client goes or the deadline passes, connections are
bounded and timed out, SIGTERM exits cleanly, and random JSON never drops a connection."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.openai_server import ModelServerProcess

LONG = {"prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0, "stop": ["zzzz"]}  # 1-3 s on one core
HEAVY = {**LONG, "prompt": [LONG["prompt"]] * 8, "n": 8}  # 64 such generations: far longer than any deadline here


@pytest.fixture(scope="module")
def server():
    args = ["--threads", "1", "--max-connections", "8", "--idle-timeout", "2", "--read-timeout", "2"]
    with ModelServerProcess("tiny-random", args) as srv:
        yield srv


def post(srv, body, path="/completions", timeout=60):
    return requests.post(srv.url + path, json=body, timeout=timeout)


def raw(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, json.loads(resp.read() or b"{}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError("no Threads line")


def healthy(srv) -> dict:
    h = requests.get(srv.base + "/health", timeout=10).json()
    assert h["status"] == "ok"
    return h


def assert_400(r, status, *words):
    assert r.status_code == status, (r.status_code, r.text[:300])
    msg = r.json()["error"]["message"]
    for w in words:
        assert w in msg, msg


# -- caps on what a request may ask ----------------------------------------------------------------

def test_a_20mb_prompt_is_refused_not_tokenised(server):
    r = post(server, {"prompt": "x " * (10 << 20)})
    assert_400(r, 413, "--max-body-bytes")
    r = post(server, {"prompt": "x " * 300_000})  # 600 KB: under the body cap, over the characters one
    assert_400(r, 400, "--max-prompt-chars")
    r = post(server, {"messages": [{"role": "user", "content": "x " * 300_000}]}, "/chat/completions")
    assert r.status_code == 400
    healthy(server)


def test_a_million_ids_prompt_is_refused(server):
    r = post(server, {"prompt": [65] * 1_000_000, "max_tokens": 1})
    assert_400(r, 400, "1000000 tokens", "--max-prompt-tokens")


def test_prompt_and_max_tokens_must_fit_the_context(server):
    assert_400(post(server, {"prompt": [65] * 2100, "max_tokens": 1}), 400, "--max-prompt-tokens")
    assert_400(post(server, {"prompt": [65] * 2040, "max_tokens": 20}), 400, "context of 2048", "--max-model-len")
    r = post(server, {"prompt": [65] * 2040, "temperature": 0})  # no max_tokens: what the context leaves
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
    assert_400(post(server, {"prompt": [65] * 2048}), 400, "no room")
    assert post(server, {"prompt": [65] * 2048, "max_tokens": 0, "echo": True, "logprobs": 0}).status_code == 200


def test_huge_max_tokens_is_a_400(server):
    assert_400(post(server, {"prompt": "hi", "max_tokens": 1_000_000_000}), 400, "--max-new-tokens")


@pytest.mark.parametrize("field, value", [("temperature", 1e-300), ("temperature", 0.001), ("temperature", 101),
                                          ("temperature", -1), ("seed", 10**30), ("seed", -(2**63) - 1),
                                          ("top_p", 0), ("top_p", 1.5), ("top_k", -2), ("top_k", 10**40)])
def test_numeric_ranges_are_validated(server, field, value):
    r = post(server, {"prompt": "hi", "max_tokens": 2, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text[:300]


def test_numbers_in_range_still_work(server):
    for extra in [{"temperature": 0.01}, {"seed": -1}, {"seed": 2**62}, {"top_k": -1}, {"top_p": 1e-300}]:
        assert post(server, {"prompt": "hi", "max_tokens": 2, **extra}).status_code == 200, extra


@pytest.mark.parametrize("body, param, flag", [
    ({"prompt": "hi", "n": 99}, "n", "--max-n"),
    ({"prompt": "hi", "stop": [f"s{i}" for i in range(17)]}, "stop", "--max-stop"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs", "--max-logprobs"),
    ({"prompt": ["hi"] * 65}, "prompt", "--max-prompts"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs", "--max-logprobs"),
])
def test_each_cap_names_its_flag(server, body, param, flag):
    r = post(server, body, "/chat/completions" if "messages" in body else "/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == param and flag in r.json()["error"]["message"], r.text[:300]


def test_n_choices(server):
    got = post(server, {"prompt": ["hi", "yo"], "n": 3, "max_tokens": 4, "temperature": 0}).json()
    assert [c["index"] for c in got["choices"]] == list(range(6))
    assert len({c["text"] for c in got["choices"][:3]}) == 1  # greedy: the same three times
    a = post(server, {"prompt": "hi", "n": 2, "max_tokens": 8, "seed": 7}).json()["choices"]
    b = post(server, {"prompt": "hi", "n": 2, "max_tokens": 8, "seed": 7}).json()["choices"]
    assert [c["text"] for c in a] == [c["text"] for c in b]
    chat = post(server, {"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3}, "/chat/completions").json()
    assert [c["index"] for c in chat["choices"]] == [0, 1]


# -- HTTP: lengths, methods, JSON ------------------------------------------------------------------

@pytest.mark.parametrize("header, status", [("Content-Length: -1\r\n", 400), ("", 411), ("Content-Length: 1e3\r\n", 400),
                                            ("Transfer-Encoding: chunked\r\n", 411)])
def test_content_length_must_be_a_sane_number(server, header, status):
    got, payload = raw(server.port, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode() + b'{"prompt": "hi"}')
    assert got == status and payload["error"]["message"], payload
    healthy(server)


def test_wrong_method_is_405(server):
    for method, path in [("GET", "/v1/completions"), ("GET", "/v1/chat/completions"), ("POST", "/health"),
                         ("POST", "/v1/models"), ("PUT", "/v1/completions"), ("DELETE", "/health")]:
        r = requests.request(method, server.base + path, timeout=10)
        assert r.status_code == 405 and r.headers.get("Allow"), (method, path, r.status_code, r.text[:200])
    assert requests.get(server.base + "/nothing", timeout=10).status_code == 404


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
@pytest.mark.parametrize("body, words", [
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    (b'{"prompt":"hi","max_tokens":' + b"9" * 5000 + b"}", "digits"),
    (b'{"prompt":[' + b"9" * 5000 + b"]}", "digits"),
    (b'{"prompt":"hi","temperature":1e999}', "overflows"),
    (b'{"prompt":"hi","temperature":NaN}', "not valid JSON"),
    (b"\xff\xfe", "UTF-8"),
])
def test_hostile_json_is_a_400_not_a_dropped_connection(server, path, body, words):
    r = requests.post(server.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert_400(r, 400, words)


# -- cancellation, deadlines, connections, SIGTERM --------------------------------------------------

def test_generation_stops_when_the_client_disconnects(server):
    """Six long seeded requests (each runs alone, 1-3 s), their clients gone after 0.5 s: the
    next request is answered at once, not after 6-18 s of generation for nobody."""
    before = healthy(server).get("jobs", {}).get("cancelled", 0)
    socks = []
    for seed in range(6):
        body = json.dumps({**LONG, "seed": seed}).encode()
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        socks.append(s)
    time.sleep(0.5)
    for s in socks:
        s.close()
    time.sleep(0.3)
    t0 = time.monotonic()
    r = post(server, {"prompt": "hi", "max_tokens": 1}, timeout=60)
    took = time.monotonic() - t0
    assert r.status_code == 200
    assert took < 2.5, f"the next request waited {took:.1f} s behind abandoned generations"
    deadline = time.monotonic() + 5
    while healthy(server)["jobs"]["cancelled"] < before + 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert healthy(server)["jobs"]["cancelled"] >= before + 6


def test_idle_and_slow_connections_are_closed(server):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # half-open: sends nothing
        try:
            assert s.recv(100) == b""
        except TimeoutError:
            pytest.fail("an idle connection was still open after 10 s")
    assert time.monotonic() - t0 < 5
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:  # one byte every 0.5 s
        got = b""
        for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n" + b"x" * 30:
            try:
                s.sendall(bytes([byte]))
                s.settimeout(0.5)
                got = s.recv(4096)
                break
            except TimeoutError:
                continue
            except OSError:
                break
    assert time.monotonic() - t0 < 5 and (got == b"" or got.startswith(b"HTTP/1.1 408")), got[:80]
    healthy(server)


def test_connection_count_is_bounded(server):
    base = threads_of(server.proc.pid)
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(20)]
    try:
        time.sleep(0.5)
        assert threads_of(server.proc.pid) <= base + 8 + 1
        refused = 0
        for s in socks:
            s.settimeout(0.05)
            try:
                refused += s.recv(200).startswith(b"HTTP/1.1 503")
            except TimeoutError:
                pass
        assert refused >= 20 - 8
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            healthy(server)
            break
        except requests.RequestException:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_memory_returns_to_baseline_after_large_requests(server):
    post(server, {"prompt": [65] * 1000, "max_tokens": 4})  # warm
    base = rss_mb(server.proc.pid)
    for _ in range(3):
        assert post(server, {"prompt": [65] * 1_000_000, "max_tokens": 1}).status_code == 400
        assert post(server, {"prompt": "x " * 300_000}).status_code == 400
        assert post(server, {"prompt": [65] * 2000, "max_tokens": 40}).status_code == 200
    after = rss_mb(server.proc.pid)
    assert after <= base * 1.1 + 5, f"RSS {base:.0f} MB -> {after:.0f} MB"


@pytest.mark.slow
def test_deadline_and_sigterm():
    with ModelServerProcess("tiny-random", ["--threads", "1", "--request-timeout", "3", "--grace", "5"]) as srv:
        t0 = time.monotonic()
        r = post(srv, HEAVY)
        assert_400(r, 503, "--request-timeout")
        assert time.monotonic() - t0 < 5
        assert post(srv, {"prompt": "hi", "max_tokens": 2}).status_code == 200  # the worker is free again at once
        # SIGTERM with a generation in flight: it gets a 503 and the process exits 0, promptly
        got: dict = {}

        def call():
            try:
                got["r"] = post(srv, HEAVY, timeout=30)
            except requests.RequestException as exc:
                got["exc"] = exc

        th = threading.Thread(target=call)
        th.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(15)
        th.join(15)
        assert code == 0 and time.monotonic() - t0 < 5, srv.log_text()[-2000:]
        assert "r" in got, got
        assert_400(got["r"], 503, "shutting down")
        assert "stopped after" in srv.log_text()


def test_help_states_each_limit():
    out = subprocess.run([sys.executable, "-m", "agents.openai_server", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ["--max-body-bytes", "--max-model-len", "--max-prompt-tokens", "--max-prompt-chars", "--max-new-tokens",
                 "--max-prompts", "--max-n", "--max-stop", "--max-logprobs", "--request-timeout", "--max-connections",
                 "--idle-timeout", "--read-timeout"]:
        assert flag in out


# -- property-based: random and adversarial JSON ------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
fields = {
    "prompt": st.text(max_size=20) | st.lists(st.integers(-5, 300), max_size=8) | json_values,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", ""]),
                                                "content": st.text(max_size=20) | json_values}), max_size=3) | json_values,
    "max_tokens": st.integers(-2, 6) | st.integers() | json_values,
    "temperature": st.floats(allow_nan=False, allow_infinity=False) | json_values,
    "top_p": st.floats(allow_nan=False, allow_infinity=False), "top_k": st.integers(), "seed": st.integers(),
    "n": st.integers(-1, 3), "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3) | json_values,
    "logprobs": st.integers(-1, 3) | st.booleans(), "top_logprobs": st.integers(-1, 3), "echo": st.booleans() | json_values,
}
bodies = st.fixed_dictionaries({}, optional=fields).map(lambda d: json.dumps(d).encode())
fragments = st.sampled_from([b"[", b"]", b"{", b"}", b'"', b",", b":", b"9" * 5000, b"-", b"1e999", b"NaN", b'"prompt"',
                             b'"max_tokens"', b"\\u0000", b"\\ud800", b"null", b"\xff", b"\x00"])
adversarial = st.lists(fragments, max_size=30).map(b"".join) | st.builds(
    lambda open_, n: open_ * n, st.sampled_from([b"[", b'{"a":', b'{"prompt":']), st.integers(0, 50_000))


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(["/completions", "/chat/completions"]), body=st.one_of(bodies, adversarial))
def test_every_random_body_gets_a_json_answer(server, session, path, body):
    r = session.post(server.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code in (200, 400), (r.status_code, r.text[:300])
    payload = r.json()
    assert ("error" in payload) == (r.status_code != 200)
