"""A teacher pool (``teacher.url=URL1,URL2``): ``HttpTeacher`` spreads requests round robin over
real HTTP servers on 127.0.0.1, fails over when one dies, skips it while it is down (no request
waits a timeout for it again), probes it after the cool-down, and counts requests and failures
per endpoint."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from common.subprocess_server import free_port
from distill.config import ConfigError, resolve
from distill.teachers import make_teacher
from distill.teachers.http import HttpTeacher, TeacherRequestError


class Chat(BaseHTTPRequestHandler):
    """A chat endpoint that answers ``Score: 7``; counts its requests and the pool's in flight."""

    def log_message(self, *a):
        pass

    def do_GET(self):  # /v1/models: the server is up
        self._send({"data": [{"id": "t"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        owner = self.server.owner
        with owner.lock:
            owner.hits += 1
            owner.flight[0] += 1
            owner.flight[1] = max(owner.flight[1], owner.flight[0])
        time.sleep(owner.delay)
        with owner.lock:
            owner.flight[0] -= 1
        self._send({"choices": [{"message": {"role": "assistant", "content": "Score: 7"}}]})

    def _send(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Server:
    """One chat server on 127.0.0.1 (``port`` 0: a free one); ``flight`` = [in flight now, peak],
    shared by the servers of one test."""

    def __init__(self, port: int = 0, flight: list | None = None, delay: float = 0.0):
        self.lock, self.hits, self.delay = threading.Lock(), 0, delay
        self.flight = flight if flight is not None else [0, 0]
        self.srv = ThreadingHTTPServer(("127.0.0.1", port), Chat)
        self.srv.daemon_threads = True
        self.srv.owner = self
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def kill(self) -> None:
        """Stop serving and close the listening socket: new connections are refused."""
        self.srv.shutdown()
        self.srv.server_close()


def msgs(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"rate trajectory {i}"}] for i in range(n)]


@pytest.fixture
def servers():
    flight = [0, 0]
    pair = [Server(flight=flight, delay=0.02), Server(flight=flight, delay=0.02)]
    yield pair
    for s in pair:
        try:
            s.kill()
        except OSError:
            pass


def test_requests_are_spread_round_robin_within_concurrency(servers):
    a, b = servers
    teacher = HttpTeacher(f"{a.url},{b.url}", timeout=5, concurrency=3)
    assert teacher.bases == [a.url, b.url] and teacher.name == f"{a.url},{b.url}"
    assert teacher.score(msgs(12)) == ["Score: 7"] * 12
    assert (a.hits, b.hits) == (6, 6)
    assert 1 < a.flight[1] <= 3  # concurrent, but never more than `concurrency` in flight over the pool
    assert teacher.pool_stats() == {u: {"requests": 6, "failures": 0, "last_error": "", "down": False} for u in (a.url, b.url)}
    assert teacher.stats["requests"] == 12 and teacher.stats["retries"] == teacher.stats["errors"] == 0
    assert teacher.check() == [] and teacher.down() == []


def test_a_killed_endpoint_is_skipped_and_used_again_after_its_cooldown(servers):
    a, b = servers
    teacher = HttpTeacher([a.url, b.url], timeout=5, concurrency=4, retries=0, down_seconds=2.0)
    assert teacher.score(msgs(8)) == ["Score: 7"] * 8
    assert (a.hits, b.hits) == (4, 4)

    a.kill()  # mid-run, between two batches
    assert teacher.score(msgs(8)) == ["Score: 7"] * 8  # retries=0: each failed request went on to b at once
    failed = teacher.pool_stats()[a.url]["failures"]
    assert 1 <= failed <= 4  # the requests already on their way to a when it was found dead
    assert teacher.down() == [a.url] and "ConnectionError" in teacher.pool_stats()[a.url]["last_error"]
    sent_to_a = teacher.pool_stats()[a.url]["requests"]
    assert teacher.score(msgs(8)) == ["Score: 7"] * 8
    assert teacher.pool_stats()[a.url]["requests"] == sent_to_a  # skipped while down: nothing more sent to it
    assert b.hits == 4 + 16 and teacher.stats["errors"] == 0

    back = Server(port=a.port, flight=a.flight)  # the same endpoint comes back
    try:
        assert teacher.score(msgs(4)) == ["Score: 7"] * 4
        assert back.hits == 0  # still cooling down
        time.sleep(2.1)
        assert teacher.score(msgs(1)) == ["Score: 7"]  # the probe
        assert back.hits == 1 and teacher.down() == []
        assert teacher.score(msgs(8)) == ["Score: 7"] * 8
        assert back.hits == 1 + 4  # round robin again
        stats = teacher.pool_stats()[a.url]
        assert stats["failures"] == failed and not stats["down"]
    finally:
        back.kill()


def test_a_hanging_endpoint_costs_one_timeout_per_cooldown(servers):
    """A dead host that accepts connections and never answers: the request that finds it waits
    one timeout and goes on to the other endpoint; no later request waits for it."""
    a, b = servers
    timeout = 1.0
    teacher = HttpTeacher([a.url, b.url], timeout=timeout, concurrency=1, retries=0, down_seconds=60)
    assert teacher.score(msgs(2)) == ["Score: 7"] * 2
    a.kill()
    hole = socket.socket()
    hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hole.bind(("127.0.0.1", a.port))
    hole.listen(16)  # connections complete in the kernel; nothing ever reads or answers them
    try:
        waits = []
        for m in msgs(10):
            t0 = time.perf_counter()
            assert teacher.score([m]) == ["Score: 7"]
            waits.append(time.perf_counter() - t0)
    finally:
        hole.close()
    slow = [w for w in waits if w >= timeout]
    assert len(slow) == 1 and sum(waits) - slow[0] < timeout, waits
    assert teacher.pool_stats()[a.url]["requests"] == 1 + 1 and teacher.pool_stats()[a.url]["failures"] == 1
    assert teacher.stats["timeouts"] == 1 and teacher.stats["errors"] == 0 and teacher.down() == [a.url]


def test_check_passes_with_one_endpoint_up_and_names_every_dead_one():
    dead1, dead2 = f"http://127.0.0.1:{free_port()}/v1", f"http://127.0.0.1:{free_port()}/v1"
    live = Server()
    try:
        teacher = HttpTeacher([dead1, live.url], timeout=2, down_seconds=60)
        assert teacher.check() == [dead1]  # reported, and marked down before any step runs
        assert teacher.down() == [dead1] and teacher.pool_stats()[dead1]["failures"] == 1
        assert teacher.score(msgs(4)) == ["Score: 7"] * 4 and live.hits == 4
        assert teacher.pool_stats()[dead1]["requests"] == 0
    finally:
        live.kill()

    pool = HttpTeacher(f"{dead1},{dead2}", timeout=2, retries=1, backoff=0.01, concurrency=1)
    with pytest.raises(TeacherRequestError) as err:
        pool.check()
    msg = str(err.value)
    assert "cannot be reached at any of its 2 endpoints" in msg and f"{dead1} (ConnectionError)" in msg and f"{dead2} (ConnectionError)" in msg
    # requests to a pool that is all down come back None (dropped, never a score), counted per endpoint
    assert pool.score(msgs(3)) == [None] * 3
    assert pool.stats["errors"] == 3
    assert all(s["failures"] == 3 * 2 and s["down"] for s in pool.pool_stats().values())  # 3 items x 2 rounds


def test_single_url_unchanged():
    teacher = HttpTeacher("http://127.0.0.1:1/")
    assert (teacher.bases, teacher.base, teacher.name) == (["http://127.0.0.1:1/v1"], "http://127.0.0.1:1/v1", "http://127.0.0.1:1")
    with pytest.raises(TeacherRequestError, match=r"^teacher http://127\.0\.0\.1:1/v1 cannot be reached: ConnectionError$"):
        teacher.check()
    with pytest.raises(ValueError, match="twice"):
        HttpTeacher("http://a:1/v1,http://a:1")
    with pytest.raises(ValueError, match="must start with http"):
        HttpTeacher("http://a:1/v1,b:2")


@pytest.mark.parametrize("url", ["http://a:1/v1,http://b:2/v1", "[http://a:1/v1,http://b:2/v1]", "'http://a:1/v1,http://b:2/v1'"])
def test_config_takes_a_pool(url, capsys):
    from distill.run import main

    assert main(["method=ovd", "teacher=http", f"teacher.url={url}", "teacher.down_seconds=5", "--cfg"]) == 0
    out = capsys.readouterr().out
    assert "url: http://a:1/v1,http://b:2/v1" in out and "down_seconds: 5.0" in out
    cfg, _ = resolve(["method=ovd", "teacher=http", f"teacher.url={url}", "teacher.down_seconds=5"])
    teacher = make_teacher(cfg.teacher)
    assert teacher.bases == ["http://a:1/v1", "http://b:2/v1"] and teacher.down_seconds == 5.0


@pytest.mark.parametrize("url", ["http://a:1/v1,b:2/v1", "http://a:1/v1,", "http://a:1/v1,http://a:1/v1/"])
def test_a_bad_pool_names_teacher_url(url):
    with pytest.raises(ConfigError, match=r"^teacher\.url: .*several separated by commas, each once"):
        resolve(["method=ovd", "teacher=http", f"teacher.url={url}"])


@pytest.mark.slow
def test_training_logs_per_endpoint_counts(tmp_path):
    """An ovd run whose pool has a dead endpoint from the start: the run goes on through the live
    one and metrics.jsonl counts each endpoint."""
    from distill.train import train

    live, dead = Server(), f"http://127.0.0.1:{free_port()}/v1"
    try:
        cfg, mcfg = resolve(["model=tiny", "method=ovd", "method.mode=reward", "method.grader.readout=digit",
                             "teacher=http", f"teacher.url={live.url},{dead}", "teacher.timeout=5", "teacher.down_seconds=600",
                             "env.id=ToyVowel-v0", "env.eval_id=ToyVowel-eval-v0", "steps=2", "questions_per_step=1",
                             "group_size=2", "max_tokens_per_turn=4", "max_total_tokens=32", "eval.questions=0",
                             "progress=false", "threads=1"])
        train(cfg, mcfg, tmp_path / "run", resume=False)
    finally:
        live.kill()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    assert len(lines) == 2 and sum(x["dropped"] for x in lines) == 0
    assert last["teacher_endpoint0_requests_total"] == live.hits > 0 and last["teacher_endpoint0_failures_total"] == 0
    assert last["teacher_endpoint1_requests_total"] == 0 and last["teacher_endpoint1_failures_total"] == 1  # from check()
    assert (last["teacher_endpoint0_down"], last["teacher_endpoint1_down"]) == (0, 1)


@pytest.mark.slow
def test_pool_of_two_model_servers_survives_a_sigkill():
    """Two ``agents.openai_server`` processes (tiny random model); one is killed mid-run."""
    from types import SimpleNamespace

    from agents.openai_server import ModelServerProcess

    s1 = ModelServerProcess("tiny-random", ["--threads", "1"]).start(wait=False)
    s2 = ModelServerProcess("tiny-random", ["--threads", "1"]).start(wait=False)
    try:
        assert s1.wait_ready() and s2.wait_ready()
        teacher = HttpTeacher([s1.url, s2.url], timeout=60, concurrency=2, retries=0)
        assert teacher.check() == []
        sampling = SimpleNamespace(max_new_tokens=3, temperature=0.0, top_p=1.0, stop=[], seed=None)
        assert all(isinstance(r, str) for r in teacher.chat(msgs(4), sampling))
        assert [s["requests"] for s in teacher.pool_stats().values()] == [2, 2]
        s1.kill()  # SIGKILL between two batches
        assert all(isinstance(r, str) for r in teacher.chat(msgs(6), sampling))
        assert all(isinstance(r, str) for r in teacher.chat(msgs(4), sampling))
        p = teacher.pool_stats()
        assert teacher.down() == [s1.url] and 1 <= p[s1.url]["failures"] <= 2 and p[s1.url]["requests"] == 2 + p[s1.url]["failures"]
        assert teacher.stats["errors"] == 0
    finally:
        s1.stop()
        s2.stop()
