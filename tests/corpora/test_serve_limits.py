"""The retrieval server under hostile input (issue 18, items 4 and 7), and the JSON guard that
both servers and the env share: every request gets an answer (never a dropped connection),
responses and connections are bounded, slow and half-open clients are cut off."""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corpora.jsonguard import JSONGuardError, depth, loads
from corpora.retrievers import bundled_index_dir
from corpora.serve import Limits, RequestError, ServerProcess, parse_request

DEEP = ("[" * 100_000 + "]" * 100_000).encode()
GIANT_TOPK = b'{"queries":["a"],"topk":' + b"9" * 5000 + b"}"


@pytest.fixture(scope="module")
def server():
    # small timeouts and connection count so that the deadlines show within seconds
    args = ["--max-connections", "8", "--idle-timeout", "3", "--read-timeout", "2", "--max-results", "1000"]
    srv = ServerProcess(bundled_index_dir(), extra_args=args).start()
    yield srv
    code = srv.stop()
    assert code == 0, srv.log_text()[-3000:]


def raw(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    """Send raw bytes on a fresh connection; the status and JSON body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, json.loads(resp.read() or b"{}")


def post(port: int, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError("no Threads line")


def alive(srv) -> bool:
    return requests.get(srv.url + "/health", timeout=10).json()["status"] == "ok"


# -- item 4: JSON that dropped the connection -----------------------------------------------------

@pytest.mark.parametrize("path", ["/retrieve", "/page"])
@pytest.mark.parametrize("body, words", [
    (DEEP, "nested deeper"),
    (GIANT_TOPK, "digits"),
    (b'{"title":' + b"9" * 5000 + b"}", "digits"),
    (b'{"queries":["a"],"topk":NaN}', "not valid JSON"),
    (b'{"queries":["a"],"topk":1e999}', "overflows"),
    (b'{"queries":["a"],"topk":3}' + b" " * 10, ""),  # (valid on /retrieve, a 400 on /page)
])
def test_hostile_json_gets_an_answer_not_a_dropped_connection(server, path, body, words):
    status, payload = raw(server.port, post(server.port, path, body))
    if words:
        assert status == 400 and words in payload["error"], (status, payload)
    else:
        assert status in (200, 400)
    assert alive(server)


# -- item 7: amplification, slow clients, half-open connections -----------------------------------

def test_queries_times_topk_is_capped(server):
    r = requests.post(server.url + "/retrieve", json={"queries": ["Ed Wood film"] * 256, "topk": 100}, timeout=30)
    assert r.status_code == 413 and "--max-results" in r.json()["error"], r.text[:300]
    assert len(r.content) < 1000  # the refusal is small, not 20 MB of passages
    ok = requests.post(server.url + "/retrieve", json={"queries": ["Ed Wood film"] * 10, "topk": 100}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["result"]) == 10


def test_slow_client_is_cut_off_by_the_read_deadline(server):
    """One byte every 0.5 s: the server answers 408 and closes at the 2 s deadline, not when the
    client stops (it would go on for 12 s)."""
    body = b'{"queries": ["Ed Wood"]}'
    data = post(server.port, "/retrieve", body)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
        got = b""
        for byte in data:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            s.settimeout(0.5)
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                chunk = None
            if chunk is not None:  # an answer, or the close
                got += chunk
                break
            if time.monotonic() - t0 > 12:
                break
    held = time.monotonic() - t0
    assert held < 5, f"the slow connection was held for {held:.1f} s"
    assert got == b"" or got.startswith(b"HTTP/1.1 408"), got[:100]
    assert alive(server)


def test_idle_connection_is_closed(server):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        try:
            assert s.recv(100) == b""  # closed by the server
        except TimeoutError:
            pytest.fail("an idle connection was still open after 10 s")
    assert time.monotonic() - t0 < 6


def test_connection_count_is_bounded(server):
    """30 half-open connections: 8 get a thread each, the rest a 503 and a close; the thread
    count stays bounded; once they go, the server answers again."""
    base = threads_of(server.proc.pid)
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(30)]
    try:
        time.sleep(0.5)
        assert threads_of(server.proc.pid) <= base + 8 + 1
        refused = 0
        for s in socks:
            s.settimeout(0.05)
            try:
                head = s.recv(200)
            except TimeoutError:
                continue
            if head.startswith(b"HTTP/1.1 503"):
                refused += 1
        assert refused >= 30 - 8
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            health = requests.get(server.url + "/health", timeout=5).json()
            break
        except requests.RequestException:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert health["connections"]["max"] == 8 and health["connections"]["refused"] >= 22


def test_wrong_methods_get_405_with_allow(server):
    for method, path in [("POST", "/health"), ("PUT", "/retrieve"), ("DELETE", "/page"), ("GET", "/retrieve")]:
        r = requests.request(method, server.url + path, timeout=10)
        assert r.status_code == 405 and r.headers["Allow"], (method, path, r.status_code, r.text)
    assert requests.put(server.url + "/nope", timeout=10).status_code == 404


@pytest.mark.parametrize("header, status", [("", 411), ("Content-Length: -1\r\n", 400), ("Content-Length: abc\r\n", 400),
                                            ("Content-Length: 99999999999999999999999\r\n", 400),
                                            ("Content-Length: 5000000\r\n", 413)])
def test_content_length_must_be_a_sane_number(server, header, status):
    got, payload = raw(server.port, f"POST /retrieve HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode() + b"{}")
    assert got == status and payload["error"], payload
    assert alive(server)


def test_help_states_each_limit():
    out = subprocess.run([sys.executable, "-m", "corpora.serve", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ["--max-body-bytes", "--max-queries", "--max-query-chars", "--max-topk", "--max-results",
                 "--max-connections", "--idle-timeout", "--read-timeout", "--request-timeout"]:
        assert flag in out
    assert "queries x topk" in out and "408" in out and "503" in out


def test_parse_request_caps_results():
    lim = Limits(max_queries=10, max_topk=10, max_results=20)
    assert parse_request(b'{"queries": ["a", "b"], "topk": 10}', lim)[1] == 10
    with pytest.raises(RequestError) as err:
        parse_request(b'{"queries": ["a", "b", "c"], "topk": 10}', lim)
    assert err.value.status == 413 and "--max-results" in err.value.message
    for body in (DEEP, GIANT_TOPK, b"\xff"):
        with pytest.raises(RequestError) as err:
            parse_request(body, Limits())
        assert err.value.status == 400


def test_batcher_caps_results_per_batch():
    """Waiting requests join one index call only while queries x k stays within max_results."""
    from corpora.serve import MicroBatcher

    calls = []
    gate = __import__("threading").Event()

    def search(queries, k):
        gate.wait(5)
        calls.append((len(queries), k))
        return [[q] * k for q in queries]

    b = MicroBatcher(search, max_batch=512, max_results=100)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        first = pool.submit(b.submit, ["q"], 1)  # occupies the worker until the gate opens
        time.sleep(0.2)
        futs = [pool.submit(b.submit, ["a"] * 10, 5) for _ in range(4)]  # 4 x 50 results
        time.sleep(0.2)
        gate.set()
        assert [len(f.result()) for f in futs] == [10] * 4 and first.result() == [["q"]]
    b.close()
    assert calls[0] == (1, 1) and all(n * k <= 100 for n, k in calls[1:]) and len(calls) == 3, calls


# -- the shared JSON guard --------------------------------------------------------------------------

def test_jsonguard_limits():
    assert loads(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    assert loads("[" * 10 + "]" * 10, max_depth=10) == loads("[" * 10 + "]" * 10, max_depth=10)
    assert depth([[[]]]) == 3 and depth(1) == 0 and depth({"a": {"b": []}}) == 3
    cases = [(DEEP, "nested deeper"), ("[" * 11 + "]" * 11, "nested deeper"), ("9" * 5000, "digits"),
             ("-" + "9" * 65, "digits"), ("NaN", "finite"), ("[Infinity]", "finite"), ("1e400", "overflows"),
             (b"\xff\xfe", "UTF-8"), ("x" * 101, "over the limit"), ("{", "malformed"), ("", "malformed"), (3, "expected")]
    for text, words in cases:
        with pytest.raises(JSONGuardError, match=words):
            loads(text, max_bytes=100 if text == "x" * 101 else 1 << 20, max_depth=10)
    assert loads("9" * 64) == int("9" * 64)  # at the limit
    assert loads('["' + "9" * 5000 + '"]') == ["9" * 5000]  # digits inside a string are no integer


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_jsonguard_raises_only_its_own_error(data):
    try:
        loads(data, max_depth=8, max_int_digits=10)
    except JSONGuardError:
        pass


# -- property-based: random and adversarial bodies over HTTP -----------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
requests_like = st.fixed_dictionaries({}, optional={
    "queries": st.lists(st.text(max_size=30), max_size=5) | json_values,
    "topk": st.integers(-5, 200) | json_values,
    "return_scores": st.booleans() | json_values,
    "title": st.text(max_size=30) | json_values,
}).map(lambda d: json.dumps(d).encode())
fragments = st.sampled_from([b"[", b"]", b"{", b"}", b'"', b",", b":", b"9" * 5000, b"-", b"1e999", b"NaN",
                             b'"queries"', b'"topk"', b"\\u0000", b"\\ud800", b"null", b"\xff", b"\x00"])
adversarial = st.lists(fragments, max_size=30).map(b"".join) | st.builds(
    lambda open_, n: open_ * n, st.sampled_from([b"[", b'{"a":', b'{"queries":']), st.integers(0, 50_000))


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(["/retrieve", "/page"]), body=st.one_of(requests_like, adversarial, json_values.map(lambda v: json.dumps(v).encode())))
def test_every_random_body_gets_a_json_answer(server, session, path, body):
    r = session.post(server.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=20)
    assert r.status_code in (200, 400, 404, 413), (r.status_code, r.text[:200])
    payload = r.json()
    assert ("error" in payload) == (r.status_code != 200)


def test_http_retriever_splits_batches_under_the_results_cap(server):
    """300 queries at k=20 (6,000 results) cross the server's queries x topk cap: the client sends
    them in pieces that fit, and gets every list back in order."""
    from corpora.http_client import HttpRetriever

    cap = int(server.extra_args[server.extra_args.index("--max-results") + 1]) if "--max-results" in server.extra_args else 4096
    r = HttpRetriever(server.url, max_results=cap)
    queries = [f"film director {i}" for i in range(300)]
    hits = r.search(queries, k=20)
    assert len(hits) == 300 and all(len(h) == 20 for h in hits)
    assert hits[7] == r.search([queries[7]], k=20)[0]
