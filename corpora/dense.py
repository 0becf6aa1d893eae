"""Dense retrieval: passages embedded by a sentence encoder (``encoder.py``), searched with faiss.

A dense index folder is a whole BM25 index folder (``index.py``: ``meta.json``, the doc store,
``titles.json``, postings, full pages) plus

* ``dense/faiss.index``: the passage embeddings in corpus order (faiss id = passage position),
  ``IndexFlatIP`` by default (exact inner product = cosine, the embeddings being normalised) or
  ``IndexHNSWFlat`` (approximate, ``--faiss hnsw``); loaded memory-mapped
  (``IO_FLAG_MMAP | IO_FLAG_MMAP_IFC``), so a flat index costs no anonymous memory;
* in ``meta.json``: ``"kind"`` (``"dense"`` or ``"hybrid"``: what ``corpora.retrievers`` opens
  the folder as), ``"dense"`` (encoder name, pinned sha256, dimension, prefixes, faiss index
  type and parameters, encoding time) and ``"fusion"`` (the hybrid's RRF settings, ``hybrid.py``).

The BM25 part comes along because the hits need the doc store and ``titles.json`` anyway, the
same folder then also serves hybrid search (a dense folder opens as hybrid with
``backend="hybrid"``), and building it costs seconds next to encoding the passages. A dense
index is built on top of an existing BM25 folder by hard-linking its files (copying where links
fail), or from a corpus file by building the BM25 part first. A folder that already holds
embeddings of the same encoder and prefixes lends them too: its faiss file as it is (so
``--backend hybrid`` on a dense folder encodes nothing), or its vectors re-indexed when the
faiss settings differ (flat -> HNSW without encoding again).

Passages are encoded as ``Passage.contents()`` (``'"Title"\\ntext'``, as Search-R1/FlashRAG's
dense indexes do), in chunks with a progress bar; the faiss index is built in memory
(4 x dim bytes a passage: 35 MB for the bundled corpus, 32 GB for 21M passages). Hits are
ordered by score, ties by passage position; a blank query returns no hits (as BM25 does for a
query with no indexable word).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from common.files import atomic_write_json, publish_dir
from corpora.corpus import Passage
from corpora.docstore import DocStore
from corpora.index import BM25Params, Hit, build_index, load_titles, read_meta

DENSE_KINDS = ("dense", "hybrid")
DENSE_DIR = "dense"
FAISS_FILE = "faiss.index"
FAISS_TYPES = ("flat", "hnsw")
TIE_SLACK = 16  # extra candidates fetched so that exact score ties are ordered by passage position
ENCODE_CHUNK = 2048  # passages read from the doc store and encoded per step


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("dense retrieval needs faiss-cpu and sentence-transformers: pip install 'webqa-gym[dense]'") from exc
    return faiss


@dataclass
class FaissParams:
    index: str = "flat"  # "flat" (exact) or "hnsw"
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def check(self) -> "FaissParams":
        if self.index not in FAISS_TYPES:
            raise ValueError(f"unknown faiss index type {self.index!r}; choose from {list(FAISS_TYPES)}")
        return self

    def describe(self) -> dict:
        return {"index": "flat"} if self.index == "flat" else {"index": "hnsw", "hnsw_m": self.hnsw_m,
                                                                 "ef_construction": self.ef_construction, "ef_search": self.ef_search}


@dataclass
class FusionParams:
    """Reciprocal rank fusion for hybrid search (``hybrid.py``)."""

    method: str = "rrf"
    k: float = 60.0  # RRF's constant: score = sum over lists of 1 / (k + rank)
    depth: int = 100  # candidates taken from each list


def index_kind(folder: str | Path) -> str:
    """``"bm25"``, ``"dense"`` or ``"hybrid"``: what the folder's ``meta.json`` says it is."""
    return read_meta(folder).get("kind", "bm25")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _new_index(dim: int, params: FaissParams):
    faiss = _faiss()
    if params.index == "flat":
        return faiss.IndexFlatIP(dim)
    index = faiss.IndexHNSWFlat(dim, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.ef_construction
    return index


_INDEX_KEYS = ("index", "hnsw_m", "ef_construction", "ef_search")


def _reuse(src_meta: dict, src: Path, encoder, params: FaissParams) -> str | None:
    """What of ``src``'s embeddings this build can take: ``"index"`` (the faiss file as it is),
    ``"vectors"`` (same encoder, other faiss settings: re-index its vectors) or None (encode)."""
    d = src_meta.get("dense")
    if not d or not (src / DENSE_DIR / FAISS_FILE).exists():
        return None
    want = {"model": encoder.name, "query_prefix": encoder.query_prefix, "passage_prefix": encoder.passage_prefix}
    if encoder._max_seq_length:
        want["max_seq_length"] = int(encoder._max_seq_length)
    if any(d.get(key) != value for key, value in want.items()):
        return None
    return "index" if all(d.get(key) == value for key, value in params.describe().items()) else "vectors"


def _reindex(src: Path, params: FaissParams, chunk: int, show_progress: bool):
    """A new faiss index (``params``) of the vectors stored in ``src``'s index, no encoding."""
    from tqdm.auto import tqdm

    faiss = _faiss()
    old = faiss.read_index(str(src / DENSE_DIR / FAISS_FILE), faiss.IO_FLAG_MMAP | getattr(faiss, "IO_FLAG_MMAP_IFC", 0))
    index = _new_index(old.d, params)
    for start in tqdm(range(0, old.ntotal, chunk), desc="re-index vectors", unit="chunk", disable=not show_progress):
        index.add(old.reconstruct_n(start, min(chunk, old.ntotal - start)))
    return index


def encode_passages(docs: DocStore, encoder, params: FaissParams, chunk: int = ENCODE_CHUNK, show_progress: bool = True):
    """A faiss index of every passage of ``docs``, in corpus order, encoded ``chunk`` at a time."""
    from tqdm.auto import tqdm

    index = _new_index(encoder.dim, params)
    n = len(docs)
    with tqdm(total=n, desc=f"encode passages ({Path(encoder.name).name})", unit="psg", disable=not show_progress,
              mininterval=2) as bar:
        for start in range(0, n, chunk):
            texts = [docs[i].contents() for i in range(start, min(n, start + chunk))]
            index.add(encoder.encode_passages(texts))
            bar.update(len(texts))
    return index


def build_dense_index(
    source: Iterable[Passage] | str | Path,
    out_dir: str | Path,
    kind: str = "dense",
    encoder=None,
    faiss_params: FaissParams | None = None,
    fusion: FusionParams | None = None,
    bm25_params: BM25Params | None = None,
    show_progress: bool = True,
    total: int | None = None,
    pages: Iterable[tuple[str, str]] | str | Path | None = None,
    chunk: int = ENCODE_CHUNK,
) -> Path:
    """Build a ``kind`` (``"dense"`` or ``"hybrid"``) index folder at ``out_dir``.

    ``source`` is an existing index folder (its files are hard-linked; its embeddings are reused
    when encoder and prefixes match: the faiss file as it is, or re-indexed when the faiss
    settings differ) or a corpus (file or passages; the BM25 part is built first with ``bm25_params``,
    ``pages`` and ``total`` as ``build_index`` takes them). ``encoder`` defaults to
    ``Encoder()`` (the embedded all-MiniLM-L6-v2). Written in a temp folder beside ``out_dir``,
    renamed into place when whole (``out_dir`` may be ``source`` itself).
    """
    from corpora.encoder import Encoder

    if kind not in DENSE_KINDS:
        raise ValueError(f"kind must be one of {list(DENSE_KINDS)}, got {kind!r}")
    encoder = encoder if encoder is not None else Encoder()
    params = (faiss_params or FaissParams()).check()
    fusion = fusion or FusionParams()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.dense-build-"))
    base = tmp / "index"
    try:
        src, reuse = _bm25_part(source, base, encoder, params, bm25_params, show_progress, total, pages)
        meta = read_meta(base)
        bm25_s = float(meta.get("bm25_build_seconds", meta.get("build_seconds", 0.0)))
        dense_meta = _dense_part(base, meta, src, reuse, encoder, params, chunk, show_progress)
        # build_seconds: the whole cost of the folder from the corpus (BM25 part + encoding and faiss)
        meta.update(kind=kind, dense=dense_meta, fusion=asdict(fusion), bm25_build_seconds=round(bm25_s, 3),
                    build_seconds=round(bm25_s + dense_meta["build_seconds"], 3))
        atomic_write_json(base / "meta.json", meta)  # a new file: the source's linked meta.json is untouched
        publish_dir(base, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _bm25_part(source, base: Path, encoder, params: FaissParams, bm25_params: BM25Params | None, show_progress: bool,
               total: int | None, pages) -> tuple[Path | None, str | None]:
    """Lay the BM25 part of the folder into ``base``: hard links of the index folder ``source``
    (its dense files too when ``_reuse`` says they serve as they are), or a build of the corpus.
    Returns ``(source as a path or None, what of its embeddings is reused: "index", "vectors" or None)``."""
    src = Path(source) if isinstance(source, (str, Path)) else None
    if src is not None and (src / "meta.json").exists():
        src_meta = read_meta(src)
        if "bm25" not in src_meta.get("backends", []):  # read_meta: an old "bm25s" reads as "bm25"
            raise ValueError(f"{src} has no bm25 index to build on; rebuild it with --backend bm25")
        reuse = _reuse(src_meta, src, encoder, params)
        shutil.copytree(src, base, copy_function=_link_or_copy,
                        ignore=None if reuse == "index" else shutil.ignore_patterns(DENSE_DIR))
        return src, reuse
    build_index(source, base, backends=("bm25",), params=bm25_params, show_progress=show_progress, total=total,
                pages=pages)
    return src, None


def _dense_part(base: Path, meta: dict, src: Path | None, reuse: str | None, encoder, params: FaissParams, chunk: int,
                show_progress: bool) -> dict:
    """Write the faiss index of ``base`` (kept, re-indexed from ``src``'s vectors, or encoded) and
    return its ``meta["dense"]`` entry."""
    t1 = time.perf_counter()
    if reuse == "index":
        return dict(meta["dense"], reused_from=str(src))
    if reuse == "vectors":
        index = _reindex(src, params, chunk, show_progress)
        _write_faiss(base, index)
        index_s = time.perf_counter() - t1
        old = {k: v for k, v in meta["dense"].items() if k not in _INDEX_KEYS and k != "reused_from"}
        return {**old, **params.describe(), "vectors_from": str(src), "index_seconds": round(index_s, 3),
                "build_seconds": round(old.get("encode_seconds", 0.0) + index_s, 3)}
    encoder.dim  # loads (and verifies) the model outside the encoding time
    t2 = time.perf_counter()
    index = encode_passages(DocStore(base), encoder, params, chunk, show_progress)
    encode_s = time.perf_counter() - t2
    _write_faiss(base, index)
    return {**encoder.describe(), **params.describe(), "metric": "inner_product",
            "passage_text": "Passage.contents(): '\"Title\"\\ntext'", "faiss": _faiss().__version__,
            "encode_seconds": round(encode_s, 3), "passages_per_second": round(index.ntotal / max(encode_s, 1e-9), 1),
            "build_seconds": round(time.perf_counter() - t1, 3)}


def _write_faiss(base: Path, index) -> None:
    (base / DENSE_DIR).mkdir()
    _faiss().write_index(index, str(base / DENSE_DIR / FAISS_FILE))


class DenseIndex:
    """A loaded dense index folder: ``search(queries, k)`` by cosine similarity, passages by position.

    ``model`` overrides the encoder recorded in ``meta.json`` (say, the same model moved to
    another path); ``ef_search`` the HNSW search breadth.
    """

    def __init__(self, folder: str | Path, model: str | None = None, mmap: bool = True, ef_search: int | None = None,
                 device: str | None = None, docs: DocStore | None = None):
        from corpora.encoder import Encoder

        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        d = self.meta.get("dense")
        path = self.folder / DENSE_DIR / FAISS_FILE
        if not d or not path.exists():
            raise ValueError(f"{self.folder} has no dense index; build one with python -m corpora.build --backend dense")
        faiss = _faiss()
        flags = (faiss.IO_FLAG_MMAP | getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        self.index = faiss.read_index(str(path), flags)
        self.ef_search = int(ef_search or d.get("ef_search", 0)) or None
        self.encoder = Encoder(model or d["model"], d.get("query_prefix", ""), d.get("passage_prefix", ""), device=device,
                               max_seq_length=d.get("max_seq_length"))
        self.docs = docs if docs is not None else DocStore(self.folder)
        if self.index.ntotal != len(self.docs):
            raise ValueError(f"{path} holds {self.index.ntotal} vectors for {len(self.docs)} passages: rebuild it")
        self._titles: dict[str, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def titles(self) -> dict[str, list[int]]:
        if self._titles is None:
            self._titles = load_titles(self.folder)
        return self._titles

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Hit]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries; wrap a single query in a list")
        return [[self._hit(i, s) for i, s in row] for row in self.search_ids(queries, k)]

    def search_ids(self, queries: Sequence[str], k: int = 3) -> list[list[tuple[int, float]]]:
        """Positions and scores only (no passage decoding)."""
        rows: list[list[tuple[int, float]]] = [[] for _ in queries]
        live = [i for i, q in enumerate(queries) if q.strip()]
        if live and k > 0:
            vecs = self.encoder.encode_queries([queries[i] for i in live])
            for i, row in zip(live, self.search_vectors(vecs, k)):
                rows[i] = row
        return rows

    def search_vectors(self, vecs_Q_D: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """Top-``k`` passages for each (normalised) query vector, ties by passage position."""
        if vecs_Q_D.shape[1] != self.index.d:
            raise ValueError(f"encoder {self.encoder.name} gives {vecs_Q_D.shape[1]} dimensions, the index holds {self.index.d}")
        kk = min(self.index.ntotal, k + TIE_SLACK)
        if kk <= 0:
            return [[] for _ in range(len(vecs_Q_D))]
        faiss = _faiss()
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search or 0, kk)) if hasattr(self.index, "hnsw") else None
        scores_Q_K, ids_Q_K = self.index.search(np.ascontiguousarray(vecs_Q_D, dtype=np.float32), kk, params=params)
        out = []
        for ids, scores in zip(ids_Q_K.tolist(), scores_Q_K.tolist()):
            row = sorted(((i, s) for i, s in zip(ids, scores) if i >= 0), key=lambda t: (-t[1], t[0]))
            out.append(row[:k])
        return out

    def _hit(self, i: int, score: float) -> Hit:
        p = self.docs[i]
        return Hit(p.id, p.title, p.text, score)
