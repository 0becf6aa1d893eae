"""Retriever specs -> loaded retrievers, once per process.

A spec is a string, so envs stay picklable and configs stay plain:

* ``"bundled"``: the packaged 22,980-passage Wikipedia corpus, indexed on first use into the
  user cache (``common.files``) with a progress bar, then reused (loads in well under 1 s);
* a folder made by ``python -m corpora.build``: BM25, dense or hybrid, as its ``meta.json``
  ``"kind"`` says (:data:`OPENERS`);
* a corpus file (JSONL / Search-R1 JSONL / DPR TSV): indexed into the cache on first use;
* ``http://host:port`` (or several, comma-separated): a Search-R1-compatible retrieval server;
* ``searxng+http://host:port[?params]``: web search through a SearxNG-style JSON API
  (``corpora/searx.py``; browse its URLs with ``pages="web"``).

``backend`` names the BM25 backend (``bm25``, ``rank_bm25``; ``bm25s``, the old name of ``bm25``,
is accepted), or ``dense`` / ``hybrid``: a dense folder opens as that kind, and ``"bundled"`` or
a corpus file is indexed densely (with the embedded all-MiniLM-L6-v2; minutes of encoding on a
CPU, once) into the cache.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from common.files import cache_root, file_lock
from corpora.corpus import BUNDLED_PAGES, BUNDLED_PASSAGES, data_path
from corpora.dense import DENSE_KINDS, build_dense_index, index_kind
from corpora.encoder import DEFAULT_ENCODER
from corpora.index import (BACKEND_ALIASES, BACKENDS, INDEX_FORMAT, BM25Index, BM25Params, Retriever, build_index,
                           canonical_backend)
from corpora.tokenize import TOKENIZER_VERSION

BUNDLED = "bundled"
BUNDLED_NUM_PASSAGES = 22980

_lock = threading.Lock()
_loaded: dict[tuple[str, str], Retriever] = {}


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{TOKENIZER_VERSION}".encode())
    return h.hexdigest()[:16]


def _cache_name(corpus: Path, fp: str, tag: str) -> str:
    return f"{corpus.name.split('.')[0]}-{fp}-{tag}-f{INDEX_FORMAT}"


def cached_index_dir(corpus: Path, backends: tuple[str, ...], pages: Path | None = None) -> Path:
    """Build (once, under a lock) and return the cache folder indexing ``corpus``. A folder
    cached under a backend's old name (``...-bm25s-f2``) is still used as it is."""
    backends = tuple(canonical_backend(b) for b in backends)
    kind = backends[0] if backends[0] in DENSE_KINDS else None
    tag = f"{kind}-{DEFAULT_ENCODER}" if kind else "-".join(backends)
    fp = _file_fingerprint(corpus)
    name = _cache_name(corpus, fp, tag)
    out = cache_root() / "indexes" / name
    if (out / "meta.json").exists():
        return out
    if not kind:
        old_names = {v: k for k, v in BACKEND_ALIASES.items()}
        legacy = cache_root() / "indexes" / _cache_name(corpus, fp, "-".join(old_names.get(b, b) for b in backends))
        if legacy != out and (legacy / "meta.json").exists():
            return legacy
    with file_lock(out.parent / f"{name}.lock"):
        if not (out / "meta.json").exists():
            total = BUNDLED_NUM_PASSAGES if corpus == data_path(BUNDLED_PASSAGES) else None
            print(f"[corpora] building the {kind or 'BM25'} index for {corpus.name} into {out} (once)")
            if kind:
                build_dense_index(corpus, out, kind=kind, bm25_params=BM25Params(), total=total, pages=pages)
            else:
                build_index(corpus, out, backends=backends, params=BM25Params(), total=total, pages=pages)
    return out


def bundled_index_dir(backends: tuple[str, ...] = ("bm25",)) -> Path:
    return cached_index_dir(data_path(BUNDLED_PASSAGES), backends, pages=data_path(BUNDLED_PAGES))


def resolve_index_dir(spec: str, backend: str = "bm25") -> Path:
    if spec == BUNDLED:
        return bundled_index_dir((backend,))
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return cached_index_dir(path, (backend,))
    raise FileNotFoundError(
        f"retriever spec {spec!r} is not 'bundled', an index folder, a corpus file or an http:// URL"
    )


def _open_bm25(folder: Path, backend: str) -> Retriever:
    return BM25Index(folder, backend=backend)


def _open_dense(folder: Path, backend: str) -> Retriever:
    from corpora.dense import DenseIndex

    return DenseIndex(folder)


def _open_hybrid(folder: Path, backend: str) -> Retriever:
    from corpora.hybrid import HybridIndex

    backend = canonical_backend(backend)
    return HybridIndex(folder, backend=backend if backend in BACKENDS else "bm25")


# meta.json "kind" -> how to open such a folder
OPENERS = {"bm25": _open_bm25, "dense": _open_dense, "hybrid": _open_hybrid}


def open_index(folder: str | Path, backend: str = "bm25") -> Retriever:
    """Load an index folder as its ``meta.json`` ``"kind"`` says; ``backend`` ``dense`` or
    ``hybrid`` opens a dense folder as that kind, otherwise it names the BM25 backend."""
    folder = Path(folder)
    kind = backend if backend in DENSE_KINDS else index_kind(folder)
    if kind not in OPENERS:
        raise ValueError(f"{folder}: unknown index kind {kind!r}; known: {list(OPENERS)}")
    return OPENERS[kind](folder, backend)


def get_retriever(spec: str = BUNDLED, backend: str = "bm25") -> Retriever:
    """The process-wide retriever for ``spec`` (loaded once, shared by every env in the process)."""
    backend = canonical_backend(backend)
    key = (spec, backend)
    with _lock:
        if key not in _loaded:
            from corpora.searx import PREFIX as SEARX

            if spec.startswith(SEARX):  # a web search engine's JSON API (corpora/searx.py)
                from corpora.searx import SearxngRetriever

                _loaded[key] = SearxngRetriever(spec)
            elif spec.startswith(("http://", "https://")):
                from corpora.http_client import HttpRetriever

                _loaded[key] = HttpRetriever([u.strip() for u in spec.split(",") if u.strip()])
            else:
                _loaded[key] = open_index(resolve_index_dir(spec, backend), backend)
        return _loaded[key]
