"""BM25 indexes: build from a corpus, save, load (memory-mapped), search in batches.

An index folder holds

* ``meta.json``: format, corpus path and size, tokeniser version, BM25 parameters, backends;
* ``docs.jsonl`` + ``offsets.npy``: the passages (see ``docstore.py``);
* ``titles.json``: title -> passage indices in corpus order (for browsing, loaded lazily);
* format 2 (what ``build_index`` writes): ``postings/{indptr,indices,data}.npy``, one
  term-major CSC matrix of final BM25 weights, and ``vocab*`` (``vocab.py``), built by the
  streamed, bounded-memory builder in ``streambuild.py``; all memory-mapped at load;
* format 1 (older builds, still loaded): ``bm25s/``, the bm25s library's saved index (loading
  one needs that library: ``pip install bm25s``);
* ``rank_bm25.pkl``: the rank-bm25 ``BM25Okapi`` object, if built (small corpora only: it
  holds every token list in memory).

The fast backend is called ``bm25`` in both formats; format 2 uses the CSC layout of the bm25s
library, written by our own builder, and ``kernels.topk`` for queries (no bm25s code). Its old
name ``bm25s`` is still accepted everywhere a backend is named (:func:`canonical_backend`),
including the ``backends`` list of an existing folder's ``meta.json``, which older builds wrote
as ``["bm25s"]``; :func:`read_meta` normalises it, new builds write ``"bm25"``.

Scoring is the classic Robertson BM25 (rank-bm25's ``BM25Okapi``; bm25s ``method="robertson"``)
with Pyserini's k1=0.9, b=0.4 by default, the setting Search-R1 and FlashRAG use for BM25.
Both backends see the same token lists (``tokenize.py``). Hits are ordered by score, ties
broken by passage position in the corpus (then by id), so results are deterministic.
Passages with score 0 (no query term at all) are never returned.

For a term found in more than half of all passages Robertson's idf is negative; rank-bm25
floors it at 0.25 x the mean idf and so does format 2; format-1 (bm25s library) indexes floor
it at 0. With stop words removed no term of the bundled corpus is that common (the largest
document frequency is 30% of passages), so there all agree exactly.
"""
from __future__ import annotations

import json
import pickle
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Protocol, Sequence

import numpy as np

from corpora import kernels
from common.files import atomic_write_json, publish_dir
from corpora.corpus import Passage, iter_pages, iter_passages
from corpora.docstore import DocStore, DocStoreWriter
from corpora.streambuild import BLOCK_POSTINGS, CHUNK_TOKENS, POSTINGS, stream_build
from corpora.tokenize import TOKENIZER_VERSION, tokenize
from corpora.vocab import Vocab

BACKENDS = ("bm25", "rank_bm25")
BACKEND_ALIASES = {"bm25s": "bm25"}  # old name -> name: accepted wherever a backend is read
INDEX_FORMAT = 2


def canonical_backend(name: str) -> str:
    """A backend name with its alias resolved (``bm25s`` -> ``bm25``); other names unchanged."""
    return BACKEND_ALIASES.get(name, name)


def read_meta(folder: str | Path) -> dict:
    """An index folder's ``meta.json``, its ``backends`` list in canonical names (older builds
    wrote ``"bm25s"``)."""
    path = Path(folder) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not an index folder (no meta.json); build one with python -m corpora.build")
    meta = json.loads(path.read_text())
    if "backends" in meta:
        meta["backends"] = list(dict.fromkeys(canonical_backend(b) for b in meta["backends"]))
    return meta


class Hit(NamedTuple):
    doc_id: str
    title: str
    text: str
    score: float


class Retriever(Protocol):
    """Anything that answers a batch of queries with ranked hits (in-process or over HTTP)."""

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Hit]]: ...


@dataclass
class BM25Params:
    k1: float = 0.9
    b: float = 0.4


class _CscBackend:
    """Format 2: our own CSC of final weights (``streambuild.py``), vocabulary on disk."""

    name = "bm25"

    def __init__(self, folder: Path, num_docs: int, mmap: bool = True):
        d = folder / POSTINGS
        mode = "r" if mmap else None
        self.indptr = np.load(d / "indptr.npy", mmap_mode=mode)
        self.indices = np.load(d / "indices.npy", mmap_mode=mode)
        self.data = np.load(d / "data.npy", mmap_mode=mode)
        self.vocab = Vocab(folder)
        self.num_docs = num_docs
        self.scratch = kernels.Scratch(num_docs)

    @classmethod
    def load(cls, folder: Path, meta: dict, mmap: bool = True) -> "_CscBackend":
        return cls(folder, int(meta["num_passages"]), mmap)

    def topk(self, token_lists: list[list[str]], k: int) -> list[list[tuple[int, float]]]:
        get = self.vocab.get
        ids = [np.asarray([i for i in map(get, toks) if i >= 0], dtype=np.int64) for toks in token_lists]
        pos, val = kernels.topk(self.data, self.indices, self.indptr, self.num_docs, ids, k, self.scratch)
        return [[(int(p), float(v)) for p, v in zip(prow, vrow) if p >= 0 and v > 0] for prow, vrow in zip(pos, val)]


class _Bm25sBackend:
    """Format 1: an index saved by the bm25s library (load only; builds now write format 2).
    The only user of the bm25s library: it reads the library's own save in ``bm25s/``."""

    name = "bm25"

    def __init__(self, model):
        self.model = model
        self.num_docs = int(model.scores["num_docs"])
        # bm25s's Robertson term-frequency part omits the constant (k1 + 1) factor of BM25Okapi;
        # multiply it back so both backends report the same scores (the ranking is unchanged).
        self.scale = float(model.k1) + 1.0
        sc = model.scores
        # tiles need passage-sorted posting lists (format 2 has them by construction); one
        # tile of the whole index otherwise
        tile = kernels.TILE if kernels.postings_sorted(sc["indptr"], sc["indices"]) else self.num_docs
        self.scratch = kernels.Scratch(self.num_docs, tile)

    @classmethod
    def load(cls, folder: Path, meta: dict, mmap: bool = True) -> "_Bm25sBackend":
        try:
            import bm25s
        except ImportError as exc:
            raise ImportError(f"{folder} is a format-1 index (saved by the bm25s library); loading it needs that "
                              "library: pip install bm25s (or rebuild the folder with python -m corpora.build, "
                              "which writes format 2 and needs no bm25s)") from exc

        # bm25s stores the index; queries run through corpora.kernels (numba with an on-disk cache)
        model = bm25s.BM25.load(str(folder / "bm25s"), mmap=mmap, show_progress=False)
        return cls(model)

    def topk(self, token_lists: list[list[str]], k: int) -> list[list[tuple[int, float]]]:
        vocab = self.model.vocab_dict
        ids = [np.asarray([vocab[t] for t in toks if t in vocab and t != ""], dtype=np.int64) for toks in token_lists]
        sc = self.model.scores
        pos, val = kernels.topk(sc["data"], sc["indices"], sc["indptr"], self.num_docs, ids, k, self.scratch)
        return [[(int(p), float(v) * self.scale) for p, v in zip(prow, vrow) if p >= 0 and v > 0] for prow, vrow in zip(pos, val)]


class _RankBm25Backend:
    name = "rank_bm25"

    def __init__(self, model):
        self.model = model

    @staticmethod
    def build(tokens: list[list[str]], folder: Path, params: BM25Params, show_progress: bool) -> None:
        from rank_bm25 import BM25Okapi

        model = BM25Okapi(tokens, k1=params.k1, b=params.b)
        with open(folder / "rank_bm25.pkl", "wb") as fh:
            pickle.dump(model, fh, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def load(cls, folder: Path, meta: dict, mmap: bool = True) -> "_RankBm25Backend":
        with open(folder / "rank_bm25.pkl", "rb") as fh:
            return cls(pickle.load(fh))

    def topk(self, token_lists: list[list[str]], k: int) -> list[list[tuple[int, float]]]:
        out = []
        for toks in token_lists:
            pos, val = kernels.topk_dense(np.asarray(self.model.get_scores(toks)), k) if toks else ([], [])
            out.append([(int(p), float(v)) for p, v in zip(pos, val)])
        return out


_BACKEND_TABLE = {"bm25": _CscBackend, "rank_bm25": _RankBm25Backend}
_FORMAT1_TABLE = {"bm25": _Bm25sBackend, "rank_bm25": _RankBm25Backend}


def _check_backends(backends: Iterable[str]) -> tuple[str, ...]:
    """Canonical names (aliases resolved, repeats dropped); unknown names are an error."""
    backends = tuple(dict.fromkeys(canonical_backend(b) for b in backends))
    bad = [b for b in backends if b not in _BACKEND_TABLE]
    if bad or not backends:
        raise ValueError(f"unknown BM25 backend(s) {bad}; choose from {list(BACKENDS)} (bm25s: the old name of bm25)")
    return backends


def build_index(
    passages: Iterable[Passage] | str | Path,
    out_dir: str | Path,
    backends: Sequence[str] = ("bm25",),
    params: BM25Params | None = None,
    show_progress: bool = True,
    total: int | None = None,
    source: str = "",
    pages: Iterable[tuple[str, str]] | str | Path | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
    block_postings: int = BLOCK_POSTINGS,
) -> Path:
    """Stream, tokenise and index a corpus into ``out_dir`` (a temp folder, renamed when whole).

    Memory stays bounded whatever the corpus size (``streambuild.py``; ``chunk_tokens`` and
    ``block_postings`` set it), except for the ``rank_bm25`` reference backend, which keeps
    every token list. The result does not depend on the two sizes.
    """
    backends = _check_backends(backends)
    params = params or BM25Params()
    if isinstance(passages, (str, Path)):
        source = source or str(passages)
        passages = iter_passages(passages)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.build-"))
    try:
        stats = stream_build(passages, tmp, params.k1, params.b, build_csc="bm25" in backends,
                             keep_token_lists="rank_bm25" in backends, show_progress=show_progress, total=total, source=source,
                             chunk_tokens=chunk_tokens, block_postings=block_postings)
        stats.pop("titles").write_json(tmp / "titles.json")
        if "rank_bm25" in backends:
            _RankBm25Backend.build(stats.pop("token_lists"), tmp, params, show_progress)
        num_pages = _write_pages(pages, tmp / "pages") if pages is not None else 0
        meta = {
            "format": INDEX_FORMAT,
            "source": source,
            "tokenizer": TOKENIZER_VERSION,
            "params": asdict(params),
            "idf": "robertson, negative -> 0.25 x mean idf (rank-bm25 BM25Okapi)",
            "backends": list(backends),
            "num_full_pages": num_pages,
            **stats,
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        atomic_write_json(tmp / "meta.json", meta)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_pages(pages: Iterable[tuple[str, str]] | str | Path, folder: Path) -> int:
    """Full page texts for browsing, stored like passages (id = title)."""
    if isinstance(pages, (str, Path)):
        pages = iter_pages(pages)
    folder.mkdir()
    writer = DocStoreWriter(folder)
    for title, text in pages:
        writer.add(Passage(title, title, text))
    return writer.close()


def load_titles(folder) -> dict[str, list[int]]:
    """An index folder's ``titles.json``: title -> passage indices in corpus order."""
    with open(Path(folder) / "titles.json", encoding="utf-8") as fh:
        return json.load(fh)


class BM25Index:
    """A loaded index: ``search(queries, k)`` and passage access by position."""

    def __init__(self, folder: str | Path, backend: str = "bm25", mmap: bool = True):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        if self.meta.get("tokenizer") != TOKENIZER_VERSION:
            raise ValueError(
                f"index {self.folder} was built with tokenizer {self.meta.get('tokenizer')!r}, "
                f"this code uses {TOKENIZER_VERSION!r}: rebuild it"
            )
        (backend,) = _check_backends([backend])
        if backend not in self.meta["backends"]:
            raise ValueError(f"index {self.folder} has backends {self.meta['backends']}, not {backend!r}; rebuild with --backend {backend}")
        self.backend_name = backend
        self.format = int(self.meta.get("format", 1))
        table = _BACKEND_TABLE if self.format >= 2 else _FORMAT1_TABLE
        self.backend = table[backend].load(self.folder, self.meta, mmap=mmap)
        self.docs = DocStore(self.folder)
        self._titles: dict[str, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.docs)

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Hit]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries; wrap a single query in a list")
        ranked = self.backend.topk([tokenize(q) for q in queries], k)
        return [[self._hit(i, s) for i, s in row] for row in ranked]

    def search_ids(self, queries: Sequence[str], k: int = 3) -> list[list[tuple[int, float]]]:
        """Positions and scores only (no passage decoding), for benchmarks."""
        return self.backend.topk([tokenize(q) for q in queries], k)

    def _hit(self, i: int, score: float) -> Hit:
        p = self.docs[i]
        return Hit(p.id, p.title, p.text, score)

    @property
    def titles(self) -> dict[str, list[int]]:
        if self._titles is None:
            self._titles = load_titles(self.folder)
        return self._titles
