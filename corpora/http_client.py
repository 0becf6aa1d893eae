"""``HttpRetriever``: the Retriever protocol over Search-R1-compatible HTTP servers, with failover.

    r = HttpRetriever(["http://127.0.0.1:8000", "http://127.0.0.1:8001"])
    r.search(["who directed Ed Wood"], k=3)  # -> [[Hit(doc_id, title, text, score), ...]]

or ``get_retriever("http://127.0.0.1:8000,http://127.0.0.1:8001")``. Each URL is a server root
(``/retrieve`` is added) or a full ``.../retrieve`` URL. Requests are
``POST {"queries", "topk", "return_scores": true}`` (``corpora/serve.py`` or Search-R1's own
``retrieval_server.py``); batches larger than ``max_batch`` queries are sent in pieces.

## Load spreading and failover
Calls go round robin over the replicas. A replica that fails (connection refused or reset,
timeout, HTTP 5xx or 429, a body that is not a well-formed answer) is marked down for
``down_seconds`` and the same request goes to the next replica; replicas marked down are
tried last, not never. When every replica has failed, the round is repeated ``retries`` more
times after a backoff of ``backoff * 2**round`` seconds; then ``RetrievalError`` says what each
replica answered. A 4xx answer (other than 429) means the request itself is wrong: it raises
``ValueError`` at once with the server's message, since every replica would say the same.
Searches are read-only, so sending one again to another replica is safe.

## Hits
Identical to the in-process ``BM25Index``: ``contents`` is parsed back to (title, text) as the
exact inverse of ``Passage.contents()`` (``'"Title"\\ntext'``) when the first line is quoted,
else with ``corpora.corpus.split_contents``; ids are strings and scores floats (JSON keeps
every bit of a float).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Sequence

import requests
from requests.adapters import HTTPAdapter

from corpora.corpus import split_contents
from corpora.index import Hit

log = logging.getLogger("corpora.http_client")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class RetrievalError(RuntimeError):
    """Every replica failed for a request (after retries)."""


class ReplicaError(Exception):
    """One replica failed; the request may go to another."""


def parse_contents(contents: str) -> tuple[str, str]:
    """``'"Title"\\ntext'`` -> (title, text), the exact inverse of ``Passage.contents()``."""
    first, _, rest = contents.partition("\n")
    if len(first) >= 2 and first[0] == first[-1] == '"':
        return first[1:-1], rest
    return split_contents(contents)  # another server's format: be forgiving


def _retrieve_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"retrieval server URL must start with http:// or https://, got {url!r}")
    return url if url.endswith("/retrieve") else url + "/retrieve"


class HttpRetriever:
    """Search-R1-style retrieval over HTTP with round robin, failover, retries and backoff."""

    def __init__(
        self,
        urls: Sequence[str] | str,
        timeout: float | tuple[float, float] = (3.0, 60.0),
        retries: int = 2,
        backoff: float = 0.2,
        down_seconds: float = 10.0,
        max_batch: int = 256,
        pool_size: int = 32,
        max_results: int = 4096,
    ):
        if isinstance(urls, str):
            urls = [u for u in urls.split(",") if u.strip()]
        if not urls:
            raise ValueError("HttpRetriever needs at least one server URL")
        if retries < 0 or max_batch < 1:
            raise ValueError("retries must be >= 0 and max_batch >= 1")
        self.urls = [_retrieve_url(u) for u in urls]
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.down_seconds, self.max_batch, self.pool_size = down_seconds, max_batch, pool_size
        self.max_results = max_results  # the server's cap on queries x topk per request (corpora.serve --max-results)
        self._setup()

    def _setup(self) -> None:
        self._rr = itertools.count()
        self._down_until = {u: 0.0 for u in self.urls}
        self._local = threading.local()  # one Session (connection pool) per thread
        self._lock = threading.Lock()
        self.requests_by_url = {u: 0 for u in self.urls}
        self.failures_by_url = {u: 0 for u in self.urls}

    def __getstate__(self) -> dict:
        keep = ("urls", "timeout", "retries", "backoff", "down_seconds", "max_batch", "pool_size", "max_results")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setup()

    def __repr__(self) -> str:
        return f"HttpRetriever({self.urls}, timeout={self.timeout}, retries={self.retries})"

    @property
    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            adapter = HTTPAdapter(pool_connections=len(self.urls), pool_maxsize=self.pool_size, max_retries=0)
            s.mount("http://", adapter)
            s.mount("https://", adapter)
            self._local.session = s
        return s

    def close(self) -> None:
        s = getattr(self._local, "session", None)
        if s is not None:
            s.close()
            self._local.session = None

    # -- Retriever protocol ------------------------------------------------------------------
    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Hit]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries; wrap a single query in a list")
        queries = list(queries)
        out: list[list[Hit]] = []
        step = max(1, min(self.max_batch, self.max_results // max(k, 1)))  # stay under the server's queries x topk cap
        for i in range(0, len(queries), step):
            out.extend(self._search_batch(queries[i : i + step], k))
        return out

    def _search_batch(self, queries: list[str], k: int) -> list[list[Hit]]:
        if not queries:
            return []
        payload = {"queries": queries, "topk": int(k), "return_scores": True}
        errors: dict[str, str] = {}
        for round_ in range(self.retries + 1):
            if round_:
                time.sleep(self.backoff * 2 ** (round_ - 1))
            for url in self._order():
                try:
                    rows = self._post(url, payload, len(queries))
                except ReplicaError as exc:
                    errors[url] = str(exc)
                    self._mark_down(url, str(exc))
                    continue
                self._mark_up(url)
                return rows
        detail = "; ".join(f"{u}: {e}" for u, e in errors.items())
        raise RetrievalError(f"all {len(self.urls)} retrieval server(s) failed after {self.retries + 1} round(s): {detail}")

    # -- replicas ------------------------------------------------------------------------------
    def _order(self) -> list[str]:
        """Round robin start; replicas marked down go last."""
        n = len(self.urls)
        start = next(self._rr) % n
        order = self.urls[start:] + self.urls[:start]
        now = time.monotonic()
        up = [u for u in order if self._down_until[u] <= now]
        return up + [u for u in order if self._down_until[u] > now]

    def _mark_down(self, url: str, why: str) -> None:
        with self._lock:
            was_up = self._down_until[url] <= time.monotonic()
            self._down_until[url] = time.monotonic() + self.down_seconds
            self.failures_by_url[url] += 1
        if was_up:
            log.warning("retrieval server %s is down for %.0f s: %s", url, self.down_seconds, why)

    def _mark_up(self, url: str) -> None:
        if self._down_until[url]:
            with self._lock:
                if self._down_until[url]:
                    self._down_until[url] = 0.0
                    log.info("retrieval server %s is back", url)

    def down(self) -> list[str]:
        now = time.monotonic()
        return [u for u in self.urls if self._down_until[u] > now]

    def _post(self, url: str, payload: dict, n: int) -> list[list[Hit]]:
        with self._lock:
            self.requests_by_url[url] += 1
        try:
            r = self.session.post(url, json=payload, timeout=self.timeout)
        except requests.RequestException as exc:  # refused, reset, timeout, ...
            raise ReplicaError(f"{type(exc).__name__}: {exc}") from None
        if r.status_code in RETRYABLE_STATUS:
            raise ReplicaError(f"HTTP {r.status_code}: {_message(r)}")
        if r.status_code != 200:
            raise ValueError(f"retrieval server {url} rejected the request (HTTP {r.status_code}): {_message(r)}")
        try:
            result = r.json()["result"]
            if not isinstance(result, list) or len(result) != n:
                raise ValueError(f"{len(result) if isinstance(result, list) else type(result).__name__} rows for {n} queries")
            return [[_hit(item) for item in row] for row in result]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ReplicaError(f"malformed answer: {type(exc).__name__}: {exc}") from None

    def page(self, title: str) -> tuple[str, str] | None:
        """``POST /page``: (canonical title, full page text), or None for an unknown title.

        Tries the replicas in round-robin order like ``search``; raises ``RetrievalError`` when
        none answers.
        """
        got = self.page_or_suggestions(title)
        return got if isinstance(got, tuple) else None

    def _post_any(self, path: str, payload: dict, what: str, answers=(200,)) -> requests.Response:
        """POST ``path`` to the replicas in round-robin order until one answers with a status in
        ``answers`` (a retryable status or a connection error marks that replica down; another
        status is the request's fault: ``ValueError``); ``RetrievalError`` when none answers."""
        errors: dict[str, str] = {}
        for url in self._order():
            base = url[: -len("/retrieve")]
            try:
                r = self.session.post(base + path, json=payload, timeout=self.timeout)
            except requests.RequestException as exc:
                errors[url] = f"{type(exc).__name__}: {exc}"
                self._mark_down(url, errors[url])
                continue
            if r.status_code in answers:
                return r
            if r.status_code in RETRYABLE_STATUS:
                errors[url] = f"HTTP {r.status_code}: {_message(r)}"
                self._mark_down(url, errors[url])
                continue
            raise ValueError(f"retrieval server {base} rejected the {what} request (HTTP {r.status_code}): {_message(r)}")
        detail = "; ".join(f"{u}: {e}" for u, e in errors.items())
        raise RetrievalError(f"no retrieval server answered {path}: {detail}")

    def page_or_suggestions(self, title: str) -> tuple[str, str] | list[str]:
        """Like ``page``, but an unknown title gives the server's suggested titles (a list)."""
        r = self._post_any("/page", {"title": title}, "page", answers=(200, 404))
        if r.status_code == 404:
            if "suggestions" not in r.text:
                raise ValueError(f"retrieval server rejected the page request (HTTP 404): {_message(r)}")
            return [str(t) for t in r.json().get("suggestions") or []]
        body = r.json()
        return str(body["title"]), str(body["text"])

    def passages_by_title(self, titles: Sequence[str]) -> dict[str, list[str]]:
        """``POST /passages``: the texts of every passage of each title, in corpus order (the
        server's index order, as an in-process index gives them). Unknown titles map to []."""
        got = self._post_any("/passages", {"titles": list(titles)}, "passages").json()["passages"]
        return {t: [parse_contents(str(d["contents"]))[1] for d in got.get(t, [])] for t in titles}

    def health(self) -> dict[str, dict]:
        """``GET /health`` of every replica (an ``{"error": ...}`` entry for those that fail)."""
        out = {}
        for url in self.urls:
            base = url[: -len("/retrieve")]
            try:
                out[base] = self.session.get(base + "/health", timeout=self.timeout).json()
            except (requests.RequestException, ValueError) as exc:
                out[base] = {"error": f"{type(exc).__name__}: {exc}"}
        return out


def _hit(item: dict) -> Hit:
    doc = item["document"] if "document" in item else item  # return_scores false: documents only
    if "contents" in doc:
        title, text = parse_contents(str(doc["contents"]))
    else:
        title, text = str(doc.get("title", "")), str(doc["text"])
    return Hit(str(doc.get("id", "")), title, text, float(item.get("score", 0.0)))


def _message(r: requests.Response) -> str:
    try:
        body = r.json()
        return str(body.get("error") or body.get("detail") or body)[:500]
    except ValueError:
        return r.text[:500]
