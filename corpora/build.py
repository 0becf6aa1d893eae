"""Build a BM25 index folder from a corpus file, a Wikipedia dump or HTML pages.

    python -m corpora.build --corpus wiki.jsonl --out indexes/wiki [--backend bm25s rank_bm25]
                            [--pages pages.jsonl] [--k1 0.9 --b 0.4]
    python -m corpora.build --corpus enwiki-latest-pages-articles.xml.bz2 --out indexes/enwiki
    python -m corpora.build --format html --corpus 'saved/**/*.html' --out indexes/saved

``--format`` (default ``auto``, from the name): ``jsonl`` takes our JSONL
``{"id","title","text"}`` or Search-R1 JSONL ``{"id","contents"}``; ``tsv`` DPR TSV
``id<TAB>text<TAB>title`` (``.gz`` too for both); ``wikixml`` a MediaWiki XML dump (``.xml``,
``.xml.bz2`` incl. multistream, ``.xml.gz``; ``corpora/wikidump.py``); ``html`` a folder, a file
or a glob of HTML files (``corpora/htmlpages.py``). Dumps and HTML are cut into passages of
``--words`` words and their full page texts are stored for browsing. ``--corpus bundled``
indexes the packaged mini-corpus. ``--pages`` adds full page texts (JSONL ``{"title","text"}``)
for JSONL/TSV corpora.
"""
from __future__ import annotations

import argparse
import glob
import json
import resource
import sys
from pathlib import Path

from corpora.corpus import BUNDLED_PAGES, BUNDLED_PASSAGES, data_path
from corpora.index import BACKENDS, BM25Params, build_index
from corpora.streambuild import BLOCK_POSTINGS, CHUNK_TOKENS

FORMATS = ("auto", "jsonl", "tsv", "wikixml", "html")


def detect_format(corpus: str) -> str:
    """``auto`` -> a format from the path: folder or glob or .html -> html, .xml* -> wikixml, ..."""
    path = Path(corpus)
    name = path.name.lower()
    if path.is_dir() or glob.has_magic(corpus) or name.endswith((".html", ".htm", ".xhtml")):
        return "html"
    if ".xml" in name:
        return "wikixml"
    if name.endswith((".tsv", ".tsv.gz")):
        return "tsv"
    return "jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corpora.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="corpus file, dump, HTML folder/glob, or 'bundled'")
    ap.add_argument("--out", required=True, help="index folder to create (replaced if it exists)")
    ap.add_argument("--format", default="auto", choices=FORMATS)
    ap.add_argument("--backend", nargs="+", default=["bm25s"], choices=BACKENDS)
    ap.add_argument("--pages", default=None, help="optional full pages JSONL for browsing (jsonl/tsv corpora)")
    ap.add_argument("--words", type=int, default=100, help="words per passage (wikixml/html)")
    ap.add_argument("--parser", default="auto", choices=["auto", "mwparserfromhell", "regex"], help="wikitext parser (wikixml)")
    ap.add_argument("--workers", type=int, default=1, help="processes stripping wikitext (wikixml)")
    ap.add_argument("--passages-out", default=None, help="also keep the passages JSONL made from a dump/HTML here")
    ap.add_argument("--k1", type=float, default=BM25Params.k1)
    ap.add_argument("--b", type=float, default=BM25Params.b)
    ap.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS, help="words tokenised per spill chunk (memory)")
    ap.add_argument("--block-postings", type=int, default=BLOCK_POSTINGS, help="postings laid out per block (memory)")
    args = ap.parse_args(argv)
    corpus, pages = args.corpus, args.pages
    if corpus == "bundled":
        corpus, pages = str(data_path(BUNDLED_PASSAGES)), pages or data_path(BUNDLED_PAGES)
    fmt = detect_format(corpus) if args.format == "auto" else args.format
    params = BM25Params(args.k1, args.b)
    if fmt != "html" and not Path(corpus).exists():
        print(f"error: corpus file not found: {corpus}", file=sys.stderr)
        return 2
    if fmt in ("wikixml", "html") and pages:
        print(f"error: --pages applies to jsonl/tsv corpora; {fmt} input makes its own pages", file=sys.stderr)
        return 2
    if fmt == "tsv" and not Path(corpus).name.lower().endswith((".tsv", ".tsv.gz")):
        print("error: DPR TSV files are read by name: rename the file to .tsv or .tsv.gz", file=sys.stderr)
        return 2
    if fmt == "jsonl" and Path(corpus).name.lower().endswith((".tsv", ".tsv.gz")):
        print("error: this file is named .tsv: use --format tsv (or auto)", file=sys.stderr)
        return 2
    try:
        if fmt == "wikixml":
            from corpora.wikidump import build_wiki_index

            out, stats = build_wiki_index(corpus, args.out, args.backend, params, args.words, args.parser, args.workers,
                                          keep_passages=args.passages_out)
            print(f"{stats['pages']:,} pages kept of {stats['pages_seen']:,} ({stats['redirects']:,} redirects, "
                  f"{stats['other_namespaces']:,} other namespaces, {stats['empty']:,} empty), parser {stats['parser']}")
        elif fmt == "html":
            from corpora.htmlpages import build_html_index

            out, stats = build_html_index(corpus, args.out, args.backend, params, args.words, keep_passages=args.passages_out)
            print(f"{stats['pages']:,} pages kept of {stats['files']:,} files ({stats['empty']:,} empty)")
        else:
            out = build_index(corpus, args.out, backends=args.backend, params=params, pages=pages,
                              chunk_tokens=args.chunk_tokens, block_postings=args.block_postings)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = json.loads((Path(out) / "meta.json").read_text())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"built {out}: {meta['num_passages']:,} passages, {meta.get('num_full_pages', 0):,} full pages, "
          f"backends {meta['backends']}, {meta['build_seconds']} s, peak RSS {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
