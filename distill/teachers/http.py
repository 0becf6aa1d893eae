"""A teacher behind any OpenAI-compatible endpoint, over ``requests``.

Scores go through ``POST {url}/chat/completions``; so does acting (ovd's teacher continuations:
``chat``, text in, text out, no shared tokenizer). ``score_distribution`` asks the chat reply's
``top_logprobs`` and reads the ten digits at the score token (None where the server returns no
log-probs: the grader falls back to the parsed digit). Token log-probs go through
``POST {url}/completions`` with the token ids as the prompt, ``max_tokens=0``, ``echo=true``
and ``logprobs`` (vLLM serve and ``agents.openai_server`` return prompt log-probs this way;
many hosted APIs do not, so ``logprobs`` is off unless the config turns it on).

Requests run concurrently (``concurrency`` threads over one pooled session). Connection
errors, timeouts, 429 and 5xx are retried with exponential backoff; when the retries run out
the item comes back as ``None`` and is counted in ``stats`` - the caller drops it, it never
becomes a score of 0. A 4xx other than 408/429 is a configuration error and raises with the
server's message.

## A pool of endpoints
``url`` may name several endpoints serving the same model (a list, or one string with commas:
``"http://h1:8001/v1,http://h2:8001/v1"``), as ``corpora.http_client.HttpRetriever`` does for
retrieval replicas. Each request goes to the next endpoint in turn (round robin; ``concurrency``
bounds the requests in flight over the whole pool). An endpoint that fails a request (connection
refused or reset, timeout, 408, 429, 5xx, a body that is not JSON) is marked down for
``down_seconds`` and the same request goes at once to the next endpoint that is up; endpoints
marked down are skipped. When the cool-down is over, one request (only one) probes the endpoint:
an answer marks it up, a failure marks it down again. Only when every endpoint is down is a
request sent to the down ones too (any answer brings one back). A round that fails everywhere is
repeated ``retries`` more times after a backoff, as for a single URL. ``pool_stats()`` counts
requests and failures per endpoint; ``check()`` passes when at least one endpoint answers and
marks the others down.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import requests
from requests.adapters import HTTPAdapter

log = logging.getLogger("distill.teachers.http")


class TeacherRequestError(RuntimeError):
    pass


class HttpTeacher:
    def __init__(self, url: str | Sequence[str], model: str | None = None, tokenizer=None, timeout: float = 30.0,
                 retries: int = 2, backoff: float = 0.25, concurrency: int = 8, logprobs: bool = False,
                 api_key: str | None = None, max_tokens: int = 8, down_seconds: float = 30.0):
        urls = [u.strip().rstrip("/") for u in (url.split(",") if isinstance(url, str) else url) if u.strip()]
        if not urls:
            raise ValueError(f"teacher url: one http:// or https:// URL or several separated by commas, got {url!r}")
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"teacher url must start with http:// or https://, got {u!r}")
        self.bases = [u if u.endswith("/v1") else u + "/v1" for u in urls]  # one per endpoint, in the order given
        if len(set(self.bases)) < len(self.bases):
            raise ValueError(f"teacher url names an endpoint twice: {url!r}")
        self.base = self.bases[0]
        self.model, self.tokenizer, self.name = model, tokenizer, ",".join(urls)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.concurrency, self.max_tokens = max(1, int(concurrency)), int(max_tokens)
        self.down_seconds = float(down_seconds)
        self.capabilities = frozenset({"score", "score_distribution", "act"} | ({"logprobs"} if logprobs else set()))
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=len(self.bases), pool_maxsize=self.concurrency)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.stats = {"requests": 0, "errors": 0, "retries": 0, "timeouts": 0, "http_5xx": 0}
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._down_until = {b: 0.0 for b in self.bases}  # 0: up; else marked down, probed again after this time
        self._pool = {b: {"requests": 0, "failures": 0, "last_error": ""} for b in self.bases}

    def check(self) -> list[str]:
        """``GET {url}/models`` on every endpoint; any HTTP answer means a server is there (not
        every chat endpoint implements /models). Raise ``TeacherRequestError`` (one line) when no
        endpoint answers at all (naming each and why), or when one refuses the credentials
        (401/403). Endpoints that do not answer are marked down (a warning each) and returned."""

        def probe(base):
            try:
                r = self.session.get(base + "/models", timeout=min(self.timeout, 10.0))
            except requests.RequestException as exc:
                return type(exc).__name__
            if r.status_code in (401, 403):
                raise TeacherRequestError(f"teacher {base} refused the credentials ({r.status_code}): set teacher.api_key")
            return None

        why = dict(zip(self.bases, self._map(probe, self.bases)))
        bad = [b for b in self.bases if why[b] is not None]
        if len(bad) == len(self.bases) == 1:
            raise TeacherRequestError(f"teacher {self.base} cannot be reached: {why[self.base]}")
        if len(bad) == len(self.bases):
            raise TeacherRequestError(f"teacher cannot be reached at any of its {len(bad)} endpoints: "
                                      + "; ".join(f"{b} ({why[b]})" for b in bad))
        for b in bad:
            self._mark_down(b, f"{why[b]} at start-up")
        return bad

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    # -- the pool -------------------------------------------------------------------------------
    def _order(self) -> list[str]:
        """The endpoints one request tries, in order: round robin over those up, led by one whose
        cool-down is over (this request is its probe: the others keep skipping it until the probe
        answers); every endpoint, round robin, when all are down."""
        with self._lock:
            start = next(self._rr) % len(self.bases)
            order = self.bases[start:] + self.bases[:start]
            now = time.monotonic()
            up = [b for b in order if not self._down_until[b]]
            due = next((b for b in order if 0 < self._down_until[b] <= now), None)
            if due is not None:
                self._down_until[due] = now + self.down_seconds  # claimed: one probe per cool-down
                up.insert(0, due)
            return up or order

    def _mark_down(self, base: str, why: str) -> None:
        with self._lock:
            was_up = not self._down_until[base]
            self._down_until[base] = time.monotonic() + self.down_seconds
            self._pool[base]["failures"] += 1
            self._pool[base]["last_error"] = why
        if was_up and len(self.bases) > 1:
            log.warning("teacher endpoint %s is down, skipped for %.0f s: %s", base, self.down_seconds, why)

    def _mark_up(self, base: str) -> None:
        if self._down_until[base]:
            with self._lock:
                was_down, self._down_until[base] = bool(self._down_until[base]), 0.0
            if was_down and len(self.bases) > 1:
                log.warning("teacher endpoint %s is back", base)

    def down(self) -> list[str]:
        """The endpoints marked down now (skipped until a probe after their cool-down answers)."""
        return [b for b in self.bases if self._down_until[b]]

    def pool_stats(self) -> dict[str, dict]:
        """Per endpoint, in the order of ``url``: requests sent, failed requests, whether it is
        marked down, and its last failure."""
        with self._lock:
            return {b: {**self._pool[b], "down": bool(self._down_until[b])} for b in self.bases}

    def _post(self, path: str, body: dict) -> dict | None:
        """POST to the pool with failover and retries; the JSON reply, or None after the last
        failed round."""
        attempts = 0
        for round_ in range(self.retries + 1):
            if round_:
                time.sleep(self.backoff * 2 ** (round_ - 1))
            for base in self._order():
                if attempts:
                    self._count("retries")
                attempts += 1
                self._count("requests")
                with self._lock:
                    self._pool[base]["requests"] += 1
                try:
                    r = self.session.post(base + path, json=body, timeout=self.timeout)
                except requests.Timeout as exc:
                    self._count("timeouts")
                    self._mark_down(base, type(exc).__name__)
                    continue
                except requests.ConnectionError as exc:
                    self._mark_down(base, type(exc).__name__)
                    continue
                if r.status_code >= 500 or r.status_code in (408, 429):
                    if r.status_code >= 500:
                        self._count("http_5xx")
                    self._mark_down(base, f"HTTP {r.status_code}")
                    continue
                if r.status_code >= 400:
                    raise TeacherRequestError(f"teacher {base + path} answered {r.status_code}: {r.text[:300]}")
                try:
                    data = r.json()
                except ValueError:
                    self._mark_down(base, "a reply that is not JSON")
                    continue
                self._mark_up(base)
                return data
        self._count("errors")
        return None

    def _map(self, fn, items):
        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    # -- score ----------------------------------------------------------------------------------
    def score(self, messages: Sequence[list[dict]], sample: bool = False, seed: int = 0) -> list[str | None]:
        def one(msgs):
            body = {"messages": list(msgs), "max_tokens": self.max_tokens, "temperature": 0.8 if sample else 0.0}
            if self.model:
                body["model"] = self.model
            if sample:
                body["seed"] = seed
            data = self._post("/chat/completions", body)
            try:
                return None if data is None else str(data["choices"][0]["message"]["content"] or "")
            except (KeyError, IndexError, TypeError):
                self._count("errors")
                return None

        return self._map(one, list(messages))

    def score_distribution(self, messages: Sequence[list[dict]], top: int = 20) -> list[list[float] | None]:
        """P(digit 0..9) at the score token of each greedy chat reply, from its ``top_logprobs``
        (renormalised over the digits among them); None where the reply has no such token or the
        server gave no log-probs."""

        def one(msgs):
            body = {"messages": list(msgs), "max_tokens": self.max_tokens, "temperature": 0.0, "logprobs": True,
                    "top_logprobs": top}
            if self.model:
                body["model"] = self.model
            data = self._post("/chat/completions", body)
            try:
                content = (data["choices"][0].get("logprobs") or {}).get("content") or []
            except (KeyError, IndexError, TypeError, AttributeError):
                return None
            return digit_distribution(content)

        return self._map(one, list(messages))

    def chat(self, messages: Sequence[list[dict]], sampling) -> list[str | None]:
        """The endpoint's reply to each chat, cut after the first of ``sampling.stop`` (the stop
        string is put back where the server strips it); None where the request failed."""
        from agents.policy import first_stop

        def one(item):
            i, msgs = item
            body = {"messages": list(msgs), "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                    "top_p": sampling.top_p}
            if sampling.stop:
                body["stop"] = list(sampling.stop)[:4]
            if self.model:
                body["model"] = self.model
            if sampling.seed is not None:
                body["seed"] = sampling.seed + i  # one seed per chat: a group's equal histories still get different replies
            data = self._post("/chat/completions", body)
            try:
                choice = data["choices"][0]
                text = str(choice["message"]["content"] or "")
            except (KeyError, IndexError, TypeError):
                self._count("errors")
                return None
            end = first_stop(text, sampling.stop)
            if end >= 0:
                return text[:end]
            reason = choice.get("stop_reason")
            if choice.get("finish_reason") == "stop" and isinstance(reason, str) and reason in sampling.stop:
                return text + reason
            return text

        return self._map(one, list(enumerate(messages)))

    # -- log-probs ------------------------------------------------------------------------------
    def logprobs(self, seqs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> list[list[float] | None]:
        if "logprobs" not in self.capabilities:
            raise TeacherRequestError(f"teacher {self.name} was not configured with logprobs=true")

        def one(pair):
            seq, ts = pair
            body = {"prompt": [int(x) for x in seq], "max_tokens": 0, "echo": True, "logprobs": 0,
                    "return_tokens_as_token_ids": True, "temperature": 0.0}
            if self.model:
                body["model"] = self.model
            data = self._post("/completions", body)
            try:
                lps = data["choices"][0]["logprobs"]["token_logprobs"]
                return [float(lps[t]) for t in ts]
            except (KeyError, IndexError, TypeError, ValueError):
                self._count("errors")
                return None

        return self._map(one, list(zip(seqs, targets)))

    def policy(self):
        raise NotImplementedError("acting through an HTTP teacher is agents.http_policy.OpenAIPolicy")


def digit_distribution(content: list[dict]) -> list[float] | None:
    """From an OpenAI chat ``logprobs.content`` list: the probabilities of the digits 0-9 at the
    single-digit token right after the reply's last ``Score:`` (else its first single-digit
    token), read from that token's ``top_logprobs`` and renormalised; None when there is none."""
    import math
    import re

    text, first, after_score = "", None, None
    for j, c in enumerate(content):
        tok = str(c.get("token", ""))
        if len(tok.strip()) == 1 and tok.strip().isdigit():
            first = j if first is None else first
            if re.search(r"score\s*[:=]?\s*\**\s*$", text, re.IGNORECASE):
                after_score = j
        text += tok
    pos = after_score if after_score is not None else first
    if pos is None:
        return None
    probs = [0.0] * 10
    alts = content[pos].get("top_logprobs") or [content[pos]]
    for alt in alts:
        t = str(alt.get("token", "")).strip()
        if len(t) == 1 and t.isdigit() and alt.get("logprob") is not None:
            probs[int(t)] += math.exp(float(alt["logprob"]))
    z = sum(probs)
    return [p / z for p in probs] if z > 0 else None
