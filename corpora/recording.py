"""Record every retrieval an env makes, and replay it later with no index and no network.

``RecordingRetriever(inner, path)`` answers like ``inner`` (an in-process index or a retrieval
server) and appends each new call and its exact result to a JSONL file:

* ``{"op": "search", "query": q, "k": k, "hits": [[doc_id, title, text, score], ...]}``
* ``{"op": "page", "title": raw title, "page": [title, text]}`` or ``"suggestions": [...]``
* ``{"op": "passages", "title": t, "texts": [...]}`` (the gold passages ``privileged()`` reads)

keyed by the call and its retrieval settings (query and ``k``; the browsed title). How an env
renders the results (passage length, observation format, page windows) is applied on top, so a
replay renders exactly what the recording run rendered under the same env settings.

``ReplayRetriever(path)`` serves those records. A call the recording does not hold raises
``ReplayMiss``, whose message names the call and the file; ``WebQA-v0`` turns it into an
``Error: replay miss ...`` observation and counts it (``info["replay_misses"]``). A torn last
line (a killed recording) is ignored.

Both look, to an env, like a retrieval server (``search``, ``page_or_suggestions``,
``passages_by_title``), so browsing and privileged passages go through them too.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Sequence

from corpora.index import Hit


class ReplayMiss(KeyError):
    """A call the recording does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _search_key(query: str, k: int) -> str:
    return json.dumps(["search", query, int(k)], ensure_ascii=False)


def _page_key(title: str) -> str:
    return json.dumps(["page", title], ensure_ascii=False)


def _passages_key(title: str) -> str:
    return json.dumps(["passages", title], ensure_ascii=False)


def _key(rec: dict) -> str:
    if rec["op"] == "search":
        return _search_key(rec["query"], rec["k"])
    return _page_key(rec["title"]) if rec["op"] == "page" else _passages_key(rec["title"])


def read_records(path: str | Path) -> dict[str, dict]:
    """The records of a recording by key (complete lines only)."""
    out: dict[str, dict] = {}
    p = Path(path)
    if not p.exists():
        return out
    with open(p, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # torn by a kill
            rec = json.loads(raw)
            out.setdefault(_key(rec), rec)
    return out


class RecordingRetriever:
    def __init__(self, inner, path: str | Path):
        self.inner, self.path = inner, Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._seen = set(read_records(self.path))
        self._pages = None

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def meta(self) -> dict:
        return getattr(self.inner, "meta", {})

    def _write(self, rec: dict) -> None:
        key = _key(rec)
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Hit]]:
        rows = self.inner.search(queries, k=k)
        for q, hits in zip(queries, rows):
            self._write({"op": "search", "query": q, "k": int(k), "hits": [list(h) for h in hits]})
        return rows

    def _page_store(self):
        if self._pages is None and hasattr(self.inner, "titles"):
            from corpora.pages import PageStore

            self._pages = PageStore(self.inner)
        return self._pages

    def page_or_suggestions(self, title: str) -> tuple[str, str] | list[str]:
        store = self._page_store()
        if store is None:
            got = self.inner.page_or_suggestions(title)
        else:
            canonical = store.resolve(title)
            got = (canonical, store.text(canonical)) if canonical is not None else store.suggest(title)
        self._write({"op": "page", "title": title, **({"page": list(got)} if isinstance(got, tuple) else {"suggestions": got})})
        return got

    def passages_by_title(self, titles: Sequence[str]) -> dict[str, list[str]]:
        index = getattr(self.inner, "titles", None)
        if index is not None:
            got = {t: [self.inner.docs[i].text for i in index.get(t, [])] for t in titles}
        else:
            got = self.inner.passages_by_title(titles)
        for t in titles:
            self._write({"op": "passages", "title": t, "texts": got.get(t, [])})
        return got


class ReplayRetriever:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"replay: no recording at {self.path}")
        self.records = read_records(self.path)
        self.meta = {"source": f"replay:{self.path}"}

    def __len__(self) -> int:
        return 0

    def _get(self, key: str, what: str) -> dict:
        rec = self.records.get(key)
        if rec is None:
            raise ReplayMiss(f"replay miss: {self.path} holds no {what}")
        return rec

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Hit]]:
        return [[Hit(*h) for h in self._get(_search_key(q, k), f"search for {q!r} at k={k}")["hits"]] for q in queries]

    def page_or_suggestions(self, title: str) -> tuple[str, str] | list[str]:
        rec = self._get(_page_key(title), f"browse of {title!r}")
        return tuple(rec["page"]) if "page" in rec else list(rec["suggestions"])

    def passages_by_title(self, titles: Sequence[str]) -> dict[str, list[str]]:
        return {t: list(self._get(_passages_key(t), f"gold passages of {t!r}")["texts"]) for t in titles}


_REPLAYS: dict[str, ReplayRetriever] = {}
_RECORDERS: dict[tuple, RecordingRetriever] = {}
_lock = threading.Lock()


def replay_retriever(path: str) -> ReplayRetriever:
    """The process-wide replay of ``path`` (read once)."""
    with _lock:
        if path not in _REPLAYS:
            _REPLAYS[path] = ReplayRetriever(path)
        return _REPLAYS[path]


def recording_retriever(inner, path: str) -> RecordingRetriever:
    """The process-wide recorder of ``inner`` into ``path``."""
    with _lock:
        key = (id(inner), path)
        if key not in _RECORDERS:
            _RECORDERS[key] = RecordingRetriever(inner, path)
        return _RECORDERS[key]
