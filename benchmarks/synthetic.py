"""A synthetic retrieval corpus for ``benchmarks/retrieval.py``: Zipfian vocabulary (100k words,
exponent 1.07 over ranks 51+, the head standing for stop words, so the commonest term is in ~28%
of passages, as in real text), 60-140 words per passage, streamed to the cache in 10k-passage
blocks, each from its own seed, so a smaller corpus is a prefix of a larger one. Queries: 3-6
words drawn from passages of the first 100k."""
from __future__ import annotations

import json
import os
import string
from pathlib import Path

import numpy as np

from common.files import cache_root

GEN_VERSION = "v3"


def _vocab(seed: int, vocab_size: int = 100_000) -> list[str]:
    rng = np.random.default_rng([seed, 0])
    letters = np.array(list(string.ascii_lowercase))
    lens = rng.integers(4, 10, size=vocab_size)
    chars = rng.choice(letters, size=int(lens.sum()))
    ends = np.cumsum(lens)
    return ["".join(chars[e - n : e]) for e, n in zip(ends, lens)]


def synthetic_corpus(size: int, seed: int = 0, block: int = 10_000) -> Path:
    """A Zipfian-vocabulary corpus of ``size`` passages (JSONL), streamed once into the cache."""
    path = cache_root() / "synthetic" / f"zipf-{size}-s{seed}-{GEN_VERSION}.jsonl"
    if path.exists():
        return path
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(seed)
    # Zipf over ranks 51..100,050: the 50 head ranks play the stop words that the tokeniser drops
    p = 1.0 / np.arange(51, len(vocab) + 51) ** 1.07
    cdf = np.cumsum(p / p.sum())
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for b, start in enumerate(tqdm(range(0, size, block), desc=f"synthetic corpus {size:,}", unit="block", mininterval=5)):
            rng = np.random.default_rng([seed, 1, b])  # one seed per block: sizes share prefixes
            n = min(block, size - start)
            lens = rng.integers(60, 141, size=n)
            words = np.minimum(np.searchsorted(cdf, rng.random(int(lens.sum()))), len(vocab) - 1).tolist()
            off, lines = 0, []
            for j, ln in enumerate(lens.tolist()):
                text = " ".join(map(vocab.__getitem__, words[off : off + ln]))
                off += ln
                lines.append(json.dumps({"id": f"syn{start + j}", "title": vocab[words[off - 1]], "text": text}))
            fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def synthetic_queries(corpus: Path, n: int, seed: int = 1, first: int = 100_000) -> list[str]:
    """3-6 distinct words of random passages among the first ``first`` (in every larger corpus too)."""
    rng = np.random.default_rng(seed)
    lines = []
    with open(corpus) as fh:
        for i, line in enumerate(fh):
            if i >= first:
                break
            if i % 97 == 0:
                lines.append(json.loads(line)["text"].split())
    out = []
    for _ in range(n):
        words = lines[rng.integers(len(lines))]
        out.append(" ".join(rng.choice(words, size=rng.integers(3, 7), replace=False)))
    return out
