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
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import requests
from requests.adapters import HTTPAdapter


class TeacherRequestError(RuntimeError):
    pass


class HttpTeacher:
    def __init__(self, url: str, model: str | None = None, tokenizer=None, timeout: float = 30.0, retries: int = 2,
                 backoff: float = 0.25, concurrency: int = 8, logprobs: bool = False, api_key: str | None = None,
                 max_tokens: int = 8):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"teacher url must start with http:// or https://, got {url!r}")
        url = url.rstrip("/")
        self.base = url if url.endswith("/v1") else url + "/v1"
        self.model, self.tokenizer, self.name = model, tokenizer, url
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.concurrency, self.max_tokens = max(1, int(concurrency)), int(max_tokens)
        self.capabilities = frozenset({"score", "score_distribution", "act"} | ({"logprobs"} if logprobs else set()))
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=self.concurrency))
        self.session.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=self.concurrency))
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.stats = {"requests": 0, "errors": 0, "retries": 0, "timeouts": 0, "http_5xx": 0}
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise ``TeacherRequestError`` (one line) when ``GET {url}/models`` gets no HTTP answer
        at all, or is refused for its credentials (401/403). Any other answer means a server is
        there (not every chat endpoint implements /models)."""
        try:
            r = self.session.get(self.base + "/models", timeout=min(self.timeout, 10.0))
        except requests.RequestException as exc:
            raise TeacherRequestError(f"teacher {self.base} cannot be reached: {type(exc).__name__}") from None
        if r.status_code in (401, 403):
            raise TeacherRequestError(f"teacher {self.base} refused the credentials ({r.status_code}): set teacher.api_key")

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _post(self, path: str, body: dict) -> dict | None:
        """POST with retries; the JSON reply, or None after the last failed attempt."""
        url = self.base + path
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retries")
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self._count("requests")
            try:
                r = self.session.post(url, json=body, timeout=self.timeout)
            except requests.Timeout:
                self._count("timeouts")
                continue
            except requests.ConnectionError:
                continue
            if r.status_code >= 500 or r.status_code in (408, 429):
                if r.status_code >= 500:
                    self._count("http_5xx")
                continue
            if r.status_code >= 400:
                raise TeacherRequestError(f"teacher {url} answered {r.status_code}: {r.text[:300]}")
            try:
                return r.json()
            except ValueError:
                continue
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
