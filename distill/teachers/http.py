"""A teacher behind any OpenAI-compatible endpoint, over ``requests``.

Scores go through ``POST {url}/chat/completions``; token log-probs through
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
        self.capabilities = frozenset({"score"} | ({"logprobs"} if logprobs else set()))
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=self.concurrency))
        self.session.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=self.concurrency))
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.stats = {"requests": 0, "errors": 0, "retries": 0, "timeouts": 0, "http_5xx": 0}
        self._lock = threading.Lock()

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
