"""Search an index from the command line and print a readable result list.

    python -m corpora.search --index DIR "who directed Ed Wood" ["another query" ...] [-k 5]

``--index`` takes an index folder, a corpus file, ``bundled`` (default) or an ``http://`` URL.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
import time

from corpora.index import BACKEND_ALIASES, BACKENDS
from corpora.retrievers import get_retriever


def format_hits(query: str, hits, width: int = 100) -> str:
    lines = [f"query: {query}  ({len(hits)} hits)"]
    for rank, h in enumerate(hits, 1):
        lines.append(f"{rank:>3}. [{h.score:7.3f}] {h.title}  (id {h.doc_id})")
        body = textwrap.shorten(h.text, width=width * 2, placeholder=" ...")
        lines.extend(textwrap.wrap(body, width=width, initial_indent="       ", subsequent_indent="       "))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corpora.search", description=__doc__.split("\n\n")[0])
    ap.add_argument("queries", nargs="+")
    ap.add_argument("--index", default="bundled")
    ap.add_argument("--backend", default="bm25", choices=[*BACKENDS, "dense", "hybrid", *BACKEND_ALIASES],
                    help="BM25 backend (bm25s: the old name of bm25), or dense/hybrid")
    ap.add_argument("-k", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        retriever = get_retriever(args.index, args.backend)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = retriever.search(args.queries, k=args.k)
    ms = 1000 * (time.perf_counter() - t0)
    width = min(100, shutil.get_terminal_size((100, 20)).columns - 8)
    for q, hits in zip(args.queries, results):
        print(format_hits(q, hits, width))
        print()
    print(f"{len(args.queries)} queries in {ms:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
