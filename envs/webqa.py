"""WebQA-v0: answer a question by searching and browsing a Wikipedia BM25 index.

## Description
A multi-turn question-answering episode in the style of Search-R1. ``reset`` draws a question
(with ``self.np_random``) and returns the instruction prompt. Each ``step`` takes one turn of
agent text, carries out the one action in it, and returns only the new text the env appends:
retrieved passages, a window of a page, or an error message. The agent keeps its own history.

## Action format (``protocol="tags"``, default; Search-R1 compatible)
``<search>query</search>``, ``<browse>Page title</browse>`` (``<browse>Page title#2</browse>``
reads on), ``<answer>short answer</answer>``; ``<think>...</think>`` is allowed and ignored.
``protocol="tool_call"``: ``<tool_call>{"name": "search", "arguments": {"query": ...}}</tool_call>``
with the tools ``search``, ``browse``, ``answer`` whose OpenAI-style schemas are
``env.unwrapped.tool_schemas()``. Exactly one action per turn.

## Observation
A ``str``. Search: ``<information>Doc 1 (Title: T) text\\nDoc 2 ...</information>`` with the
top ``top_k`` passages. Browse: ``<information>Page: T (part i of n)\\n...</information>`` plus
how to read the next part. With ``protocol="tool_call"`` the same text comes inside
``<tool_response>...</tool_response>``. Invalid actions (malformed, empty, unclosed or nested
tags, several actions, unknown tools, oversized input) get ``Error: <reason>`` with a hint;
they never raise and are counted in ``info["invalid_actions"]``. Gold answers and supporting
titles never appear in an observation; ``env.unwrapped.privileged()`` returns them.

## Rewards
Only the answer action is rewarded: ``reward="em"`` (default), ``"f1"`` or ``"cover_em"``
(see ``envs/grading.py``). ``format_penalty`` (default 0) is subtracted from the final reward
if the episode had any invalid action or ended without an answer.

## Episode end
Terminated on an answer. Truncated when ``max_turns`` turns (valid or not) pass without one
(``reset``'s info carries ``max_turns``, so an agent can plan for it):
the observation before the last turn warns that the next turn must answer, and the final
observation says the turn limit was reached. ``info`` at the end carries ``answer``, ``em``,
``f1``, ``cover_em``, ``gold_answers``, ``searches``, ``supporting_title_recall`` and more.

## Arguments
``dataset`` (QA name or JSONL path, ``corpora.qa``), ``retriever`` (``"bundled"``, an index
folder, a corpus file, ``http://`` URLs of retrieval servers or ``searxng+http://...`` for web
search, ``corpora.retrievers``), ``backend`` (``bm25`` or
``rank_bm25``; ``bm25s``, the old name of ``bm25``, is accepted), ``top_k=3``, ``max_turns=4``,
``reward="em"``, ``format_penalty=0.0``, ``protocol="tags"``, ``browse_words=300``,
``passage_chars=1500`` (per passage in an observation), ``limit`` (first N questions only),
``prompt_template`` (with ``{question}``),
``record`` / ``replay`` (a JSONL path: record every retrieval, browse and gold-passage lookup
with its result, or serve them from such a recording with no index or network;
``corpora/recording.py``; a replay miss is an ``Error: replay miss ...`` observation, counted in
``info["replay_misses"]``),
``obs_format`` (``"default"``, or ``"search-r1"``: search results rendered exactly as
Search-R1's client renders them, ``Doc 1(Title: "T") text``, uncut; for evaluating Search-R1
checkpoints on the observations they were trained on).

``pages`` (``"local"``, default: browse the index's page store; ``"web"``: a URL inside
``<browse>`` is fetched live through the SSRF guard of ``corpora/web.py`` and windowed like a
stored page, while titles and search stay local), with the guard's ``web_allow_hosts`` (host
allowlist, None = any public host), ``web_max_bytes=2_000_000``, ``web_timeout=10.0`` (seconds,
whole fetch), ``web_max_redirects=5`` and, for tests only, ``web_test_only_allow`` (exact
``"ip:port"`` addresses the address rules let through). A URL the guard refuses is an
``Error: ...`` observation counted in ``info["refused_urls"]``; a fetch that fails (DNS,
connection, HTTP status, time) is counted in ``info["fetch_errors"]``; neither is an invalid
action. Both counters are in ``info`` only with ``pages="web"``.

## Version history
* v0: first release.
"""
from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym

from corpora.index import Hit
from corpora.pages import PageStore, clean_title
from corpora.recording import ReplayMiss, recording_retriever, replay_retriever
from corpora.retrievers import get_retriever
from corpora.web import (DEFAULT_MAX_BYTES, DEFAULT_MAX_REDIRECTS, DEFAULT_TIMEOUT, WebFetcher, WebFetchError,
                         WebRefused, looks_like_url)
from envs.actions import MAX_ACTION_CHARS, PROTOCOLS, TOOL_SCHEMAS, Action, parse_action
from envs.grading import DEFAULT_COVER_EM_MAX_TOKENS, REWARD_METRICS, grade
from envs.questions import load_questions, pick_question
from envs.render import (TAGS_PROMPT, TOOL_PROMPT, fetch_cached, find_page, page_window, search_r1_observation,
                         search_results, wrap)
from envs.spaces import AnyText

MAX_OBS_CHARS = 32_000
PAGE_SOURCES = ("local", "web")
OBS_FORMATS = ("default", "search-r1")
_PAGE_STORES: dict[tuple[str, str], PageStore | None] = {}


class WebQAEnv(gym.Env[str, str]):
    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        dataset: str = "hotpotqa",
        retriever: str = "bundled",
        backend: str = "bm25",
        top_k: int = 3,
        max_turns: int = 4,
        reward: str = "em",
        format_penalty: float = 0.0,
        protocol: str = "tags",
        browse_words: int = 300,
        passage_chars: int = 1500,
        limit: int | None = None,
        prompt_template: str | None = None,
        cover_em_max_tokens: int = DEFAULT_COVER_EM_MAX_TOKENS,
        obs_format: str = "default",
        record: str | None = None,
        replay: str | None = None,
        pages: str = "local",
        web_allow_hosts: Sequence[str] | None = None,
        web_max_bytes: int = DEFAULT_MAX_BYTES,
        web_timeout: float = DEFAULT_TIMEOUT,
        web_max_redirects: int = DEFAULT_MAX_REDIRECTS,
        web_test_only_allow: Sequence[str] = (),
        render_mode: str | None = None,
    ):
        _check_args(reward, protocol, top_k, max_turns, browse_words, render_mode, obs_format, record, replay, pages)
        self.obs_format = obs_format
        self.record, self.replay = record or None, replay or None
        self.page_source = pages  # (self.pages is the local page store)
        self.web = WebFetcher(web_allow_hosts, web_max_bytes, web_timeout, web_max_redirects,
                              test_only_allow=web_test_only_allow) if pages == "web" else None
        self._web_cache: dict[str, Any] = {}
        self.dataset, self.retriever_spec, self.backend = dataset, retriever, backend
        self.top_k, self.max_turns, self.reward_metric = top_k, max_turns, reward
        self.format_penalty, self.protocol = float(format_penalty), protocol
        self.browse_words, self.passage_chars, self.limit = browse_words, passage_chars, limit
        self.cover_em_max_tokens = cover_em_max_tokens
        self.prompt_template = prompt_template or (TAGS_PROMPT if protocol == "tags" else TOOL_PROMPT)
        self.render_mode = render_mode
        self.observation_space = AnyText(MAX_OBS_CHARS)
        self.action_space = AnyText(MAX_ACTION_CHARS)
        self._questions: list[dict] | None = None
        self._example: dict | None = None
        self._done = True
        self._transcript: list[str] = []
        self._prefetched: tuple[str, list] | None = None  # see prefetch()

    # -- data and retrieval, loaded lazily once per process ---------------------------------
    @property
    def questions(self) -> list[dict]:
        if self._questions is None:
            self._questions = load_questions(self.dataset, self.limit)
        return self._questions

    @property
    def retriever(self):
        if self.replay:  # the recorded results only: no index, no network
            return replay_retriever(self.replay)
        inner = get_retriever(self.retriever_spec, self.backend)
        return recording_retriever(inner, self.record) if self.record else inner

    @property
    def pages(self) -> PageStore | None:
        """The page store of this env's index, shared per process (None over HTTP: browsing then
        asks the retrieval server's ``/page``)."""
        key = (self.retriever_spec, self.backend, self.record, self.replay)
        if key not in _PAGE_STORES:
            r = self.retriever
            _PAGE_STORES[key] = PageStore(r) if hasattr(r, "titles") else None
        return _PAGE_STORES[key]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_questions"] = None  # reloaded from the name/path; the index is never pickled
        state["_web_cache"] = {}  # fetched live pages are not part of the env
        return state

    # -- Gymnasium API ------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        # an example of your own does not need the QA set loaded
        ex = pick_question([] if "example" in (options or {}) else self.questions, options, self.np_random, self.dataset)
        self._example = ex
        self._turn = 0
        self._invalid = 0
        self._searches: list[str] = []
        self._browses: list[str] = []
        self._seen_titles: set[str] = set()
        self._retrieved_ids: list[str] = []
        self._answer: str | None = None
        self._refused_urls = self._fetch_errors = 0
        self._web_cache = {}
        self._replay_misses = 0
        self._prefetched = None
        self._done = False
        prompt = self.prompt_template.format(question=ex["question"].strip(), max_turns=self.max_turns)
        self._transcript = [prompt]
        info = {"question_id": ex["id"], "question": ex["question"], "dataset": ex.get("dataset", self.dataset), "turn": 0,
                "max_turns": self.max_turns}
        return prompt, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        parsed = self.parse(action)
        pre, self._prefetched = getattr(self, "_prefetched", None), None
        hits = None
        if parsed.kind == "search":
            try:
                hits = pre[1] if pre is not None and pre[0] == parsed.arg else self.retriever.search([parsed.arg], k=self.top_k)[0]
            except ReplayMiss as exc:
                return self.apply(parsed, None, action, miss=str(exc))
        return self.apply(parsed, hits, action)

    def prefetch(self, query: str, hits: Sequence[Hit]) -> None:
        """Hand the next ``step`` the hits of its search ``query`` (fetched in a batch with other
        envs' queries), so a wrapped env (``gym.make``) still gets one batched retrieval."""
        self._prefetched = (query, list(hits))

    # The two halves of step, so a vector env can batch the retrieval between them.
    def parse(self, action: str) -> Action:
        if self._done:
            raise RuntimeError("step() called on a finished episode: call reset() first")
        return parse_action(action, self.protocol)

    def apply(self, act: Action, hits: Sequence[Hit] | None, raw_action: Any = "", miss: str = "") -> tuple[str, float, bool, bool, dict]:
        self._turn += 1
        self._transcript.append(raw_action if isinstance(raw_action, str) else repr(raw_action))
        info: dict[str, Any] = {"turn": self._turn, "action": act.kind, "error": act.error or None}
        if act.kind == "answer":
            self._answer = act.arg
            obs = ""
            terminated, truncated = True, False
        else:
            if miss:  # replay: the recording does not hold this call
                self._replay_misses += 1
                obs = self._wrap(f"Error: {miss}.")
            elif act.kind == "search":
                obs = self._render_search(act.arg, hits or [])
                info["retrieved_ids"] = [h.doc_id for h in hits or []]
            elif act.kind == "browse":
                obs = self._render_browse(act)
            else:
                self._invalid += 1
                obs = self._wrap(f"Error: {act.error}.")
            terminated = False
            truncated = self._turn >= self.max_turns
            if truncated:
                obs += self._wrap(f"Turn limit of {self.max_turns} reached without an answer: the episode is over. You must answer within the turn limit.")
            elif self._turn == self.max_turns - 1 and self.obs_format != "search-r1":  # Search-R1 never warns
                obs += self._wrap("This is your last turn: you must answer now.")
        info["invalid_actions"] = self._invalid
        if self.web is not None:
            info["refused_urls"], info["fetch_errors"] = self._refused_urls, self._fetch_errors
        if self.replay:
            info["replay_misses"] = self._replay_misses
        reward = 0.0
        if terminated or truncated:
            self._done = True
            reward = self._final(info)
        obs = obs[:MAX_OBS_CHARS]
        self._transcript.append(obs)
        return obs, reward, terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return "".join(self._transcript)
        return None

    # -- privileged information (never in observations) ---------------------------------------
    def privileged(self) -> dict:
        """Gold answers and supporting titles/passages of the current question (for teachers, logs)."""
        if self._example is None:
            raise RuntimeError("privileged() needs a question: call reset() first")
        ex = self._example
        titles = list(ex.get("supporting_titles", []))
        passages: list[str] = []
        index_titles = getattr(self.retriever, "titles", None)
        if index_titles is not None:
            for t in titles:
                passages.extend(self.retriever.docs[i].text for i in index_titles.get(t, []))
        elif titles and hasattr(self.retriever, "passages_by_title"):  # a retrieval server's POST /passages
            by_title = self.retriever.passages_by_title(titles)
            for t in titles:
                passages.extend(by_title.get(t, []))
        return {
            "question_id": ex["id"],
            "question": ex["question"],
            "answers": list(ex["answers"]),
            "supporting_titles": titles,
            "supporting_passages": passages,
        }

    def tool_schemas(self) -> list[dict]:
        """OpenAI-style tool schemas for chat templates (``protocol="tool_call"``)."""
        return [dict(t) for t in TOOL_SCHEMAS]

    # -- rendering (the text itself: envs/render.py) and scoring ---------------------------------
    def _wrap(self, body: str) -> str:
        return wrap(body, self.protocol)

    def _render_search(self, query: str, hits: Sequence[Hit]) -> str:
        self._searches.append(query)
        for h in hits:
            self._seen_titles.add(h.title)
            self._retrieved_ids.append(h.doc_id)
        if self.obs_format == "search-r1":
            return search_r1_observation(hits)
        if not hits:
            return self._wrap(f"No results for {query!r}. Try other keywords.")
        return self._wrap(search_results(hits, self.passage_chars))

    def _render_browse(self, act: Action) -> str:
        self._browses.append(act.arg)
        if self.web is not None and looks_like_url(act.arg):
            return self._render_web(act)
        try:
            found = find_page(self.pages, self.retriever, act.arg)
        except ReplayMiss as exc:
            self._replay_misses += 1
            return self._wrap(f"Error: {exc}.")
        if found is None:
            return self._wrap("Error: browsing is not available with this retriever.")
        if not isinstance(found, tuple):
            more = f" Did you mean: {'; '.join(found)}?" if found else ""
            return self._wrap(f"Error: no page titled {clean_title(act.arg)[:100]!r}.{more}")
        title, page_text = found
        self._seen_titles.add(title)
        return self._wrap(page_window(title, page_text, act.part, self.browse_words, self.protocol, title))

    def _render_web(self, act: Action) -> str:
        """A live page through the guard (``pages="web"``), windowed like a stored page."""
        url = act.arg.strip()
        try:
            page = fetch_cached(self.web, self._web_cache, url)
        except WebFetchError as e:
            if isinstance(e, WebRefused):
                self._refused_urls += 1
            else:
                self._fetch_errors += 1
            return self._wrap(f"Error: cannot browse {url[:100]!r}: {e}.")
        if not page.text.strip():
            return self._wrap(f"Error: the page at {page.final_url[:100]!r} has no text.")
        title = page.title or page.final_url
        self._seen_titles.add(title)
        return self._wrap(page_window(title, page.text, act.part, self.browse_words, self.protocol, page.final_url))

    def _final(self, info: dict) -> float:
        ex = self._example
        answer = self._answer
        g = grade(answer, ex["answers"], self.cover_em_max_tokens) if answer is not None else None
        score = g.get(self.reward_metric) if g else 0.0
        if self.format_penalty and (self._invalid or answer is None):
            score -= self.format_penalty
        sup = ex.get("supporting_titles") or []
        info.update(
            answer=answer,
            em=g.em if g else 0.0,
            f1=g.f1 if g else 0.0,
            cover_em=g.cover_em if g else 0.0,
            gold_answers=list(ex["answers"]),
            question_id=ex["id"],
            searches=list(self._searches),
            browses=list(self._browses),
            n_searches=len(self._searches),
            turns=self._turn,
            all_retrieved_ids=list(self._retrieved_ids),
            supporting_title_recall=(sum(t in self._seen_titles for t in sup) / len(sup)) if sup else None,
            end_reason="answer" if answer is not None else "max_turns",
        )
        return float(score)


def _check_args(reward: str, protocol: str, top_k: int, max_turns: int, browse_words: int, render_mode: str | None,
                obs_format: str, record: str | None, replay: str | None, pages: str) -> None:
    """Refuse a bad combination of ``WebQAEnv`` arguments with a ValueError that names it."""
    if reward not in REWARD_METRICS:
        raise ValueError(f"reward must be one of {REWARD_METRICS}, got {reward!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if top_k < 1 or max_turns < 1 or browse_words < 1:
        raise ValueError("top_k, max_turns and browse_words must be >= 1")
    if render_mode not in (None, "ansi"):
        raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
    if obs_format not in OBS_FORMATS:
        raise ValueError(f"obs_format must be one of {OBS_FORMATS}, got {obs_format!r}")
    if obs_format == "search-r1" and protocol != "tags":
        raise ValueError("obs_format='search-r1' renders Search-R1's tag protocol: use protocol='tags'")
    if record and replay:
        raise ValueError("record and replay exclude each other: record a run, then replay it")
    if pages not in PAGE_SOURCES:
        raise ValueError(f"pages must be one of {PAGE_SOURCES}, got {pages!r}")
