"""A memory-mapped passage store: one UTF-8 JSONL blob plus an int64 offsets array.

``docs.jsonl`` holds one ``[id, title, text]`` JSON array per line; ``offsets.npy`` holds the
byte offset of every line and the end offset. Opening costs two ``mmap`` calls whatever the
corpus size; reading passage ``i`` decodes one line. Writing streams: lines go straight to
disk and offsets are flushed in blocks, so a writer holds a few MB whatever the corpus size.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
from array import array
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from corpora.corpus import Passage

DOCS = "docs.jsonl"
OFFSETS = "offsets.npy"


class DocStoreWriter:
    """Append passages; ``close()`` writes the offsets. Used inside a temp build folder."""

    _FLUSH = 1 << 20  # offsets kept in memory before they go to the temp file

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fh = open(self.folder / DOCS, "wb")
        self._off_tmp = self.folder / (OFFSETS + ".raw")
        self._off_fh = open(self._off_tmp, "wb")
        self._offsets = array("q", [0])
        self._end = 0
        self._n = 0

    def add(self, p: Passage) -> int:
        line = json.dumps([p.id, p.title, p.text], ensure_ascii=False).encode("utf-8") + b"\n"
        self._fh.write(line)
        self._end += len(line)
        self._offsets.append(self._end)
        if len(self._offsets) >= self._FLUSH:
            self._offsets.tofile(self._off_fh)
            self._offsets = array("q")
        self._n += 1
        return self._n - 1

    def close(self) -> int:
        self._fh.close()
        self._offsets.tofile(self._off_fh)
        self._off_fh.close()
        with open(self.folder / OFFSETS, "wb") as out, open(self._off_tmp, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, {"descr": "<i8", "fortran_order": False, "shape": (self._n + 1,)})
            shutil.copyfileobj(raw, out, 1 << 22)
        os.unlink(self._off_tmp)
        return self._n


class DocStore:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.offsets = np.load(folder / OFFSETS, mmap_mode="r")
        self._file = open(folder / DOCS, "rb")
        size = (folder / DOCS).stat().st_size
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Passage:
        if not 0 <= i < len(self):
            raise IndexError(f"passage index {i} out of range 0..{len(self) - 1}")
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        pid, title, text = json.loads(self._mm[start:end])
        return Passage(pid, title, text)

    def __iter__(self) -> Iterator[Passage]:
        for i in range(len(self)):
            yield self[i]

    def many(self, idx: Iterable[int]) -> list[Passage]:
        return [self[int(i)] for i in idx]

    def __getstate__(self):  # pragma: no cover - stores are per process, never pickled
        raise TypeError("DocStore holds an mmap; pickle the index path instead")
