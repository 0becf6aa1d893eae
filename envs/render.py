"""The text ``WebQA-v0`` (``envs/webqa.py``) shows an agent: the instruction prompts, the wrapper of
each protocol, search results (default and Search-R1's exact format), a window of a page with how
to read on, the lookup of a stored page, and the per-episode cache of live pages fetched through
the guard of ``corpora/web.py``. Functions only; the env keeps its own counters and history."""
from __future__ import annotations

from typing import Any, Sequence

from corpora.index import Hit
from corpora.pages import PageStore, window
from corpora.web import WebFetcher

WEB_CACHE_PAGES = 16  # live pages kept per episode, so reading on does not fetch again

TAGS_PROMPT = (
    "Answer the question below. Think step by step inside <think> and </think> whenever you "
    "get new information. If you need knowledge you lack, search Wikipedia by writing "
    "<search> your query </search>; the top results come back between <information> and "
    "</information>. To read a whole page, write <browse> Page title </browse>. You can search "
    "and browse several times, but you have at most {max_turns} actions. When you know the "
    "answer, give it inside <answer> and </answer> as a short span (a name, date, number, or "
    "yes/no) with no explanation, for example <answer> Beijing </answer>.\n"
    "Question: {question}\n"
)

TOOL_PROMPT = (
    "Answer the question below using the tools search (Wikipedia BM25 search), browse (read a "
    "page by title) and answer (give the final short answer: a name, date, number, or yes/no). "
    "You have at most {max_turns} tool calls; call exactly one tool per turn.\n"
    "Question: {question}\n"
)


def wrap(body: str, protocol: str) -> str:
    """``body`` inside ``<tool_response>`` (``protocol="tool_call"``) or ``<information>``."""
    if protocol == "tool_call":
        return f"\n<tool_response>\n{body}\n</tool_response>\n"
    return f"\n\n<information>{body}</information>\n\n"


def search_r1_observation(hits: Sequence[Hit]) -> str:
    """Search-R1's observation of a search, character for character: each hit as
    ``Doc i(Title: <the first line of its contents>) <the rest of its contents>`` and a newline
    (the contents of wiki-18 being ``"Title"\ntext``, the title keeps its quotes), the lines
    stripped as a whole and wrapped in ``\n\n<information>...</information>\n\n``
    (``search_r1/llm_agent/generation.py``: ``_passages2string`` and ``execute_predictions``).
    Passages are not cut; an empty result is an empty ``<information>`` block."""
    lines = []
    for i, h in enumerate(hits, 1):
        first, _, rest = f'"{h.title}"\n{h.text}'.partition("\n")
        lines.append(f"Doc {i}(Title: {first}) {rest}\n")
    return "\n\n<information>" + "".join(lines).strip() + "</information>\n\n"


def search_results(hits: Sequence[Hit], passage_chars: int) -> str:
    """The default body of a search: ``Doc i (Title: T) text`` per hit, each text cut to
    ``passage_chars`` characters (then ending in `` ...``)."""
    lines = []
    for i, h in enumerate(hits, 1):
        text = h.text if len(h.text) <= passage_chars else h.text[:passage_chars] + " ..."
        lines.append(f"Doc {i} (Title: {h.title}) {text}")
    return "\n".join(lines)


def page_window(title: str, page_text: str, part: int, browse_words: int, protocol: str, ref: str) -> str:
    """The body of a browse: part ``part`` (clamped to the last) of ``browse_words`` words of a
    page, with how to read on (``ref``, the title or URL, names the page in the hint)."""
    text, n_parts = window(page_text, part, browse_words)
    part = min(part, n_parts)
    nxt = ""
    if part < n_parts:
        how = f"<browse>{ref}#{part + 1}</browse>" if protocol == "tags" else f'browse with "part": {part + 1}'
        nxt = f"\n[To read on: {how}]"
    return f"Page: {title} (part {part} of {n_parts})\n{text}{nxt}"


def find_page(store: PageStore | None, retriever: Any, ref: str) -> tuple[str, str] | list[str] | None:
    """``(title, text)`` of the stored page ``ref`` names, else a list of suggested titles; None
    when the retriever offers no pages. Without a local store, a retrieval server's
    ``POST /page`` (or a recording of it) answers; a replay miss raises ``ReplayMiss``."""
    if store is not None:
        title = store.resolve(ref)
        return (title, store.text(title)) if title is not None else store.suggest(ref)
    if hasattr(retriever, "page_or_suggestions"):
        return retriever.page_or_suggestions(ref)
    return None


def fetch_cached(fetcher: WebFetcher, cache: dict[str, Any], url: str):
    """The live page at ``url``, from ``cache`` (keyed by asked and final URL, at most
    ``WEB_CACHE_PAGES`` pages, oldest out first) or fetched through the guard, which raises
    ``WebFetchError`` (``WebRefused`` for a refused address)."""
    page = cache.get(url)
    if page is None:
        page = fetcher.fetch(url)
        while len(cache) >= WEB_CACHE_PAGES:
            cache.pop(next(iter(cache)))
        cache[url] = cache[page.final_url] = page
    return page
