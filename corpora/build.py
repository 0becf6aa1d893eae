"""Build a BM25, dense or hybrid index folder from a corpus file, a Wikipedia dump or HTML pages.

    python -m corpora.build --corpus wiki.jsonl --out indexes/wiki [--backend bm25 rank_bm25]
                            [--pages pages.jsonl] [--k1 0.9 --b 0.4]
    python -m corpora.build --corpus enwiki-latest-pages-articles.xml.bz2 --out indexes/enwiki
    python -m corpora.build --format html --corpus 'saved/**/*.html' --out indexes/saved
    python -m corpora.build --corpus wiki.jsonl --out indexes/wiki-dense --backend dense
                            [--model all-MiniLM-L6-v2] [--faiss flat|hnsw] [--query-prefix 'query: ']
    python -m corpora.build --corpus indexes/wiki --out indexes/wiki-hybrid --backend hybrid [--rrf-k 60]

``--format`` (default ``auto``, from the name): ``jsonl`` takes our JSONL
``{"id","title","text"}`` or Search-R1 JSONL ``{"id","contents"}``; ``tsv`` DPR TSV
``id<TAB>text<TAB>title`` (``.gz`` too for both); ``wikixml`` a MediaWiki XML dump (``.xml``,
``.xml.bz2`` incl. multistream, ``.xml.gz``; ``corpora/wikidump.py``); ``html`` a folder, a file
or a glob of HTML files (``corpora/htmlpages.py``). Dumps and HTML are cut into passages of
``--words`` words and their full page texts are stored for browsing. ``--corpus bundled``
indexes the packaged mini-corpus. ``--pages`` adds full page texts (JSONL ``{"title","text"}``)
for JSONL/TSV corpora.

``--backend bm25`` (the default; ``bm25s``, its old name, is accepted too) is our BM25 index,
``rank_bm25`` the exact reference. ``--backend dense`` or ``hybrid`` (on its own) builds the BM25
folder as above and embeds every passage with ``--model`` (default the embedded
all-MiniLM-L6-v2; an E5/BGE path or hub name works too; ``corpora/encoder.py``) into a faiss
index, ``--faiss flat`` (exact) or ``hnsw`` (``corpora/dense.py``). ``--corpus`` may then be an existing index folder: its files are
hard-linked and its embeddings reused when they match, so ``--backend hybrid`` on a dense folder
encodes nothing. Hybrid search fuses BM25 and dense by reciprocal rank fusion (``--rrf-k``,
``--rrf-depth``; ``corpora/hybrid.py``). The folder's ``meta.json`` ``kind`` tells
``get_retriever``, the envs and ``corpora.serve`` what to load.
"""
from __future__ import annotations

import argparse
import glob
import json
import resource
import shutil
import sys
import tempfile
from pathlib import Path

from corpora.corpus import BUNDLED_PAGES, BUNDLED_PASSAGES, data_path
from corpora.dense import DENSE_KINDS, FAISS_TYPES, FaissParams, FusionParams
from corpora.encoder import DEFAULT_ENCODER
from corpora.index import BACKEND_ALIASES, BACKENDS, BM25Params, build_index, canonical_backend
from corpora.streambuild import BLOCK_POSTINGS, CHUNK_TOKENS

FORMATS = ("auto", "jsonl", "tsv", "wikixml", "html", "index")


def detect_format(corpus: str) -> str:
    """``auto`` -> a format from the path: index folder -> index, other folder or glob or .html
    -> html, .xml* -> wikixml, ..."""
    path = Path(corpus)
    name = path.name.lower()
    if path.is_dir() and (path / "meta.json").exists():
        return "index"
    if path.is_dir() or glob.has_magic(corpus) or name.endswith((".html", ".htm", ".xhtml")):
        return "html"
    if ".xml" in name:
        return "wikixml"
    if name.endswith((".tsv", ".tsv.gz")):
        return "tsv"
    return "jsonl"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m corpora.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="corpus file, dump, HTML folder/glob, or 'bundled'")
    ap.add_argument("--out", required=True, help="index folder to create (replaced if it exists)")
    ap.add_argument("--format", default="auto", choices=FORMATS)
    ap.add_argument("--backend", nargs="+", default=["bm25"], choices=[*BACKENDS, *DENSE_KINDS, *BACKEND_ALIASES],
                    help="BM25 backends, or dense / hybrid alone (bm25s: the old name of bm25)")
    ap.add_argument("--pages", default=None, help="optional full pages JSONL for browsing (jsonl/tsv corpora)")
    ap.add_argument("--words", type=int, default=100, help="words per passage (wikixml/html)")
    ap.add_argument("--parser", default="auto", choices=["auto", "mwparserfromhell", "regex"], help="wikitext parser (wikixml)")
    ap.add_argument("--workers", type=int, default=1, help="processes stripping wikitext (wikixml)")
    ap.add_argument("--passages-out", default=None, help="also keep the passages JSONL made from a dump/HTML here")
    ap.add_argument("--k1", type=float, default=BM25Params.k1)
    ap.add_argument("--b", type=float, default=BM25Params.b)
    ap.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS, help="words tokenised per spill chunk (memory)")
    ap.add_argument("--block-postings", type=int, default=BLOCK_POSTINGS, help="postings laid out per block (memory)")
    dense = ap.add_argument_group("dense and hybrid (--backend dense|hybrid)")
    dense.add_argument("--model", default=DEFAULT_ENCODER, help="encoder: the embedded all-MiniLM-L6-v2 (default), a folder or a hub name")
    dense.add_argument("--query-prefix", default=None, help="text before each query (default: 'query: ' for E5 models, else none)")
    dense.add_argument("--passage-prefix", default=None, help="text before each passage (default: 'passage: ' for E5 models, else none)")
    dense.add_argument("--max-seq-length", type=int, default=None, help="encoder token limit (default: the model's)")
    dense.add_argument("--encode-batch", type=int, default=64, help="passages per encoder batch")
    dense.add_argument("--device", default=None, help="encoder device, e.g. cpu or cuda (default: sentence-transformers' choice)")
    dense.add_argument("--faiss", default=FaissParams.index, choices=FAISS_TYPES, help="flat: exact inner product; hnsw: approximate")
    dense.add_argument("--hnsw-m", type=int, default=FaissParams.hnsw_m)
    dense.add_argument("--ef-construction", type=int, default=FaissParams.ef_construction)
    dense.add_argument("--ef-search", type=int, default=FaissParams.ef_search)
    dense.add_argument("--rrf-k", type=float, default=FusionParams.k, help="reciprocal rank fusion constant (hybrid)")
    dense.add_argument("--rrf-depth", type=int, default=FusionParams.depth, help="candidates fused from each retriever (hybrid)")
    return ap


def input_problem(fmt: str, kind: str | None, corpus: str, pages) -> str | None:
    """Why this corpus, format and backend do not go together, or None."""
    if fmt == "index" and not kind:
        return "an index folder is a --corpus only for --backend dense or hybrid"
    if fmt not in ("html", "index") and not Path(corpus).exists():
        return f"corpus file not found: {corpus}"
    if fmt in ("wikixml", "html") and pages:
        return f"--pages applies to jsonl/tsv corpora; {fmt} input makes its own pages"
    if fmt == "tsv" and not Path(corpus).name.lower().endswith((".tsv", ".tsv.gz")):
        return "DPR TSV files are read by name: rename the file to .tsv or .tsv.gz"
    if fmt == "jsonl" and Path(corpus).name.lower().endswith((".tsv", ".tsv.gz")):
        return "this file is named .tsv: use --format tsv (or auto)"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.backend = list(dict.fromkeys(canonical_backend(b) for b in args.backend))
    kinds = [b for b in args.backend if b in DENSE_KINDS]
    if kinds and len(args.backend) != 1:
        return _error("--backend dense or hybrid stands alone (its folder holds a bm25 index too)")
    kind = kinds[0] if kinds else None
    corpus, pages = args.corpus, args.pages
    if corpus == "bundled":
        corpus, pages = str(data_path(BUNDLED_PASSAGES)), pages or data_path(BUNDLED_PAGES)
    fmt = detect_format(corpus) if args.format == "auto" else args.format
    params = BM25Params(args.k1, args.b)
    problem = input_problem(fmt, kind, corpus, pages)
    if problem:
        return _error(problem)
    try:
        if kind:
            out = _build_dense(args, kind, fmt, corpus, pages, params)
        else:
            out = _build_bm25(args, fmt, corpus, pages, params, args.out, args.backend)
    except (OSError, ValueError, ImportError) as exc:  # OSError: also a model that cannot be found or fetched
        return _error(str(exc))
    _print_built(out, kind)
    return 0


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _print_built(out: str | Path, kind: str | None) -> None:
    meta = json.loads((Path(out) / "meta.json").read_text())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"built {out}: {meta['num_passages']:,} passages, {meta.get('num_full_pages', 0):,} full pages, "
          f"backends {meta['backends']}, {meta['build_seconds']} s, peak RSS {rss:.0f} MiB")
    if kind:
        d = meta["dense"]
        print(f"kind {kind}: encoder {d['model']} ({d['dim']} dims, prefixes {d['query_prefix']!r}/{d['passage_prefix']!r}), "
              f"faiss {d['index']}, " + (f"embeddings reused from {d['reused_from']}" if "reused_from" in d else
                                         f"vectors re-indexed from {d['vectors_from']}" if "vectors_from" in d else
                                         f"encoded at {d['passages_per_second']} passages/s"))


def _build_bm25(args: argparse.Namespace, fmt: str, corpus: str, pages, params: BM25Params, out_dir: str | Path,
                backends: list[str]) -> Path:
    if fmt == "wikixml":
        from corpora.wikidump import build_wiki_index

        out, stats = build_wiki_index(corpus, out_dir, backends, params, args.words, args.parser, args.workers,
                                      keep_passages=args.passages_out)
        print(f"{stats['pages']:,} pages kept of {stats['pages_seen']:,} ({stats['redirects']:,} redirects, "
              f"{stats['other_namespaces']:,} other namespaces, {stats['empty']:,} empty), parser {stats['parser']}")
        return Path(out)
    if fmt == "html":
        from corpora.htmlpages import build_html_index

        out, stats = build_html_index(corpus, out_dir, backends, params, args.words, keep_passages=args.passages_out)
        print(f"{stats['pages']:,} pages kept of {stats['files']:,} files ({stats['empty']:,} empty)")
        return Path(out)
    return build_index(corpus, out_dir, backends=backends, params=params, pages=pages,
                       chunk_tokens=args.chunk_tokens, block_postings=args.block_postings)


def _build_dense(args: argparse.Namespace, kind: str, fmt: str, corpus: str, pages, params: BM25Params) -> Path:
    """The BM25 folder (built in a scratch folder unless ``corpus`` is one), then the embeddings."""
    from corpora.dense import build_dense_index
    from corpora.encoder import Encoder

    encoder = Encoder(args.model, args.query_prefix, args.passage_prefix, device=args.device, batch_size=args.encode_batch,
                      max_seq_length=args.max_seq_length)
    kw = dict(kind=kind, encoder=encoder, faiss_params=FaissParams(args.faiss, args.hnsw_m, args.ef_construction, args.ef_search),
              fusion=FusionParams(k=args.rrf_k, depth=args.rrf_depth))
    if fmt == "index":
        return build_dense_index(corpus, args.out, **kw)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.bm25-"))
    try:
        base = _build_bm25(args, fmt, corpus, pages, params, scratch / "bm25", ["bm25"])
        return build_dense_index(base, out, **kw)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
