"""Hybrid retrieval: BM25 and dense rankings merged by reciprocal rank fusion (RRF).

RRF (Cormack, Clarke and Buettcher, SIGIR 2009) scores a passage by its ranks alone:

    rrf(d) = sum over rankings r containing d of  1 / (k + rank_r(d)),   rank 1-based,

with k = 60 by default (the paper's value). A passage missing from a ranking adds nothing to
it. Scores of the two retrievers never meet, so BM25's unbounded scores and cosine
similarities need no calibration. Each retriever contributes its top ``depth`` (default 100,
at least the ``k`` asked) passages; the fused list is ordered by RRF score, ties by passage
position, and a hit's ``score`` is its RRF score. Both settings live in the index folder's
``meta.json`` ``"fusion"`` and can be overridden when loading.

A hybrid folder is a dense folder (``dense.py``) whose ``meta.json`` says ``"kind": "hybrid"``;
any dense folder also opens as hybrid with ``backend="hybrid"``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from corpora.index import BM25Index, Hit

RRF_K = 60.0
RRF_DEPTH = 100


def rrf_fuse(rankings: Sequence[Sequence[int]], k: int, rrf_k: float = RRF_K,
             weights: Sequence[float] | None = None) -> list[tuple[int, float]]:
    """Fuse ranked lists of passage positions: the top ``k`` ``(position, rrf score)``, best first.

    ``weights`` (one per ranking, default 1) scale each ranking's contribution. A position
    repeated within one ranking counts at its first (best) rank only.
    """
    scores: dict[int, float] = {}
    for r, ranking in enumerate(rankings):
        w = 1.0 if weights is None else float(weights[r])
        seen: set[int] = set()
        for rank, doc in enumerate(ranking, start=1):
            if doc in seen:
                continue
            seen.add(doc)
            scores[doc] = scores.get(doc, 0.0) + w / (rrf_k + rank)
    return sorted(scores.items(), key=lambda t: (-t[1], t[0]))[:k]


class HybridIndex:
    """BM25 (``backend``) and dense search over one index folder, fused by RRF."""

    def __init__(self, folder: str | Path, backend: str = "bm25", model: str | None = None, mmap: bool = True,
                 rrf_k: float | None = None, depth: int | None = None, ef_search: int | None = None,
                 device: str | None = None):
        from corpora.dense import DenseIndex

        self.bm25 = BM25Index(folder, backend=backend, mmap=mmap)
        self.dense = DenseIndex(folder, model=model, mmap=mmap, ef_search=ef_search, device=device, docs=self.bm25.docs)
        self.folder, self.meta, self.docs = self.bm25.folder, self.bm25.meta, self.bm25.docs
        fusion = self.meta.get("fusion", {})
        self.rrf_k = float(rrf_k if rrf_k is not None else fusion.get("k", RRF_K))
        self.depth = int(depth if depth is not None else fusion.get("depth", RRF_DEPTH))

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def titles(self) -> dict[str, list[int]]:
        return self.bm25.titles

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[Hit]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries; wrap a single query in a list")
        return [[self._hit(i, s) for i, s in row] for row in self.search_ids(queries, k)]

    def search_ids(self, queries: Sequence[str], k: int = 3) -> list[list[tuple[int, float]]]:
        depth = max(k, self.depth)
        sparse = self.bm25.search_ids(queries, depth)
        dense = self.dense.search_ids(queries, depth)
        return [rrf_fuse([[i for i, _ in s], [i for i, _ in d]], k, self.rrf_k) for s, d in zip(sparse, dense)]

    def _hit(self, i: int, score: float) -> Hit:
        p = self.docs[i]
        return Hit(p.id, p.title, p.text, score)
