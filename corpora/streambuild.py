"""Streamed, bounded-memory BM25 build: corpus -> one term-major CSC posting matrix on disk.

Index format 2 (``meta.json`` ``"format": 2``). Two passes, neither holds the corpus:

1. **Stream and tokenise.** Each passage goes to the doc store (``docstore.py``) and through
   the project tokeniser as integer term ids (``TermEncoder``: one dict lookup per word, same
   tokens as ``tokenize.tokenize``). Ids pile up in a buffer; every ``chunk_tokens`` tokens the
   buffer is turned into sorted ``(term, doc, tf)`` triples with NumPy and written to a temp
   chunk file, and the chunk's document frequencies are added to the global ``df``. Document
   lengths are kept (4 bytes a passage), nothing else per token.
2. **Score and lay out.** With the global ``df``, ``N`` and ``avgdl`` known, every posting's
   BM25 weight is final, and ``indptr = cumsum(df)`` fixes where each term's postings go. The
   term axis is cut into blocks of at most ``block_postings`` postings; for each block the
   matching slice of every chunk (in corpus order) is read, scored and scattered into an
   in-memory block buffer, and the block is appended to ``indices.npy``/``data.npy``.

So a posting list is in passage order and the file is exactly what a single in-memory build
would write, whatever the chunking (tested byte for byte). Peak memory is set by
``chunk_tokens`` and ``block_postings`` (~0.5-1.5 GB at the defaults) plus the vocabulary
dicts and the titles map, not by the number of passages. Search is one kernel call over one
CSC matrix (``kernels.topk``): no fan-out, no merge, ties by passage position for free.

Scores are rank-bm25's ``BM25Okapi`` exactly (float64 weights stored as float32): Robertson
idf ``log(N - df + 0.5) - log(df + 0.5)``, negative idf floored at ``0.25 x mean idf`` as
rank-bm25 does, term part ``tf (k1 + 1) / (tf + k1 (1 - b + b dl / avgdl))``.

The vocabulary is stored sorted-searchable (``vocab.py``), so loading reads no vocabulary.
"""
from __future__ import annotations

import json
import shutil
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import Stemmer
from tqdm.auto import tqdm

from corpora.corpus import Passage
from corpora.docstore import DocStoreWriter
from corpora.tokenize import _WORD, STOP_WORDS
from corpora.vocab import write_vocab

CHUNK_TOKENS = 32_000_000
BLOCK_POSTINGS = 32_000_000
POSTINGS = "postings"


class TermEncoder:
    """Text -> term ids with the project tokeniser; raw words are memoised (stop words -> -1)."""

    def __init__(self):
        self.word_ids: dict[str, int] = {}
        self.term_ids: dict[str, int] = {}
        self._stem = Stemmer.Stemmer("english").stemWord

    def encode(self, text: str) -> list[int]:
        """Ids of every word, -1 for stop words (dropped later, in NumPy)."""
        words = _WORD.findall(text.lower())
        get = self.word_ids.__getitem__
        try:
            return list(map(get, words))
        except KeyError:
            for w in words:
                if w not in self.word_ids:
                    self.word_ids[w] = -1 if w in STOP_WORDS else self.term_ids.setdefault(self._stem(w), len(self.term_ids))
            return list(map(get, words))

    def terms(self) -> list[str]:
        return list(self.term_ids)  # insertion order = id order


class TitleMap:
    """title -> passage positions, compact while streaming: one int per title whose passages are
    contiguous (``start << 24 | count``, the usual case), a list only for titles seen apart."""

    def __init__(self):
        self._m: dict[str, int | list[int]] = {}

    def add(self, title: str, i: int) -> None:
        v = self._m.get(title)
        if v is None:
            self._m[title] = (i << 24) | 1
        elif isinstance(v, list):
            v.append(i)
        elif (v >> 24) + (v & 0xFFFFFF) == i and (v & 0xFFFFFF) < 0xFFFFFF:
            self._m[title] = v + 1
        else:
            self._m[title] = list(range(v >> 24, (v >> 24) + (v & 0xFFFFFF))) + [i]

    def __len__(self) -> int:
        return len(self._m)

    def items(self):
        for t, v in self._m.items():
            yield t, v if isinstance(v, list) else list(range(v >> 24, (v >> 24) + (v & 0xFFFFFF)))

    def write_json(self, path: Path) -> None:
        """The ``titles.json`` object, written one title at a time."""
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("{")
            for j, (t, pos) in enumerate(self.items()):
                fh.write((", " if j else "") + json.dumps(t, ensure_ascii=False) + ": " + json.dumps(pos))
            fh.write("}")


def _write_npy(path: Path, dtype, n: int):
    """Open ``path`` as a 1-D .npy of ``n`` items with the header written; caller appends bytes."""
    fh = open(path, "wb")
    np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)})
    return fh


def _read_slice(path: Path, start: int, stop: int) -> np.ndarray:
    """Items ``start:stop`` of a 1-D .npy file, read (not mapped) so they leave no resident pages."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(fh)
        fh.seek(fh.tell() + start * dtype.itemsize)
        return np.fromfile(fh, dtype=dtype, count=stop - start)


class _Chunks:
    """Pass-1 spill files: sorted (term, doc, tf) triples per chunk of passages."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()
        self.doc_start: list[int] = []
        self.df = np.zeros(0, dtype=np.int64)

    def flush(self, buf: array, raw_lens: array, doc_start: int) -> None:
        nd = len(raw_lens)
        if nd == 0:
            return
        tok = np.frombuffer(buf, dtype=np.int32)
        doc = np.repeat(np.arange(nd, dtype=np.int64), np.frombuffer(raw_lens, dtype=np.int32))
        keep = tok >= 0
        key = tok[keep].astype(np.int64)
        key *= nd
        key += doc[keep]
        del doc, keep, tok
        key.sort()
        if key.size:
            first = np.empty(key.size, dtype=bool)
            first[0] = True
            np.not_equal(key[1:], key[:-1], out=first[1:])
            starts = np.flatnonzero(first)
            del first
            tf = np.diff(np.append(starts, key.size)).astype(np.int32)
            uniq = key[starts]
            del key, starts
        else:
            tf, uniq = np.zeros(0, np.int32), np.zeros(0, np.int64)
        terms, docs = (uniq // nd).astype(np.int32), (uniq % nd).astype(np.int32)
        del uniq
        c = len(self.doc_start)
        for name, arr in (("terms", terms), ("docs", docs), ("tf", tf)):
            np.save(self.folder / f"{c:05d}-{name}.npy", arr)
        cnt = np.bincount(terms)
        if cnt.size > self.df.size:
            self.df = np.concatenate([self.df, np.zeros(cnt.size - self.df.size, np.int64)])
        self.df[: cnt.size] += cnt
        self.doc_start.append(doc_start)

    def path(self, c: int, name: str) -> Path:
        return self.folder / f"{c:05d}-{name}.npy"


def idf_okapi(df: np.ndarray, n_docs: int, epsilon: float = 0.25) -> np.ndarray:
    """rank-bm25's ``BM25Okapi`` idf: Robertson's, negatives floored at ``epsilon x mean idf``."""
    df = df.astype(np.float64)
    idf = np.log(n_docs - df + 0.5) - np.log(df + 0.5)
    if idf.size:
        idf[idf < 0] = epsilon * (idf.sum() / idf.size)
    return idf


def stream_build(
    passages: Iterable[Passage],
    tmp: Path,
    k1: float,
    b: float,
    build_csc: bool = True,
    keep_token_lists: bool = False,
    show_progress: bool = True,
    total: int | None = None,
    source: str = "",
    chunk_tokens: int = CHUNK_TOKENS,
    block_postings: int = BLOCK_POSTINGS,
) -> dict:
    """Write doc store, titles and (if ``build_csc``) the format-2 postings into ``tmp``.

    Returns stats for ``meta.json``, plus ``"titles"`` (a ``TitleMap``) and, with ``keep_token_lists`` (for the
    rank-bm25 reference backend, which needs every token list in memory), ``"token_lists"``.
    Raises ``ValueError`` on an empty corpus or a duplicate passage id.
    """
    p1 = _tokenise(passages, tmp, build_csc, keep_token_lists, show_progress, total, chunk_tokens)
    n = p1.n
    if n == 0:
        raise ValueError(f"corpus {source or '<iterable>'} has no passages")
    _check_unique_ids(np.frombuffer(p1.id_hash, dtype=np.int64), tmp, source)
    p1.id_hash = None  # each big buffer is let go as soon as it is used up (peak memory)
    terms = p1.enc.terms()
    p1.enc = None
    dl_np = np.frombuffer(p1.dl, dtype=np.int32)
    avgdl = float(dl_np.sum(dtype=np.int64)) / n
    stats = {"num_passages": n, "num_terms": len(terms), "avgdl": avgdl, "titles": p1.titles}
    if keep_token_lists:
        stats["token_lists"] = [[terms[t] for t in ids if t >= 0] for ids in p1.token_lists]
        p1.token_lists = None
    chunks = p1.chunks
    if chunks is not None:
        chunks.flush(p1.buf, p1.raw_lens, p1.doc_start)  # the last chunk
        p1.buf = p1.raw_lens = None
        write_vocab(terms, tmp)
        del terms
        stats["num_postings"] = _write_postings(chunks, n, dl_np, avgdl, k1, b, tmp / POSTINGS, block_postings, show_progress)
        stats["num_chunks"] = len(chunks.doc_start)
        shutil.rmtree(chunks.folder)
    return stats


@dataclass
class _Tokenised:
    """What pass 1 leaves: passage count, term encoder, titles, id hashes, lengths, token lists
    (rank-bm25 only), the spilled chunks and the tokens of the last chunk, not yet spilled."""
    n: int
    enc: TermEncoder | None
    titles: TitleMap
    id_hash: array | None
    dl: array
    token_lists: list[list[int]] | None
    chunks: _Chunks | None
    buf: array | None
    raw_lens: array | None
    doc_start: int


def _tokenise(passages: Iterable[Passage], tmp: Path, build_csc: bool, keep_token_lists: bool, show_progress: bool,
              total: int | None, chunk_tokens: int) -> _Tokenised:
    """Pass 1: each passage into the doc store and the titles, its text into term ids (spilled to
    sorted chunk files every ``chunk_tokens`` tokens when ``build_csc``)."""
    enc = TermEncoder()
    writer = DocStoreWriter(tmp)
    titles = TitleMap()
    id_hash = array("q")
    dl = array("i")
    buf, raw_lens = array("i"), array("i")
    token_lists: list[list[int]] = []
    chunks = _Chunks(tmp / ".chunks") if build_csc else None
    doc_start = 0
    n = 0
    for p in tqdm(passages, total=total, desc="pass 1/2: tokenise", unit="psg", disable=not show_progress, mininterval=2):
        id_hash.append(hash(p.id))
        i = writer.add(p)
        titles.add(p.title, i)
        ids = enc.encode(f"{p.title} {p.text}")
        dl.append(len(ids) - ids.count(-1))
        if keep_token_lists:
            token_lists.append(ids)
        n += 1
        if chunks is not None:
            buf.extend(ids)
            raw_lens.append(len(ids))
            if len(buf) >= chunk_tokens:
                chunks.flush(buf, raw_lens, doc_start)
                doc_start, buf, raw_lens = n, array("i"), array("i")
    writer.close()
    return _Tokenised(n, enc, titles, id_hash, dl, token_lists, chunks, buf, raw_lens, doc_start)


def _check_unique_ids(h: np.ndarray, folder: Path, source: str) -> None:
    """Duplicate ids by 64-bit hash (8 bytes a passage), confirmed on the stored ids."""
    order = np.argsort(h, kind="stable")
    hs = h[order]
    same = np.flatnonzero(hs[1:] == hs[:-1])
    if same.size == 0:
        return
    from corpora.docstore import DocStore

    store = DocStore(folder)
    for j in same:
        a, c = store[int(order[j])], store[int(order[j + 1])]
        if a.id == c.id:
            raise ValueError(f"duplicate passage id {a.id!r} in corpus {source or '<iterable>'} "
                             f"(passages {int(order[j])} and {int(order[j + 1])})")


def _write_postings(chunks: _Chunks, n_docs: int, dl: np.ndarray, avgdl: float, k1: float, b: float,
                    out: Path, block_postings: int, show_progress: bool) -> int:
    df = chunks.df
    n_terms = df.size
    indptr = np.zeros(n_terms + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    nnz = int(indptr[-1])
    idf = idf_okapi(df, n_docs)
    # block edges on the term axis: each block holds <= block_postings postings (or one term)
    edges = [0]
    while edges[-1] < n_terms:
        t0 = edges[-1]
        t1 = int(np.searchsorted(indptr, indptr[t0] + block_postings, side="right")) - 1
        edges.append(min(max(t1, t0 + 1), n_terms))
    n_chunks = len(chunks.doc_start)
    # where each block starts inside each chunk's (term-sorted) triples
    cuts = np.zeros((n_chunks, len(edges)), dtype=np.int64)
    for c in range(n_chunks):
        cuts[c] = np.searchsorted(np.load(chunks.path(c, "terms"), mmap_mode="r"), edges)
    out.mkdir()
    np.save(out / "indptr.npy", indptr)
    f_idx, f_val = _write_npy(out / "indices.npy", np.int32, nnz), _write_npy(out / "data.npy", np.float32, nnz)
    norm = k1 * (1 - b + b * dl.astype(np.float64) / avgdl)  # per passage; 8 bytes a passage
    try:
        bar = tqdm(total=nnz, desc="pass 2/2: postings", unit="post", unit_scale=True, disable=not show_progress, mininterval=2)
        for e in range(len(edges) - 1):
            t0, t1 = edges[e], edges[e + 1]
            base = indptr[t0]
            size = int(indptr[t1] - base)
            blk_idx = np.empty(size, dtype=np.int32)
            blk_val = np.empty(size, dtype=np.float32)
            fill = indptr[t0:t1] - base
            for c in range(n_chunks):
                s, stop = int(cuts[c, e]), int(cuts[c, e + 1])
                if s == stop:
                    continue
                terms = _read_slice(chunks.path(c, "terms"), s, stop) - t0
                docs = _read_slice(chunks.path(c, "docs"), s, stop).astype(np.int64) + chunks.doc_start[c]
                tf = _read_slice(chunks.path(c, "tf"), s, stop).astype(np.float64)
                cnt = np.bincount(terms, minlength=t1 - t0)
                first = np.cumsum(cnt) - cnt  # start of each term's run in this slice
                dest = fill[terms] + (np.arange(terms.size) - first[terms])
                blk_idx[dest] = docs
                # rank-bm25's expression, same operation order, float64
                blk_val[dest] = idf[terms + t0] * (tf * (k1 + 1) / (tf + norm[docs]))
                fill += cnt
            blk_idx.tofile(f_idx)
            blk_val.tofile(f_val)
            bar.update(size)
        bar.close()
    finally:
        f_idx.close()
        f_val.close()
    for name in ("indices.npy", "data.npy"):
        if np.load(out / name, mmap_mode="r").shape != (nnz,):
            raise RuntimeError(f"{out / name}: wrong number of postings")
    return nnz
