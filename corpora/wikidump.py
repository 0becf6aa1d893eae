"""Wikipedia XML dumps -> plain-text pages -> ~100-word passages, streamed in bounded memory.

    python -m corpora.build --format wikixml --corpus enwiki-latest-pages-articles.xml.bz2 --out DIR
    python -m corpora.wikidump DUMP --passages psg.jsonl [--pages pages.jsonl] [--words 100]

The second form only converts (no index) and prints counts and the peak RSS.

## Input
A MediaWiki XML export: ``pages-articles*.xml.bz2`` (single- or multistream bz2; Python's
``bz2`` reads concatenated streams), ``.xml.gz`` or plain ``.xml``, any export schema version.
``xml.etree.ElementTree.iterparse`` streams it and every finished ``<page>`` is cleared from the
tree, so memory holds one page at a time (plus, with ``workers > 1``, a bounded window of
``2 * workers`` chunks of pages in flight), whatever the dump size.

## Pages kept
Main namespace only (``<ns>0</ns>``; without an ``<ns>`` element, titles with a known namespace
prefix such as ``Talk:`` are skipped), not redirects (``<redirect/>`` or text starting with
``#REDIRECT``), not empty after markup removal. The last ``<revision>`` of a page is used.

## Markup
What is dropped and what is kept of the wikitext: :mod:`corpora.wikitext` (its functions are
importable from here too).

## Output
``pages``: (title, plain text) with one paragraph or heading per line, for browsing.
``passages``: the page's words cut into consecutive blocks of ``words`` (default 100, as in
DPR/wiki18 ``100w``); a trailing block shorter than ``words // 4`` joins the one before. Each
passage is ``{"id": "<pageid>_<n>", "title", "text"}`` (``n`` from 0; the title with spaces as
``_`` when the page has no id), so ids are the same in every run on the same dump.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import io
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Sequence

from tqdm.auto import tqdm

from corpora.wikitext import (  # noqa: F401  (the markup names are re-exported: they lived here)
    DROP_LINK_NS,
    DROP_TAGS,
    HAVE_MWPARSER,
    strip_markup_mwparser,
    strip_markup_regex,
    tidy,
    wikitext_to_text,
)

WORDS_PER_PASSAGE = 100

# Page-title prefixes of non-article namespaces, for exports without <ns>.
NON_MAIN_PREFIXES = frozenset(
    {"talk", "user", "user talk", "wikipedia", "wikipedia talk", "file", "file talk", "image", "mediawiki",
     "template", "template talk", "help", "help talk", "category", "category talk", "portal", "draft",
     "module", "timedtext", "special", "media", "book", "education program", "gadget", "topic"}
)
_REDIRECT = re.compile(r"^\s*#\s*redirect\b", re.I)


# -- passages --------------------------------------------------------------------------------
def chunk_words(text: str, words: int = WORDS_PER_PASSAGE) -> list[str]:
    """Consecutive blocks of ``words`` words; a trailing block under ``words // 4`` joins the last."""
    if words < 1:
        raise ValueError("words per passage must be >= 1")
    toks = text.split()
    chunks = [toks[i : i + words] for i in range(0, len(toks), words)]
    if len(chunks) > 1 and len(chunks[-1]) < words // 4:
        chunks[-2].extend(chunks.pop())
    return [" ".join(c) for c in chunks]


def page_key(title: str, page_id: str | None) -> str:
    """The id stem of a page's passages: the page id, else the title with ``_`` for spaces."""
    return page_id.strip() if page_id and page_id.strip() else "_".join(title.split())


# -- reading the dump ------------------------------------------------------------------------
@dataclass(frozen=True)
class RawPage:
    title: str
    page_id: str
    ns: int
    redirect: bool
    wikitext: str


class _CountingReader(io.RawIOBase):
    """A read-only file wrapper that reports the bytes read (for a progress bar on the input)."""

    def __init__(self, fh: IO[bytes], on_read: Callable[[int], None] | None):
        self.fh, self.on_read = fh, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.fh.readinto(b)
        if n and self.on_read:
            self.on_read(n)
        return n or 0

    def close(self) -> None:
        self.fh.close()
        super().close()


def open_dump(path: str | Path, on_read: Callable[[int], None] | None = None) -> IO[bytes]:
    """A binary stream of the XML, decompressing ``.bz2`` (multistream too) and ``.gz``."""
    path = Path(path)
    raw = io.BufferedReader(_CountingReader(open(path, "rb"), on_read), buffer_size=1 << 20)
    name = path.name.lower()
    if name.endswith(".bz2"):
        return bz2.BZ2File(raw)
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    return raw


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _page_from_elem(page: ET.Element) -> RawPage:
    title, page_id, ns, redirect, text = "", "", None, False, ""
    for child in page:
        name = _local(child.tag)
        if name == "title":
            title = (child.text or "").strip()
        elif name == "ns":
            ns = int((child.text or "0").strip() or 0)
        elif name == "id" and not page_id:
            page_id = (child.text or "").strip()
        elif name == "redirect":
            redirect = True
        elif name == "revision":  # the last revision wins (full-history dumps list several)
            for sub in child:
                if _local(sub.tag) == "text":
                    text = sub.text or ""
    if ns is None:
        prefix, sep, _ = title.partition(":")
        ns = 1 if sep and prefix.strip().lower() in NON_MAIN_PREFIXES else 0
    return RawPage(title, page_id, ns, redirect or bool(_REDIRECT.match(text)), text)


def iter_dump_pages(path: str | Path, on_read: Callable[[int], None] | None = None) -> Iterator[RawPage]:
    """Every ``<page>`` of a dump, in order, one at a time (finished pages are cleared)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Wikipedia dump not found: {path}")
    with open_dump(path, on_read) as fh:
        context = ET.iterparse(fh, events=("start", "end"))
        root = None
        try:
            for event, elem in context:
                if root is None:
                    root = elem
                    if _local(root.tag) != "mediawiki":
                        raise ValueError(f"{path} is not a MediaWiki XML export (root <{_local(root.tag)}>)")
                    continue
                if event == "end" and _local(elem.tag) == "page":
                    yield _page_from_elem(elem)
                    root.clear()  # drop the finished page (and siteinfo) from the tree
        except ET.ParseError as exc:
            raise ValueError(f"{path}: malformed XML ({exc})") from None


def _convert_chunk(pages: Sequence[tuple[str, str, str]], parser: str) -> list[tuple[str, str, str]]:
    """Worker: [(title, page_id, wikitext)] -> [(title, page_id, plain text)]."""
    return [(t, pid, wikitext_to_text(w, parser)) for t, pid, w in pages]


def iter_plain_pages(
    path: str | Path,
    parser: str = "auto",
    workers: int = 1,
    stats: dict | None = None,
    on_read: Callable[[int], None] | None = None,
    chunk_pages: int = 32,
) -> Iterator[tuple[str, str, str]]:
    """(title, page_id, plain text) of the kept pages, in dump order (see "Pages kept")."""
    stats = stats if stats is not None else {}
    for key in ("pages_seen", "redirects", "other_namespaces", "empty", "pages"):
        stats.setdefault(key, 0)

    def raw_articles() -> Iterator[tuple[str, str, str]]:
        for p in iter_dump_pages(path, on_read):
            stats["pages_seen"] += 1
            if p.ns != 0:
                stats["other_namespaces"] += 1
            elif p.redirect:
                stats["redirects"] += 1
            else:
                yield p.title, p.page_id, p.wikitext

    def kept(converted: Iterable[tuple[str, str, str]]) -> Iterator[tuple[str, str, str]]:
        for title, pid, text in converted:
            if not text.strip():
                stats["empty"] += 1
                continue
            stats["pages"] += 1
            yield title, pid, text

    if workers <= 1:
        yield from kept((t, pid, wikitext_to_text(w, parser)) for t, pid, w in raw_articles())
        return
    # Bounded, ordered parallelism: at most 2 * workers chunks in flight, consumed in order.
    from concurrent.futures import ProcessPoolExecutor

    def converted() -> Iterator[tuple[str, str, str]]:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            window: deque = deque()
            chunk: list[tuple[str, str, str]] = []
            for item in raw_articles():
                chunk.append(item)
                if len(chunk) == chunk_pages:
                    window.append(pool.submit(_convert_chunk, chunk, parser))
                    chunk = []
                    if len(window) >= 2 * workers:
                        yield from window.popleft().result()
            if chunk:
                window.append(pool.submit(_convert_chunk, chunk, parser))
            while window:
                yield from window.popleft().result()

    yield from kept(converted())


# -- writing passages and pages ---------------------------------------------------------------
def _open_out(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "wb", compresslevel=1), encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def write_passages_and_pages(
    pages: Iterable[tuple[str, str, str]],
    passages_out: str | Path,
    pages_out: str | Path | None = None,
    words: int = WORDS_PER_PASSAGE,
    stats: dict | None = None,
) -> dict:
    """(id stem, title, text) records -> passages JSONL (+ pages JSONL); returns counts."""
    stats = stats if stats is not None else {}
    stats.setdefault("passages", 0)
    stats.setdefault("pages_written", 0)
    seen: set[str] = set()
    with _open_out(Path(passages_out)) as pfh, (_open_out(Path(pages_out)) if pages_out else open(os.devnull, "w")) as gfh:
        for key, title, text in pages:
            if key in seen:
                raise ValueError(f"two pages give the passage id stem {key!r} (title {title!r}); ids must be unique")
            seen.add(key)
            for n, chunk in enumerate(chunk_words(text, words)):
                pfh.write(json.dumps({"id": f"{key}_{n}", "title": title, "text": chunk}, ensure_ascii=False) + "\n")
                stats["passages"] += 1
            if pages_out:
                gfh.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
                stats["pages_written"] += 1
    return stats


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def convert_dump(
    dump: str | Path,
    passages_out: str | Path,
    pages_out: str | Path | None = None,
    words: int = WORDS_PER_PASSAGE,
    parser: str = "auto",
    workers: int = 1,
    show_progress: bool = True,
) -> dict:
    """One streaming pass: dump -> passages JSONL (+ pages JSONL). Returns counts and timings."""
    dump = Path(dump)
    t0 = time.perf_counter()
    stats: dict = {"source": str(dump), "parser": parser if parser != "auto" else ("mwparserfromhell" if HAVE_MWPARSER else "regex")}
    bar = tqdm(total=dump.stat().st_size, unit="B", unit_scale=True, desc=f"parse {dump.name}", disable=not show_progress)
    try:
        plain = iter_plain_pages(dump, parser, workers, stats, on_read=bar.update)
        records = ((page_key(t, pid), t, text) for t, pid, text in plain)
        write_passages_and_pages(_with_postfix(records, bar, stats), passages_out, pages_out, words, stats)
    finally:
        bar.close()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return stats


def _with_postfix(records: Iterable, bar, stats: dict, every: int = 200) -> Iterator:
    for i, rec in enumerate(records, 1):
        if i % every == 0:
            bar.set_postfix(pages=stats.get("pages", 0), passages=stats.get("passages", 0), refresh=False)
        yield rec


def build_from_converted(
    convert: Callable[[Path, Path], dict],
    out_dir: str | Path,
    source: str,
    backends: Sequence[str] = ("bm25",),
    params=None,
    show_progress: bool = True,
    keep_passages: str | Path | None = None,
) -> tuple[Path, dict]:
    """Run ``convert(passages_path, pages_path)`` into a temp folder, then index the result.

    Passages and pages come from one stream, so they are written to temp JSONL files first
    (next to ``out_dir``; removed afterwards) and ``build_index`` reads them back.
    """
    from corpora.index import build_index

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.convert-"))
    try:
        psg, pages = tmp / "passages.jsonl", tmp / "pages.jsonl"
        stats = convert(psg, pages)
        if not stats.get("passages"):
            raise ValueError(f"{source}: no passages (pages seen {stats.get('pages_seen', 0)}, kept {stats.get('pages', 0)})")
        build_index(psg, out_dir, backends=backends, params=params, show_progress=show_progress,
                    total=stats["passages"], source=source, pages=pages)
        if keep_passages:
            keep = Path(keep_passages)
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(psg), keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir, stats


def build_wiki_index(
    dump: str | Path,
    out_dir: str | Path,
    backends: Sequence[str] = ("bm25",),
    params=None,
    words: int = WORDS_PER_PASSAGE,
    parser: str = "auto",
    workers: int = 1,
    show_progress: bool = True,
    keep_passages: str | Path | None = None,
) -> tuple[Path, dict]:
    """Dump -> passages + pages -> BM25 index folder (``corpora.index.build_index``)."""
    return build_from_converted(
        lambda psg, pages: convert_dump(dump, psg, pages, words, parser, workers, show_progress),
        out_dir, str(dump), backends, params, show_progress, keep_passages,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corpora.wikidump", description="Convert a Wikipedia XML dump to passages (and pages) JSONL.")
    ap.add_argument("dump")
    ap.add_argument("--passages", required=True, help="passages JSONL to write (.gz to compress)")
    ap.add_argument("--pages", default=None, help="optional full pages JSONL to write, for browsing")
    ap.add_argument("--words", type=int, default=WORDS_PER_PASSAGE)
    ap.add_argument("--parser", choices=["auto", "mwparserfromhell", "regex"], default="auto")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        stats = convert_dump(args.dump, args.passages, args.pages, args.words, args.parser, args.workers, not args.quiet)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
