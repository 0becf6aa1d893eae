"""Web search through a SearxNG-style JSON API (corpora/searx.py), end to end on 127.0.0.1.

The search server speaks SearxNG's ``GET /search?q=...&format=json`` and answers from the real
bundled BM25 index; each result's URL points at a page server that renders that passage as
HTML. The env then browses those URLs live through the SSRF guard, admitted only by the
test-only allowance for the page server's exact address."""
import json
import threading
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import gymnasium as gym
import pytest

from corpora.http_client import RetrievalError
from corpora.retrievers import get_retriever
from corpora.searx import SearxngRetriever, hits_from_results


def _serve(handle):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            handle(self)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    srv.seen = []
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return srv


def _send(h, status: int, body: bytes, ctype: str) -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


@pytest.fixture(scope="module")
def servers():
    index = get_retriever("bundled")

    by_pos = {index.docs[i].id: i for i in range(len(index))}

    def page(h):
        h.server.seen.append(h.path)
        pos = int(h.path.rsplit("/", 1)[-1])
        d = index.docs[pos]
        html = f"<html><head><title>{escape(d.title)}</title></head><body><main><h1>{escape(d.title)}</h1><p>{escape(d.text)}</p></main></body></html>"
        _send(h, 200, html.encode(), "text/html; charset=utf-8")

    pages = _serve(page)

    def search(h):
        parts = urlsplit(h.path)
        args = {k: v[0] for k, v in parse_qs(parts.query).items()}
        h.server.seen.append((parts.path, args))
        if parts.path != "/search" or args.get("format") != "json":
            _send(h, 403, b"Forbidden", "text/plain")  # what SearxNG answers when the json format is off
            return
        q = args.get("q", "")
        if q == "give me a 500":
            _send(h, 500, b"oops", "text/plain")
            return
        if q == "give me html":
            _send(h, 200, b"<html>not json</html>", "text/html")
            return
        hits = index.search([q], k=5)[0]
        results = [{"url": f"http://127.0.0.1:{pages.server_address[1]}/doc/{by_pos[x.doc_id]}", "title": x.title,
                    "content": x.text[:300], "engine": "bm25"} for x in hits]
        results.insert(1, {"title": "no url: skipped"})
        _send(h, 200, json.dumps({"query": q, "results": results}).encode(), "application/json")

    search_srv = _serve(search)
    yield search_srv, pages, index
    for s in (search_srv, pages):
        s.shutdown()
        s.server_close()


def test_results_become_hits_in_order_with_the_url_first(servers):
    search_srv, pages, index = servers
    r = SearxngRetriever(f"searxng+http://127.0.0.1:{search_srv.server_address[1]}?language=en&categories=general")
    (hits,) = r.search(["who directed Ed Wood"], k=3)
    want = index.search(["who directed Ed Wood"], k=3)[0]
    assert [h.title for h in hits] == [w.title for w in want]
    assert all(h.doc_id.startswith(f"http://127.0.0.1:{pages.server_address[1]}/doc/") for h in hits)
    assert all(h.text.startswith(h.doc_id + " ") for h in hits)
    assert [h.score for h in hits] == [1.0, 0.5, 1 / 3]  # no engine score: 1/rank
    path, args = search_srv.seen[-1]
    assert path == "/search" and args == {"q": "who directed Ed Wood", "format": "json", "language": "en", "categories": "general"}
    assert r.search(["  "], k=3) == [[]]  # a blank query asks nothing
    assert hits_from_results({"results": [{"url": "https://a.org", "title": "A", "content": "x", "score": 2.5}]}, 3)[0].score == 2.5


def test_failures_are_retried_then_named(servers):
    search_srv, _, _ = servers
    base = f"http://127.0.0.1:{search_srv.server_address[1]}"
    r = SearxngRetriever("searxng+" + base, retries=2, backoff=0.01)
    n = len(search_srv.seen)
    with pytest.raises(RetrievalError, match="HTTP 500"):
        r.search(["give me a 500"])
    assert len(search_srv.seen) - n == 3  # the first try and two retries
    with pytest.raises(RetrievalError, match="bad answer"):
        r.search(["give me html"])
    n = len(search_srv.seen)
    with pytest.raises(RetrievalError, match="HTTP 403"):  # json format off: asking again will not help
        SearxngRetriever("searxng+" + base + "/other", retries=2, backoff=0.01).search(["x"])
    assert len(search_srv.seen) - n == 1
    with pytest.raises(RetrievalError, match="ConnectionError"):
        SearxngRetriever("searxng+http://127.0.0.1:9", retries=0, timeout=2).search(["x"])
    with pytest.raises(ValueError, match="searxng"):
        SearxngRetriever("searxng+ftp://host")


def test_the_web_env_searches_then_browses_a_result_through_the_guard(servers):
    search_srv, pages, _ = servers
    spec = f"searxng+http://127.0.0.1:{search_srv.server_address[1]}"
    env = gym.make("WebQA-Web-v0", retriever=spec, web_test_only_allow=[f"127.0.0.1:{pages.server_address[1]}"]).unwrapped
    env.reset(options={"example": {"id": "q1", "question": "Who directed Ed Wood?", "answers": ["Tim Burton"],
                                   "supporting_titles": ["Ed Wood (film)"]}})
    obs, *_ = env.step("<search>Ed Wood film director</search>")
    first = env.retriever.search(["Ed Wood film director"], k=env.top_k)[0][0]
    assert first.doc_id in obs and first.title in obs
    obs, reward, term, trunc, info = env.step(f"<browse>{first.doc_id}</browse>")
    assert "Error" not in obs and first.text.split(" ", 1)[1][:40] in " ".join(obs.split())
    assert info["refused_urls"] == 0 and info["fetch_errors"] == 0
    obs, *_ = env.step("<browse>Ed Wood</browse>")  # a title: there is no page store behind a web search
    assert "Error: browsing is not available with this retriever." in obs
    assert env.privileged()["supporting_passages"] == []


def test_a_result_url_to_a_private_address_is_refused_when_browsed(servers):
    search_srv, pages, _ = servers
    spec = f"searxng+http://127.0.0.1:{search_srv.server_address[1]}"
    env = gym.make("WebQA-Web-v0", retriever=spec).unwrapped  # no test allowance: loopback is refused
    env.reset(options={"example": {"id": "q1", "question": "q", "answers": ["a"]}})
    env.step("<search>Ed Wood</search>")
    url = env.retriever.search(["Ed Wood"], k=1)[0][0].doc_id
    n = len(pages.seen)
    obs, _, _, _, info = env.step(f"<browse>{url}</browse>")
    assert obs.count("Error:") == 1 and info["refused_urls"] == 1 and len(pages.seen) == n
