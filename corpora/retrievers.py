"""Retriever specs -> loaded retrievers, once per process.

A spec is a string, so envs stay picklable and configs stay plain:

* ``"bundled"``: the packaged 22,980-passage Wikipedia corpus, indexed on first use into the
  user cache (``common.files``) with a progress bar, then reused (loads in well under 1 s);
* a folder made by ``python -m corpora.build``;
* a corpus file (JSONL / Search-R1 JSONL / DPR TSV): indexed into the cache on first use;
* ``http://host:port`` (or several, comma-separated): a Search-R1-compatible retrieval server.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from common.files import cache_root, file_lock
from corpora.corpus import BUNDLED_PAGES, BUNDLED_PASSAGES, data_path
from corpora.index import INDEX_FORMAT, BM25Index, BM25Params, Retriever, build_index
from corpora.tokenize import TOKENIZER_VERSION

BUNDLED = "bundled"
BUNDLED_NUM_PASSAGES = 22980

_lock = threading.Lock()
_loaded: dict[tuple[str, str], Retriever] = {}


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{TOKENIZER_VERSION}".encode())
    return h.hexdigest()[:16]


def cached_index_dir(corpus: Path, backends: tuple[str, ...], pages: Path | None = None) -> Path:
    """Build (once, under a lock) and return the cache folder indexing ``corpus``."""
    tag = "-".join(backends)
    fp = _file_fingerprint(corpus)
    name = f"{corpus.name.split('.')[0]}-{fp}-{tag}-f{INDEX_FORMAT}"
    out = cache_root() / "indexes" / name
    if (out / "meta.json").exists():
        return out
    with file_lock(out.parent / f"{name}.lock"):
        if not (out / "meta.json").exists():
            total = BUNDLED_NUM_PASSAGES if corpus == data_path(BUNDLED_PASSAGES) else None
            print(f"[corpora] building the BM25 index for {corpus.name} into {out} (once)")
            build_index(corpus, out, backends=backends, params=BM25Params(), total=total, pages=pages)
    return out


def bundled_index_dir(backends: tuple[str, ...] = ("bm25s",)) -> Path:
    return cached_index_dir(data_path(BUNDLED_PASSAGES), backends, pages=data_path(BUNDLED_PAGES))


def resolve_index_dir(spec: str, backend: str = "bm25s") -> Path:
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


def get_retriever(spec: str = BUNDLED, backend: str = "bm25s") -> Retriever:
    """The process-wide retriever for ``spec`` (loaded once, shared by every env in the process)."""
    key = (spec, backend)
    with _lock:
        if key not in _loaded:
            if spec.startswith(("http://", "https://")):
                from corpora.http_client import HttpRetriever

                _loaded[key] = HttpRetriever([u.strip() for u in spec.split(",") if u.strip()])
            else:
                _loaded[key] = BM25Index(resolve_index_dir(spec, backend), backend=backend)
        return _loaded[key]
