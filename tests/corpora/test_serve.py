"""The retrieval server as a real subprocess on loopback, driven by plain ``requests`` calls
written to Search-R1's request format, against the in-process ``BM25Index``."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from corpora.corpus import Passage
from corpora.http_client import HttpRetriever, RetrievalError, parse_contents
from corpora.index import BM25Index
from corpora.qa import load_qa
from corpora.retrievers import bundled_index_dir
from corpora.serve import Limits, MicroBatcher, RequestError, ServerProcess, parse_request


@pytest.fixture(scope="module")
def index_dir():
    return bundled_index_dir()


@pytest.fixture(scope="module")
def index(index_dir):
    return BM25Index(index_dir)


@pytest.fixture(scope="module")
def server(index_dir):
    args = ["--max-queries", "64", "--max-topk", "50", "--max-body-bytes", "65536", "--batch-wait-ms", "2"]
    srv = ServerProcess(index_dir, extra_args=args).start()
    yield srv
    code = srv.stop()
    assert code == 0, srv.log_text()[-3000:]


def questions(n: int) -> list[str]:
    return [q["question"] for q in load_qa("hotpotqa", limit=n)]


def search_r1_call(url: str, queries: list[str], topk: int = 3, return_scores: bool = True) -> list:
    """What Search-R1's generation code does: POST the batch, read ``result``."""
    payload = {"queries": queries, "topk": topk, "return_scores": return_scores}
    return requests.post(url + "/retrieve", json=payload, timeout=30).json()["result"]


def expected_docs(hits) -> list[dict]:
    return [{"id": h.doc_id, "contents": Passage(h.doc_id, h.title, h.text).contents()} for h in hits]


def test_search_r1_client_gets_the_in_process_results(server, index):
    qs = questions(40) + ["Fuding", "Saint Philip, Barbados", "zzzz qqqq no such words", ""]
    got = search_r1_call(server.url, qs, topk=5)
    want = index.search(qs, k=5)
    assert len(got) == len(qs)
    for row, hits in zip(got, want):
        assert [item["document"] for item in row] == expected_docs(hits)
        assert [item["score"] for item in row] == [h.score for h in hits]  # bit for bit
    docs_only = search_r1_call(server.url, qs[:5], topk=2, return_scores=False)
    assert docs_only == [expected_docs(h) for h in index.search(qs[:5], k=2)]
    # Search-R1's own formatting of the answer works unchanged
    content = got[0][0]["document"]["contents"]
    assert content.split("\n")[0].strip('"') == want[0][0].title


def test_http_retriever_hits_identical(server, index):
    qs = questions(30) + ["Fuding", "Saint Philip, Barbados", "Joachim Zachris Duncker"]  # texts with edge white space
    r = HttpRetriever([server.url])
    assert r.search(qs, k=4) == index.search(qs, k=4)
    assert r.search([], k=3) == [] and r.search(["zzzz qqqq"], k=3) == [[]]
    small = HttpRetriever([server.url], max_batch=7)  # split into pieces client-side
    assert small.search(qs, k=2) == index.search(qs, k=2)
    with pytest.raises(TypeError):
        r.search("a single string", k=3)


def test_parse_contents_inverts_passage_contents():
    for title, text in [("Ed Wood", "text"), ('"Heroes" (song)', "a\nb "), ("T", "   lead"), ("", "x")]:
        assert parse_contents(Passage("1", title, text).contents()) == (title, text)
    assert parse_contents("Plain title\n text ") == ("Plain title", "text")  # other servers' format


BAD_BODIES = [
    (b"{not json", 400, "malformed JSON"),
    (b"\xff\xfe", 400, "UTF-8"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"queries": "one string"}', 400, "list of strings"),
    (b'{"queries": [1, 2]}', 400, "list of strings"),
    (b'{"queries": ["a"], "topk": "3"}', 400, "integer"),
    (b'{"queries": ["a"], "topk": 0}', 400, "between 1 and 50"),
    (b'{"queries": ["a"], "topk": 51}', 400, "between 1 and 50"),
    (b'{"queries": ["a"], "topk": true}', 400, "integer"),
    (b'{"queries": ["a"], "return_scores": "yes"}', 400, "true or false"),
    (b'{"queries": ["a"], "bogus": 1}', 400, "unknown field"),
    (json.dumps({"queries": ["q"] * 65}).encode(), 413, "too many queries"),
    (json.dumps({"queries": ["x" * 5000]}).encode(), 400, "characters"),
    (json.dumps({"queries": ["y" * 4000] * 20}).encode(), 413, "over the limit"),
]


def test_bad_requests_get_clear_errors_and_server_stays_up(server, index):
    s = requests.Session()  # one keep-alive connection through all the errors
    for body, status, words in BAD_BODIES:
        r = s.post(server.url + "/retrieve", data=body, headers={"Content-Type": "application/json"}, timeout=10)
        assert r.status_code == status, (body[:60], r.text)
        assert words in r.json()["error"], (body[:60], r.json())
        ok = s.post(server.url + "/retrieve", json={"queries": ["Ed Wood"], "topk": 1}, timeout=10)
        assert ok.status_code == 200
    assert s.get(server.url + "/nope").status_code == 404
    assert s.get(server.url + "/retrieve").status_code == 405
    assert s.post(server.url + "/other", json={}).status_code == 404
    r = requests.post(server.url + "/retrieve", data=iter([b'{"queries": ["a"]}']), timeout=10)  # chunked
    assert r.status_code == 411
    default_k = s.post(server.url + "/retrieve", json={"queries": ["Ed Wood film director"]}, timeout=10).json()
    assert len(default_k["result"][0]) == 3 and "score" not in default_k["result"][0][0]  # Search-R1 defaults
    health = s.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["num_passages"] == len(index)
    assert health["requests"]["by_status"]["400"] >= 10 and health["requests"]["by_status"]["413"] >= 2
    assert health["uptime_s"] > 0 and health["limits"]["max_queries"] == 64


def test_client_raises_value_error_on_4xx(server):
    r = HttpRetriever([server.url], max_batch=1000)
    with pytest.raises(ValueError, match="too many queries"):
        r.search(["q"] * 65, k=3)


def test_concurrent_requests_are_batched(server, index):
    qs = questions(64)
    before = requests.get(server.url + "/health").json()["batcher"]
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda q: search_r1_call(server.url, [q], topk=3), qs))
    after = requests.get(server.url + "/health").json()["batcher"]
    want = index.search(qs, k=3)
    assert [[it["document"]["id"] for it in g[0]] for g in got] == [[h.doc_id for h in w] for w in want]
    batches = after["batches"] - before["batches"]
    assert batches < len(qs), f"{len(qs)} concurrent requests took {batches} index calls"


def test_graceful_shutdown_on_sigterm(index_dir):
    srv = ServerProcess(index_dir, extra_args=["--batch-wait-ms", "0"]).start()
    try:
        assert search_r1_call(srv.url, ["Ed Wood"], topk=1)
    finally:
        code = srv.stop()
    assert code == 0
    log = srv.log_text()
    assert "SIGTERM: stopping" in log and "1 ok requests" in log
    assert "stopped after" in log and "1 requests {'200': 1}, 1 queries in 1 batches" in log


def test_all_replicas_down_raises_clear_error():
    from common.subprocess_server import free_port

    urls = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    r = HttpRetriever(urls, retries=1, backoff=0.01, timeout=(0.5, 2))
    t0 = time.perf_counter()
    with pytest.raises(RetrievalError, match="all 2 retrieval server"):
        r.search(["x"], k=1)
    assert time.perf_counter() - t0 < 5
    assert r.failures_by_url == {u + "/retrieve": 2 for u in urls}


# -- the micro-batcher in process ------------------------------------------------------------------
def test_micro_batcher_coalesces_and_splits_by_topk():
    calls = []
    gate = threading.Event()

    def search(queries, k):
        calls.append((list(queries), k))
        gate.wait(5)
        return [[(q, i) for i in range(k)] for q in queries]

    b = MicroBatcher(search, max_batch=100, max_wait_ms=5)
    results = {}

    def one(i):
        results[i] = b.submit([f"q{i}", f"r{i}"], k=1 + i % 3)

    first = threading.Thread(target=one, args=(0,))
    first.start()
    time.sleep(0.3)  # the first batch is running and blocked: the others queue up
    threads = [threading.Thread(target=one, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    gate.set()
    for t in [first, *threads]:
        t.join(5)
    b.close()
    assert len(calls) == 2 and len(calls[1][0]) == 16 and calls[1][1] == 3
    for i in range(9):
        k = 1 + i % 3
        assert results[i] == [[(f"q{i}", j) for j in range(k)], [(f"r{i}", j) for j in range(k)]]
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(["x"], 1)


def test_micro_batcher_caps_batch_size_and_propagates_errors():
    sizes = []

    def search(queries, k):
        sizes.append(len(queries))
        if "boom" in queries:
            raise KeyError("boom")
        time.sleep(0.02)
        return [[q] for q in queries]

    b = MicroBatcher(search, max_batch=10, max_wait_ms=20)
    with ThreadPoolExecutor(20) as pool:
        out = list(pool.map(lambda i: b.submit([f"a{i}", f"b{i}", f"c{i}"], 1), range(20)))
    assert out == [[[f"a{i}"], [f"b{i}"], [f"c{i}"]] for i in range(20)]
    assert max(sizes) <= 10 and len(sizes) < 20
    with pytest.raises(KeyError):
        b.submit(["boom"], 1)
    assert b.submit(["fine"], 1) == [["fine"]]
    with ThreadPoolExecutor(4) as pool:  # a failing request does not fail its batch-mates
        futs = [pool.submit(b.submit, [q], 1) for q in ["x", "boom", "y", "z"]]
    assert [f.exception() is not None for f in futs] == [False, True, False, False]
    assert futs[3].result() == [["z"]]
    b.close()


def test_parse_request_limits():
    lim = Limits(max_queries=2, max_query_chars=5, max_topk=4, default_topk=2)
    assert parse_request(b'{"queries": ["a", "b"]}', lim) == (["a", "b"], 2, False)
    assert parse_request(b'{"queries": [], "topk": 4, "return_scores": true}', lim) == ([], 4, True)
    for body, status in [(b'{"queries": ["a", "b", "c"]}', 413), (b'{"queries": ["abcdef"]}', 400), (b'{"queries": ["a"], "topk": 5}', 400)]:
        with pytest.raises(RequestError) as err:
            parse_request(body, lim)
        assert err.value.status == status


def test_page_endpoint_serves_the_page_store(server, index):
    from corpora.pages import PageStore

    store = PageStore(index)
    r = requests.post(server.url + "/page", json={"title": "Albedo"}, timeout=30)
    assert r.status_code == 200 and r.json() == {"title": "Albedo", "text": store.text("Albedo")}
    assert len(r.json()["text"].split()) > 3000  # the full KILT page
    r = requests.get(server.url + "/page", params={"title": "https://en.wikipedia.org/wiki/Ed_Wood"}, timeout=30)
    assert r.status_code == 200 and r.json()["title"] == "Ed Wood" and r.json()["text"] == store.text("Ed Wood")
    r = requests.post(server.url + "/page", json={"title": "Ed Woood film director"}, timeout=30)
    assert r.status_code == 404 and r.json()["suggestions"] == store.suggest("Ed Woood film director")
    for bad in ({"name": "Albedo"}, {"title": 3}, {"title": "  "}):
        assert requests.post(server.url + "/page", json=bad, timeout=30).status_code == 400
    assert requests.post(server.url + "/page", data=b"{oops", timeout=30).status_code == 400
    client = HttpRetriever(server.url)
    assert client.page("ed_wood") == ("Ed Wood", store.text("Ed Wood"))
    assert client.page("No Such Page 123 zzzz") is None
    assert requests.post(server.url + "/retrieve", json={"queries": ["Ed Wood"]}, timeout=30).status_code == 200


def test_webqa_browses_over_http_like_in_process(server):
    """An env whose retriever is the server browses through ``/page``: same observations as the
    in-process page store, suggestions included."""
    import gymnasium as gym

    import envs  # noqa: F401

    actions = ["<search>Ed Wood filmmaker</search>", "<browse>ed_wood#2</browse>", "<browse>Ed Woood film director</browse>",
               "<answer>American</answer>"]
    seen = []
    for spec in ("bundled", server.url):
        env = gym.make("WebQA-v0", retriever=spec, max_turns=6)
        env.reset(options={"question_id": env.unwrapped.questions[0]["id"]})
        seen.append([env.step(a)[0] for a in actions])
    assert seen[0] == seen[1]
    assert "Page: Ed Wood (part " in seen[1][1] and "Did you mean:" in seen[1][2]


def search_r1_reference(result_row: list[dict]) -> str:
    """The observation Search-R1's client builds from one query's ``/retrieve`` result, written
    out from its documented behaviour: per hit, ``Doc i(Title: <first line of contents>) <the
    other lines>`` plus a newline; all of it stripped and wrapped in <information> tags with two
    newlines on each side."""
    text = ""
    for i, item in enumerate(result_row):
        lines = item["document"]["contents"].split("\n")
        text += "Doc " + str(i + 1) + "(Title: " + lines[0] + ") " + "\n".join(lines[1:]) + "\n"
    return "\n\n<information>" + text.strip() + "</information>\n\n"


def test_search_r1_observation_format_is_byte_identical_over_a_real_server(server):
    import gymnasium as gym

    import envs  # noqa: F401

    qs = questions(12) + ["Scott Derrickson", "Fuding", "zzzzqqqq xxyyzzq"]
    env = gym.make("WebQA-SearchR1-v0", retriever=server.url, max_turns=30)
    env.reset(seed=0)
    for q in qs:
        obs = env.step(f"<search>{q}</search>")[0]
        assert obs == search_r1_reference(search_r1_call(server.url, [q], topk=3)[0])
    assert obs == "\n\n<information></information>\n\n"  # no hit
    assert 'Doc 1(Title: "' in env.step("<search>Scott Derrickson</search>")[0]


def test_privileged_passages_over_http_are_those_in_process(server, index_dir):
    """opsd's privileged context: WebQAEnv.privileged() over a retrieval server (POST /passages)
    equals the in-process one, question by question."""
    import gymnasium as gym

    import envs  # noqa: F401

    local, remote = gym.make("WebQA-v0").unwrapped, gym.make("WebQA-v0", retriever=server.url).unwrapped
    n_passages = 0
    for k in range(25):
        local.reset(options={"index": k})
        remote.reset(options={"index": k})
        a, b = local.privileged(), remote.privileged()
        assert a == b and a["supporting_titles"]
        n_passages += len(a["supporting_passages"])
    assert n_passages >= 50  # HotpotQA: two gold titles per question, each with its passages
    r = requests.post(server.url + "/passages", json={"titles": ["Scott Derrickson", "No Such Title 123"]}, timeout=10)
    body = r.json()["passages"]
    assert r.status_code == 200 and body["No Such Title 123"] == [] and body["Scott Derrickson"][0]["contents"].startswith('"Scott Derrickson"\n')
    bad = requests.post(server.url + "/passages", json={"titles": "Scott Derrickson"}, timeout=10)
    assert bad.status_code == 400 and "titles" in bad.json()["error"]
    many = requests.post(server.url + "/passages", json={"titles": ["t"] * 65}, timeout=10)  # --max-queries 64
    assert many.status_code == 413
