"""The on-disk vocabulary of a format-2 index: term -> id without loading the terms.

``vocab.txt`` holds the terms in id order, one per line (tokens are ``\\w+`` stems, so never
contain a newline); ``vocab_offsets.npy`` their byte offsets; ``vocab_sorted.npy`` the ids in
the byte order of the terms. A lookup is a binary search over the memory-mapped files (~20
probes for 10M terms), so opening costs nothing whatever the vocabulary size. Queries repeat
words, so lookups are memoised.
"""
from __future__ import annotations

import bisect
import mmap
from functools import lru_cache
from pathlib import Path

import numpy as np

VOCAB, VOCAB_OFFSETS, VOCAB_SORTED = "vocab.txt", "vocab_offsets.npy", "vocab_sorted.npy"


def write_vocab(terms: list[str], folder: Path) -> None:
    """Terms in id order -> the three vocabulary files in ``folder``."""
    blobs = [t.encode("utf-8") for t in terms]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    with open(folder / VOCAB, "wb") as fh:
        pos = 0
        for i, t in enumerate(blobs):
            fh.write(t + b"\n")
            pos += len(t) + 1
            offsets[i + 1] = pos
    np.save(folder / VOCAB_OFFSETS, offsets)
    order = sorted(range(len(blobs)), key=blobs.__getitem__)
    np.save(folder / VOCAB_SORTED, np.asarray(order, dtype=np.int32))


class Vocab:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.offsets = np.load(folder / VOCAB_OFFSETS, mmap_mode="r")
        self.sorted_ids = np.load(folder / VOCAB_SORTED, mmap_mode="r")
        self._file = open(folder / VOCAB, "rb")
        size = (folder / VOCAB).stat().st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self.get = lru_cache(maxsize=1 << 16)(self._lookup)

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def term(self, i: int) -> str:
        return self._mm[int(self.offsets[i]) : int(self.offsets[i + 1]) - 1].decode("utf-8")

    def _sorted_bytes(self, j: int) -> bytes:
        i = int(self.sorted_ids[j])
        return self._mm[int(self.offsets[i]) : int(self.offsets[i + 1]) - 1]

    def _lookup(self, term: str) -> int:
        """Id of ``term``, or -1."""
        key = term.encode("utf-8")
        j = bisect.bisect_left(range(len(self)), key, key=self._sorted_bytes)
        if j < len(self) and self._sorted_bytes(j) == key:
            return int(self.sorted_ids[j])
        return -1

    def __getstate__(self):  # pragma: no cover - per process, like DocStore
        raise TypeError("Vocab holds an mmap; pickle the index path instead")
