"""HTML files -> plain-text pages -> ~100-word passages (BeautifulSoup, one file at a time).

    python -m corpora.build --format html --corpus saved_pages/ --out DIR
    python -m corpora.build --format html --corpus 'crawl/**/*.html' --out DIR

## Input
A folder (every ``*.html`` / ``*.htm`` below it, recursively) or a glob pattern, read in sorted
path order so that ids are the same in every run. Files are decoded by BeautifulSoup
(``html.parser``, the standard-library parser, so results do not depend on lxml being there),
which honours a ``<meta charset>`` and otherwise guesses.

## Page text
Dropped with their content: ``<script>``, ``<style>``, ``<noscript>``, ``<template>``,
``<nav>``, ``<footer>``, ``<table>``, ``<svg>``, ``<iframe>``, ``<form>`` and ``<head>`` (after
the title is read). Block elements (paragraphs, headings, list items, ``<div>``, ``<br>``) end
a line; inline elements do not, so ``a <b>bold</b> word`` stays one sentence. Spaces are
collapsed, empty lines dropped. The title is the text of ``<title>`` (a trailing
`` - Wikipedia`` removed), else the first ``<h1>``, else the file name.

## Passages
As for Wikipedia dumps (``corpora.wikidump.chunk_words``): consecutive blocks of ``words``
words, ids ``<relative path without extension>_<n>`` (``/`` kept), since titles of saved pages
need not be unique.
"""
from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Iterator, Sequence

from bs4 import BeautifulSoup
from bs4.element import NavigableString, Tag
from tqdm.auto import tqdm

from corpora.wikidump import WORDS_PER_PASSAGE, build_from_converted, write_passages_and_pages

DROP_TAGS = ("script", "style", "noscript", "template", "nav", "footer", "table", "svg", "iframe", "form", "head")
BLOCK_TAGS = frozenset(
    {"p", "div", "section", "article", "main", "header", "aside", "blockquote", "pre", "ul", "ol", "li", "dl", "dt",
     "dd", "h1", "h2", "h3", "h4", "h5", "h6", "br", "hr", "figure", "figcaption", "address", "details", "summary",
     "body", "html"}
)
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
_TITLE_SUFFIX = re.compile(r"\s+[-–—|]\s+Wikipedia\s*$")
_SPACES = re.compile(r"\s+")


def _glob_base(pattern: Path) -> Path:
    """The folder part of a glob before its first wildcard: ``a/b/**/*.html`` -> ``a/b``."""
    parts = []
    for part in pattern.parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def list_html_files(source: str | Path) -> list[tuple[Path, str]]:
    """(file, id stem) for a folder or a glob, sorted; the stem is the path relative to the base."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in HTML_SUFFIXES]
        base = path
    elif path.is_file():
        files, base = [path], path.parent
    else:
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()]
        if not files:
            raise FileNotFoundError(f"no HTML files match {source!r} (give a folder, a file or a glob)")
        base = _glob_base(path)
    files.sort()
    out = []
    for f in files:
        try:
            rel = f.resolve().relative_to(base.resolve())
        except ValueError:
            rel = Path(f.name)
        out.append((f, rel.with_suffix("").as_posix()))
    if not out:
        raise FileNotFoundError(f"no .html/.htm files under {source!r}")
    return out


def _text_lines(node, lines: list[str], current: list[str]) -> None:
    for child in node.children:
        if isinstance(child, NavigableString):
            if type(child) is NavigableString:  # not Comment, CData, Doctype, ...
                current.append(str(child))
        elif isinstance(child, Tag):
            block = child.name in BLOCK_TAGS
            if block:
                _flush(lines, current)
            _text_lines(child, lines, current)
            if block:
                _flush(lines, current)


def _flush(lines: list[str], current: list[str]) -> None:
    line = _SPACES.sub(" ", "".join(current)).strip()
    if line:
        lines.append(line)
    current.clear()


def html_to_page(markup: str | bytes, fallback_title: str = "", drop_tags: Sequence[str] = DROP_TAGS) -> tuple[str, str]:
    """HTML -> (title, plain text); see the module docstring for what is dropped (``drop_tags``:
    ``corpora.web`` drops page chrome such as ``<header>`` and ``<aside>`` too, and keeps tables)."""
    soup = BeautifulSoup(markup, "html.parser")
    title = ""
    if soup.title and soup.title.get_text(strip=True):
        title = _TITLE_SUFFIX.sub("", _SPACES.sub(" ", soup.title.get_text()).strip())
    if not title:
        h1 = soup.find("h1")
        title = _SPACES.sub(" ", h1.get_text()).strip() if h1 else ""
    for tag in soup.find_all(list(drop_tags)):
        tag.decompose()
    lines: list[str] = []
    current: list[str] = []
    _text_lines(soup, lines, current)
    _flush(lines, current)
    if lines and lines[0] == title:  # the <h1> repeats the title
        lines = lines[1:]
    return title or fallback_title, "\n".join(lines)


def iter_html_pages(source: str | Path, show_progress: bool = True, stats: dict | None = None) -> Iterator[tuple[str, str, str]]:
    """(id stem, title, text) for every non-empty HTML file of ``source``."""
    stats = stats if stats is not None else {}
    stats.setdefault("files", 0)
    stats.setdefault("empty", 0)
    stats.setdefault("pages", 0)
    files = list_html_files(source)
    for path, key in tqdm(files, desc="html", unit="file", disable=not show_progress):
        stats["files"] += 1
        title, text = html_to_page(path.read_bytes(), fallback_title=path.stem.replace("_", " "))
        if not text.strip():
            stats["empty"] += 1
            continue
        stats["pages"] += 1
        yield key, title, text


def convert_html(source: str | Path, passages_out: str | Path, pages_out: str | Path | None = None,
                 words: int = WORDS_PER_PASSAGE, show_progress: bool = True) -> dict:
    stats: dict = {"source": str(source)}
    write_passages_and_pages(iter_html_pages(source, show_progress, stats), passages_out, pages_out, words, stats)
    return stats


def build_html_index(source: str | Path, out_dir: str | Path, backends: Sequence[str] = ("bm25",), params=None,
                     words: int = WORDS_PER_PASSAGE, show_progress: bool = True,
                     keep_passages: str | Path | None = None) -> tuple[Path, dict]:
    """HTML files -> passages + pages -> BM25 index folder."""
    return build_from_converted(
        lambda psg, pages: convert_html(source, psg, pages, words, show_progress),
        out_dir, str(source), backends, params, show_progress, keep_passages,
    )
