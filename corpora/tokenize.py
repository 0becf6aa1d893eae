"""The one BM25 tokeniser, shared by every backend, the index builder and the queries.

Documented choice (stored in each index's ``meta.json`` and checked at load):

1. lower-case the text;
2. split into Unicode word tokens with ``\\w+`` (letters, digits, underscore, any script);
3. drop English stop words (the list below: the usual Lucene/NLTK-sized list of 120 words);
4. stem with the Snowball English stemmer (PyStemmer), memoised per distinct word.

Both ``bm25`` and ``rank_bm25`` receive these same token lists, so any difference between
them comes from the scoring code only.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable

import Stemmer

TOKENIZER_VERSION = "w+-lower-stop120-snowball-en-v1"

_WORD = re.compile(r"\w+", re.UNICODE)

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself
    yourselves""".split()
)

_stemmer = Stemmer.Stemmer("english")


@lru_cache(maxsize=1 << 20)
def _stem(word: str) -> str:
    return _stemmer.stemWord(word)


def tokenize(text: str) -> list[str]:
    """Text -> BM25 tokens (lower-cased, stop words removed, Snowball-stemmed)."""
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


def tokenize_many(texts: Iterable[str]) -> list[list[str]]:
    return [tokenize(t) for t in texts]
