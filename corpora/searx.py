"""``SearxngRetriever``: web search through a SearxNG-style JSON API, as an env's retriever.

    gym.make("WebQA-Web-v0", retriever="searxng+http://127.0.0.1:8888")
    gym.make("WebQA-Web-v0", retriever="searxng+https://search.example.org?language=en&categories=general")

Each query is one ``GET {base}/search?q=QUERY&format=json`` (SearxNG's search API; an instance
answers JSON only when its settings enable it: ``search: formats: [html, json]``). Parameters in
the spec's own query string (``language``, ``categories``, ``engines``, ``safesearch``, ...) are
sent with every query. The answer's ``results`` list (``url``, ``title``, ``content``) becomes the
hits, in the order given, cut to ``k``: ``doc_id`` is the URL and the hit's text starts with it, so
an agent sees the address and can ``<browse>`` it; with ``pages="web"`` that fetch goes through
the SSRF guard of ``corpora/web.py``. The score is SearxNG's ``score`` where given, else 1/rank.

The endpoint is configuration written by the user, not input written by the agent, so it is not
itself behind the guard (a SearxNG instance usually runs on the same host); every URL it returns
is, when browsed. A failed query (connection, timeout, HTTP status, a body that is not JSON with a
``results`` list) is retried ``retries`` times after ``backoff * 2**attempt`` seconds, then
``RetrievalError`` says what went wrong, as for a retrieval server (``corpora/http_client.py``).
There is no page store and no passage-by-title lookup behind a web search: ``privileged()`` gives
no supporting passages, and browsing needs ``pages="web"`` and a URL.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import requests

from corpora.http_client import RetrievalError
from corpora.index import Hit

PREFIX = "searxng+"
MAX_TEXT_CHARS = 2000  # a result's content is a search snippet; a longer one is cut


def is_searxng_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


class SearxngRetriever:
    """The Retriever protocol (``search(queries, k)``) over a SearxNG-style ``/search`` JSON API."""

    def __init__(self, spec: str, timeout: float = 10.0, retries: int = 2, backoff: float = 0.5):
        url = spec[len(PREFIX):] if is_searxng_spec(spec) else spec
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"a SearxNG endpoint is searxng+http(s)://host[:port][/path][?params], got {spec!r}")
        path = parts.path.rstrip("/")
        path = path if path.endswith("/search") else path + "/search"
        self.url = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self.params = dict(parse_qsl(parts.query))
        self.params.pop("q", None)
        self.params["format"] = "json"
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._local = threading.local()  # one requests.Session per thread

    def __repr__(self) -> str:
        return f"SearxngRetriever({self.url!r})"

    @property
    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Hit]]:
        return [self._one(q, k) for q in queries]

    def _one(self, query: str, k: int) -> list[Hit]:
        if not query.strip():
            return []
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._session.get(self.url, params={**self.params, "q": query}, timeout=self.timeout)
                if resp.status_code != 200:
                    last = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                    if 400 <= resp.status_code < 500 and resp.status_code != 429:
                        break  # the request itself is refused (e.g. 403: the json format is off); asking again will not help
                    continue
                return hits_from_results(resp.json(), k)
            except ValueError as exc:  # not JSON (requests' JSONDecodeError is one), or not the expected shape
                last = f"bad answer: {exc}"
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
        raise RetrievalError(f"SearxNG search at {self.url} failed for {query[:80]!r}: {last}")


def hits_from_results(body, k: int) -> list[Hit]:
    """SearxNG's JSON answer -> up to ``k`` hits, in its order (results without a URL skipped)."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        raise ValueError("no 'results' list in the answer")
    hits: list[Hit] = []
    for r in results:
        if not isinstance(r, dict) or not isinstance(r.get("url"), str) or not r["url"]:
            continue
        title = str(r.get("title") or r["url"]).strip()
        content = " ".join(str(r.get("content") or "").split())[:MAX_TEXT_CHARS]
        score = r.get("score")
        score = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else 1.0 / (len(hits) + 1)
        hits.append(Hit(doc_id=r["url"], title=title, text=f"{r['url']} {content}".strip(), score=score))
        if len(hits) >= k:
            break
    return hits
