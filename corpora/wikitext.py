"""MediaWiki markup -> plain text: what :mod:`corpora.wikidump` keeps of each page's wikitext.

With ``mwparserfromhell`` installed (optional: ``pip install mwparserfromhell``) the wikitext is
parsed and walked node by node; without it a documented regex stripper (``strip_markup_regex``)
does the same job less exactly (it does not understand unbalanced markup). Both:

* drop templates and parser functions (``{{...}}``, ``{{{...}}}``: infoboxes, citations,
  navboxes, and inline ones such as ``{{convert}}`` or ``{{lang}}``, whose text is lost too);
* drop tables (``{| ... |}`` and ``<table>``), references (``<ref>...</ref>``, ``<ref/>``,
  ``<references/>``), galleries, ``<math>``/``<chem>``, ``<pre>``/``<syntaxhighlight>`` code,
  ``<timeline>``, ``<imagemap>``, ``<score>``, HTML comments, magic words (``__NOTOC__``);
* drop file and image links (``[[File:..]]``, ``[[Image:..]]``, ``[[Media:..]]``) with their
  captions, category links (``[[Category:..]]``) and interlanguage links (``[[de:..]]``);
* drop bare external URLs; keep the label of ``[http://... label]``;
* keep the visible text of wiki links (``[[target|text]]`` -> ``text``, ``[[target]]`` ->
  ``target``), of bold/italic (``'''x'''`` -> ``x``), of other HTML tags, and of headings
  (``== History ==`` -> a line ``History``); list markers (``*``, ``#``, ``:``, ``;``) go;
* decode HTML entities (``&amp;`` -> ``&``, ``&nbsp;`` -> space);
* tidy: collapse runs of spaces, drop empty lines, drop empty parentheses left by removed
  templates (``Albedo ( ) is`` -> ``Albedo is``) and a space before ``,`` or ``.``.
"""
from __future__ import annotations

import html
import re

try:  # optional, better markup handling
    import mwparserfromhell
    from mwparserfromhell import nodes as mwnodes

    HAVE_MWPARSER = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_MWPARSER = False

# Link namespaces whose links (with captions) are dropped.
DROP_LINK_NS = frozenset({"file", "image", "media", "category"})
# Tags whose whole content is dropped ("table" is also what {| ... |} parses to).
DROP_TAGS = frozenset(
    {"ref", "references", "table", "gallery", "math", "chem", "ce", "pre", "syntaxhighlight", "source",
     "timeline", "imagemap", "score", "graph", "mapframe", "maplink", "templatedata", "templatestyles",
     "inputbox", "categorytree", "noinclude", "includeonly", "onlyinclude", "hiero", "section"}
)
_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(?:-[a-z]{2,8})*$")
_MAGIC = re.compile(r"__[A-Z]+__")


def _dropped_link(target: str) -> bool:
    """A link to drop entirely: File/Image/Media/Category, or an interlanguage link."""
    t = target.strip()
    if t.startswith(":"):  # [[:Category:X]] is a visible link to the page
        return False
    prefix, sep, _ = t.partition(":")
    if not sep:
        return False
    p = prefix.strip().lower()
    return p in DROP_LINK_NS or bool(_LANG_PREFIX.match(p))


def _link_label(target: str) -> str:
    return target.strip().lstrip(":").strip()


def _render_mw(code, out: list[str]) -> None:
    for node in code.nodes:
        if isinstance(node, mwnodes.Text):
            out.append(str(node.value))
        elif isinstance(node, mwnodes.Wikilink):
            target = str(node.title)
            if _dropped_link(target):
                continue
            if node.text is None:
                out.append(_link_label(target))
            elif not str(node.text).strip():  # the "pipe trick": [[Foo (bar)|]] -> Foo
                out.append(re.sub(r"\s*\(.*?\)\s*$", "", _link_label(target).split(",")[0]))
            else:
                _render_mw(node.text, out)
        elif isinstance(node, mwnodes.ExternalLink):
            if node.title is not None:
                _render_mw(node.title, out)
        elif isinstance(node, mwnodes.Tag):
            tag = str(node.tag).strip().lower()
            if tag in DROP_TAGS:
                continue
            if tag in ("br", "hr"):
                out.append("\n")
            elif node.contents is not None and not node.self_closing:
                _render_mw(node.contents, out)
        elif isinstance(node, mwnodes.Heading):
            out.append("\n")
            _render_mw(node.title, out)
            out.append("\n")
        elif isinstance(node, mwnodes.HTMLEntity):
            out.append(node.normalize())
        # Template, Argument, Comment: dropped


def strip_markup_mwparser(wikitext: str) -> str:
    """Wikitext -> plain text with mwparserfromhell (see the module docstring)."""
    out: list[str] = []
    # MediaWiki removes comments before it sees headings or links; so do we.
    _render_mw(mwparserfromhell.parse(_COMMENT.sub("", wikitext)), out)
    return tidy("".join(out))


_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_SELF_CLOSING_DROP = re.compile(r"<(?:%s)\b[^>]*/\s*>" % "|".join(sorted(DROP_TAGS)), re.I)
_PAIRED_DROP = re.compile(r"<(%s)\b[^>]*>.*?</\1\s*>" % "|".join(sorted(DROP_TAGS)), re.I | re.S)
_INNER_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_PIPED_LINK = re.compile(r"\[\[([^\[\]|]*)\|([^\[\]]*)\]\]")
_PLAIN_LINK = re.compile(r"\[\[([^\[\]|]*)\]\]")
_EXT_LINK_LABEL = re.compile(r"\[(?:[a-z][a-z0-9+.-]*:)?//[^\s\]]+\s+([^\]]*)\]", re.I)
_EXT_LINK_BARE = re.compile(r"\[(?:[a-z][a-z0-9+.-]*:)?//[^\s\]]*\]", re.I)
_BOLD_ITALIC = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_BR = re.compile(r"<br\s*/?>", re.I)
_HTML_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.M)


def _drop_links_with_nesting(s: str) -> str:
    """Remove [[File:..]], [[Category:..]] and interlanguage links, nested [[..]] included."""
    out, i, n = [], 0, len(s)
    while i < n:
        j = s.find("[[", i)
        if j < 0:
            out.append(s[i:])
            break
        end = j + 2
        target_end = min(x for x in (s.find("|", end), s.find("]]", end), n) if x >= 0)
        if not _dropped_link(s[end:target_end]):
            out.append(s[i:end])
            i = end
            continue
        out.append(s[i:j])
        depth, k = 0, j
        while k < n:
            if s.startswith("[[", k):
                depth, k = depth + 1, k + 2
            elif s.startswith("]]", k):
                depth, k = depth - 1, k + 2
                if depth == 0:
                    break
            else:
                k += 1
        i = k
    return "".join(out)


def _sub_until_stable(pattern: re.Pattern, s: str) -> str:
    while True:
        s, n = pattern.subn("", s)
        if not n:
            return s


def strip_markup_regex(wikitext: str) -> str:
    """Wikitext -> plain text with regular expressions only (the fallback; see the docstring).

    Order matters: comments, dropped tags, templates (innermost first, repeated), tables
    (innermost first), dropped links (bracket-counting), links, external links, quotes,
    headings, remaining HTML tags, entities, list markers, tidy.
    """
    s = _COMMENT.sub("", wikitext)
    s = _SELF_CLOSING_DROP.sub("", s)
    s = _PAIRED_DROP.sub("", s)
    s = _sub_until_stable(_INNER_TEMPLATE, s)
    s = _sub_until_stable(_INNER_TABLE, s)
    s = _drop_links_with_nesting(s)
    s = _PIPED_LINK.sub(lambda m: m.group(2) if m.group(2).strip() else _link_label(m.group(1)), s)
    s = _PLAIN_LINK.sub(lambda m: _link_label(m.group(1)), s)
    s = _EXT_LINK_LABEL.sub(r"\1", s)
    s = _EXT_LINK_BARE.sub("", s)
    s = _BOLD_ITALIC.sub("", s)
    s = _HEADING.sub(r"\n\2\n", s)
    s = _BR.sub("\n", s)
    s = _HTML_TAG.sub("", s)
    s = html.unescape(s)
    s = _LIST_MARKER.sub("", s)
    return tidy(s)


_SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
_EMPTY_PARENS = re.compile(r"\(\s*(?:[,;:]\s*)*\)")
_PAREN_LEADING_PUNCT = re.compile(r"\(\s*[,;:]\s*")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.])")


def tidy(text: str) -> str:
    """Collapse spaces, drop empty lines and parentheses emptied by template removal."""
    text = _MAGIC.sub("", text)
    lines = []
    for line in text.split("\n"):
        line = _SPACES.sub(" ", line)
        line = _EMPTY_PARENS.sub("", line)
        line = _PAREN_LEADING_PUNCT.sub("(", line)
        line = _SPACES.sub(" ", line)
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line).strip()
        if line:
            lines.append(line)
    return "\n".join(lines)


def wikitext_to_text(wikitext: str, parser: str = "auto") -> str:
    """Plain text of a page: ``parser`` is ``"mwparserfromhell"``, ``"regex"`` or ``"auto"``."""
    if parser == "auto":
        parser = "mwparserfromhell" if HAVE_MWPARSER else "regex"
    if parser == "regex":
        return strip_markup_regex(wikitext)
    if parser != "mwparserfromhell":
        raise ValueError(f"parser must be 'auto', 'mwparserfromhell' or 'regex', got {parser!r}")
    if not HAVE_MWPARSER:
        raise ImportError("parser='mwparserfromhell' needs `pip install mwparserfromhell`")
    try:
        return strip_markup_mwparser(wikitext)
    except (RecursionError, ValueError, TypeError):  # pathological markup: the regex path copes
        return strip_markup_regex(wikitext)
