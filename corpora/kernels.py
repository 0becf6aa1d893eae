"""BM25 top-k over a precomputed term->posting CSC matrix (the arrays bm25s saves).

``indptr[t]:indptr[t+1]`` are the postings of vocabulary id ``t``: ``indices`` holds the
passage positions and ``data`` the BM25 contribution of ``t`` to each. A query's score vector is
the sum of its terms' postings; the top k are taken by score with ties broken by position.

The numba kernel touches only the query terms' postings, one tile of ``TILE`` passages at a
time (each term keeps a cursor in its passage-sorted posting list), so the score buffer of a
tile stays in the core's L2 cache whatever the index size; the per-thread tile buffers (kept
across calls, ``Scratch``) are reset entry by entry, and a size-k heap keeps the best hits, so
a query costs O(postings + passages / TILE), not O(passages). The kernels are compiled with ``cache=True``: the first process on a machine compiles
them (a few seconds) and every later process loads machine code from the cache. bm25s's own
kernels are compiled without a cache, which costs ~7 s at the first query of every process.
Without numba, a NumPy version gives the same results.
"""
from __future__ import annotations

import os

import numpy as np

# Numba's OpenMP workers spin between parallel regions by default; on a shared 2-core box
# that made a lone query cost 12 ms instead of 0.2 ms. Passive waiting unless the user chose.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import numba
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False


def topk_dense(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k positions and scores of a dense score vector; ties by position; zeros dropped."""
    n = scores.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, np.int64), scores[:0]
    kth = np.partition(scores, n - k)[n - k]
    cand = np.flatnonzero(scores >= kth) if kth > 0 else np.flatnonzero(scores > 0)
    s = scores[cand]
    order = np.lexsort((cand, -s))[:k]
    return cand[order], s[order]


def topk_numpy(data, indices, indptr, num_docs, queries: list[np.ndarray], k: int):
    out_idx = np.full((len(queries), k), -1, dtype=np.int64)
    out_score = np.zeros((len(queries), k), dtype=np.float32)
    for qi, q in enumerate(queries):
        scores = np.zeros(num_docs, dtype=np.float32)
        for t in q:
            a, b = indptr[t], indptr[t + 1]
            scores[indices[a:b]] += data[a:b]
        idx, s = topk_dense(scores, k)
        out_idx[qi, : len(idx)] = idx
        out_score[qi, : len(idx)] = s
    return out_idx, out_score


if HAVE_NUMBA:

    @njit(cache=True, nogil=True, inline="always")
    def _better(s1, d1, s2, d2):
        return s1 > s2 or (s1 == s2 and d1 < d2)

    @njit(cache=True, nogil=True, inline="always")
    def _push(sc, d, k, hs, hi, m):
        """Offer hit (sc, d) to the size-k heap ``hs``/``hi`` holding ``m`` hits; returns the new m."""
        if m < k:
            c = m
            m += 1
            hs[c], hi[c] = sc, d
            while c > 0:  # sift up
                par = (c - 1) // 2
                if _better(hs[par], hi[par], hs[c], hi[c]):
                    hs[par], hs[c] = hs[c], hs[par]
                    hi[par], hi[c] = hi[c], hi[par]
                    c = par
                else:
                    break
        elif _better(sc, d, hs[0], hi[0]):
            hs[0], hi[0] = sc, d
            c = 0
            while True:  # sift down
                l, r, w = 2 * c + 1, 2 * c + 2, c
                if l < m and _better(hs[w], hi[w], hs[l], hi[l]):
                    w = l
                if r < m and _better(hs[w], hi[w], hs[r], hi[r]):
                    w = r
                if w == c:
                    break
                hs[w], hs[c] = hs[c], hs[w]
                hi[w], hi[c] = hi[c], hi[w]
                c = w
        return m

    @njit(cache=True, nogil=True)
    def _one_query(data, indices, indptr, num_docs, q, k, scores, touched, out_idx, out_score):
        """Best k passages of query ``q``, one tile of ``len(scores)`` passages at a time.

        Each term keeps a cursor in its posting list (sorted by passage); a tile takes every
        term's postings below the tile's end, in query-term order, into ``scores`` (all zero on
        entry and on exit), then offers the tile's touched passages to a size-k heap. The
        tile's buffer stays in the core's cache however large the index; sums are made in the
        same order as without tiles, so scores are identical.
        """
        tile = scores.shape[0]
        nq = q.shape[0]
        cur = np.empty(nq, dtype=np.int64)
        end = np.empty(nq, dtype=np.int64)
        for j in range(nq):
            cur[j] = indptr[q[j]]
            end[j] = indptr[q[j] + 1]
        # size-k heap whose root is the worst kept hit (lowest score, then highest position)
        hs = np.empty(k, dtype=np.float32)
        hi = np.empty(k, dtype=np.int64)
        m = 0
        for lo in range(0, num_docs, tile):
            top = min(lo + tile, num_docs)
            n_t = 0
            for j in range(nq):
                p, e = cur[j], end[j]
                while p < e:
                    d = indices[p]
                    if d >= top:
                        break
                    v = data[p]
                    p += 1
                    if v == 0:  # a zero-idf term: adds nothing, and must not mark the passage touched
                        continue
                    x = d - lo
                    if scores[x] == 0:
                        touched[n_t] = x
                        n_t += 1
                    scores[x] += v
                cur[j] = p
            for j in range(n_t):
                x = touched[j]
                sc = scores[x]
                scores[x] = 0
                if sc > 0:
                    m = _push(sc, lo + x, k, hs, hi, m)
        # insertion sort of the kept hits, best first
        for x in range(1, m):
            sv, dv = hs[x], hi[x]
            y = x - 1
            while y >= 0 and _better(sv, dv, hs[y], hi[y]):
                hs[y + 1], hi[y + 1] = hs[y], hi[y]
                y -= 1
            hs[y + 1], hi[y + 1] = sv, dv
        for r in range(m):
            out_idx[r] = hi[r]
            out_score[r] = hs[r]

    def _chunked(data, indices, indptr, num_docs, flat, ptr, k, n_chunks, scores_C_T, touched_C_T, out_idx, out_score):
        n_q = ptr.shape[0] - 1
        for c in prange(n_chunks):
            # one tile buffer per chunk, reused per query; all zero on entry and on exit
            for qi in range(c * n_q // n_chunks, (c + 1) * n_q // n_chunks):
                _one_query(data, indices, indptr, num_docs, flat[ptr[qi] : ptr[qi + 1]], k, scores_C_T[c], touched_C_T[c], out_idx[qi], out_score[qi])

    @njit(cache=True, nogil=True)
    def _sorted_postings(indptr, indices):
        for t in range(indptr.shape[0] - 1):
            for p in range(indptr[t] + 1, indptr[t + 1]):
                if indices[p] <= indices[p - 1]:
                    return False
        return True

    # parallel over chunks for batches; serial (no thread pool woken) for a few queries
    _many_queries = njit(cache=True, parallel=True)(_chunked)
    _few_queries = njit(cache=True)(_chunked)


TILE = 1 << 16  # passages per tile: 256 KiB of float32 scores, within a core's L2


def postings_sorted(indptr, indices) -> bool:
    """Whether every posting list is in increasing passage order (tiling needs it)."""
    if HAVE_NUMBA:
        return bool(_sorted_postings(indptr, indices))
    return all(bool(np.all(np.diff(indices[indptr[t] : indptr[t + 1]]) > 0)) for t in range(len(indptr) - 1))


class Scratch:
    """Per-thread tile buffers (scores, touched) for one index, reused across calls.

    The kernel leaves them zeroed, so they are kept rather than allocated (and page-faulted)
    per call. A pool, so concurrent callers each take their own set.
    """

    def __init__(self, num_docs: int, tile: int = TILE):
        import threading

        self.num_docs = max(1, min(num_docs, tile))  # buffer length: one tile
        self._free: list[tuple[np.ndarray, np.ndarray]] = []
        self._lock = threading.Lock()

    def take(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            for j, (s, t) in enumerate(self._free):
                if s.shape[0] >= rows:
                    return self._free.pop(j)
        return np.zeros((rows, self.num_docs), dtype=np.float32), np.zeros((rows, self.num_docs), dtype=np.int32)

    def give(self, bufs: tuple[np.ndarray, np.ndarray]) -> None:
        with self._lock:
            self._free.append(bufs)


def topk(data, indices, indptr, num_docs: int, queries: list[np.ndarray], k: int, scratch: Scratch | None = None):
    """(positions [Q, k], scores [Q, k]); missing slots have position -1 and score 0."""
    if not HAVE_NUMBA:
        return topk_numpy(data, indices, indptr, num_docs, queries, k)
    out_idx = np.full((len(queries), k), -1, dtype=np.int64)
    out_score = np.zeros((len(queries), k), dtype=np.float32)
    if not queries:
        return out_idx, out_score
    ptr = np.zeros(len(queries) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(q) for q in queries])
    flat = np.concatenate([np.asarray(q, dtype=np.int64) for q in queries]) if ptr[-1] else np.zeros(0, np.int64)
    few = len(queries) < 8
    n_chunks = 1 if few else min(len(queries), numba.get_num_threads())
    scratch = scratch or Scratch(num_docs)
    bufs = scratch.take(n_chunks)
    kernel = _few_queries if few else _many_queries
    kernel(data, indices, indptr, num_docs, flat, ptr, k, n_chunks, bufs[0], bufs[1], out_idx, out_score)
    scratch.give(bufs)  # only after a clean run: the kernel leaves the buffers zeroed
    return out_idx, out_score
