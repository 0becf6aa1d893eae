"""OpenAIPolicy: the Policy protocol over any OpenAI-compatible HTTP endpoint.

    from agents.http_policy import OpenAIPolicy
    policy = OpenAIPolicy("http://127.0.0.1:8001/v1", tokenizer="small")   # our server, vLLM serve, ...

Two ways to talk to a server:

* ``api="completions"`` (default, exact): each prompt is sent as a list of token ids with
  ``return_tokens_as_token_ids``, ``logprobs`` and ``include_stop_str_in_output``, so the
  reply's ``logprobs.tokens`` are ``"token_id:N"`` strings and the ids and sampling log-probs
  are exactly what the server sampled (vLLM's OpenAI server and ``agents.openai_server`` both
  honour this; a ``token_ids`` field on the choice, as newer vLLM gives, is used too). A server
  that answers with plain token strings is handled by re-tokenising the text, and the
  completion is marked ``extra["retokenized"] = True``; so is every completion from a server
  that refuses token-id prompts (a 422 naming ``prompt``, or a 400/500 saying ``prompt`` must be
  a string: llama-cpp-python 0.3 answers a validation error with 500),
  to which the decoded prompt text is sent from then on.
* ``api="chat"`` (for endpoints that only speak chat): the user message the prompt was built
  from (recorded by :meth:`prompt_ids`) plus the text generated since, as an assistant
  message, are sent as ``messages``; the reply is re-tokenised (marked). The stop string a chat
  server strips is put back when the server says which it was (``stop_reason``) or when only
  one action tag is open.

``logprobs`` (default 0) is the number of top alternatives asked for besides the sampled
token; 0 is enough for the sampled token's log-prob (vLLM, OpenAI) and spares our server a
scoring pass.

``strict_openai=True`` sends only fields of OpenAI's own API (no ``top_k``,
``return_tokens_as_token_ids``, ``include_stop_str_in_output``, ``continue_final_message``;
at most 4 stop strings), for services that reject unknown fields.

A batch is sent as concurrent requests over one pooled :class:`requests.Session`. Connection
errors, timeouts and 5xx answers are retried with exponential backoff (``backoff * 2**i``
seconds); a 4xx answer raises :class:`EndpointError` naming the URL, the status and the body.
``self.retries_done`` counts the retries.

Sampling: the seed of prompt ``i`` in a batch is ``seed + i`` (equal prompts of a group must
not get equal samples). Log-probs are whatever the server reports (vLLM and our server: raw,
temperature-1 log-probs); a missing one is NaN, never a silent 0.
"""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from agents.models import load_named_tokenizer
from agents.policy import Completion, SamplingParams, TokenizerPolicy, cut_completion, first_stop

_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")


class EndpointError(RuntimeError):
    """The endpoint refused a request (4xx) or stayed unreachable after the retries."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status, self.body = status, body


def parse_model_url(spec: str) -> tuple[str, str | None]:
    """``"http://host:port/v1#small"`` -> (``"http://host:port/v1"``, ``"small"``)."""
    url, _, frag = spec.partition("#")
    return url, frag or None


class OpenAIPolicy(TokenizerPolicy):
    def __init__(self, base_url: str, model: str | None = None, api: str = "completions", tokenizer: Any = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.5, api_key: str | None = None,
                 max_workers: int = 16, logprobs: int = 0, strict_openai: bool = False):
        import requests
        from requests.adapters import HTTPAdapter

        if api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {api!r}")
        base_url = base_url.rstrip("/")
        if not re.search(r"/v\d+$", base_url):
            base_url += "/v1"
        self.base_url, self.api = base_url, api
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.logprobs_k = logprobs
        self.strict = strict_openai
        self.text_prompts = False  # set when the server refuses token-id prompts
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max_workers)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers["Content-Type"] = "application/json"
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="openai-policy")
        self.retries_done = 0
        self._lock = threading.Lock()
        self._user_texts: dict[tuple[int, ...], str] = {}  # prompt ids -> the user message (chat api)
        served = None
        if model is None or tokenizer is None:
            served = self._get("/models")["data"][0]
        self.model = model or served["id"]
        if tokenizer is None:
            tokenizer = served.get("tokenizer") or self.model  # our server names its tokenizer
        self.tokenizer = load_named_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or ())

    # -- HTTP ----------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        import requests

        url = self.base_url + path
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.retries_done += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = self.session.request(method, url, json=payload, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if r.status_code >= 500 and "validation error" not in r.text:
                last = f"HTTP {r.status_code}: {r.text[:500]}"
                continue
            if r.status_code >= 400:  # (llama-cpp-python answers a request validation error with 500)
                raise EndpointError(f"{method} {url} returned HTTP {r.status_code}: {r.text[:2000]}", r.status_code, r.text)
            try:
                return r.json()
            except ValueError:
                raise EndpointError(f"{method} {url} returned HTTP {r.status_code} with a body that is not JSON: "
                                    f"{r.text[:500]!r}", r.status_code, r.text) from None
        raise EndpointError(f"{method} {url} failed after {self.retries + 1} attempt(s); last error: {last}")

    def _get(self, path: str) -> dict:
        return self._request("GET", path)

    def _post(self, path: str, payload: dict) -> dict:
        return self._request("POST", path, payload)

    # -- text <-> ids ----------------------------------------------------------------------------------
    def prompt_ids(self, user_text: str, tools: list[dict] | None = None) -> list[int]:
        ids = super().prompt_ids(user_text, tools)
        with self._lock:
            self._user_texts[tuple(ids)] = user_text
        return ids

    # -- generation --------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, contexts=None) -> list[Completion]:
        one = self._complete if self.api == "completions" else self._chat
        seeds = [None if sampling.seed is None else sampling.seed + i for i in range(len(prompts))]
        futures = [self.pool.submit(one, list(p), sampling, s) for p, s in zip(prompts, seeds)]
        return [f.result() for f in futures]

    def _payload(self, sp: SamplingParams, seed: int | None) -> dict:
        body: dict[str, Any] = {"model": self.model, "max_tokens": sp.max_new_tokens, "temperature": sp.temperature,
                                "top_p": sp.top_p, "n": 1}
        if sp.top_k and not self.strict:
            body["top_k"] = sp.top_k
        if sp.stop:
            body["stop"] = list(sp.stop)[:4] if self.strict else list(sp.stop)  # OpenAI takes at most 4
            if not self.strict:
                body["include_stop_str_in_output"] = True
        if seed is not None:
            body["seed"] = seed
        return body

    def _complete(self, prompt: list[int], sp: SamplingParams, seed: int | None) -> Completion:
        body = {**self._payload(sp, seed), "prompt": prompt, "logprobs": self.logprobs_k}
        if not self.strict:
            body.update(return_tokens_as_token_ids=True, skip_special_tokens=False)
        retok = self.text_prompts
        if self.text_prompts:
            body["prompt"] = self.decode(prompt)
        try:
            choice = self._post("/completions", body)["choices"][0]
        except EndpointError as exc:
            refused = "prompt" in exc.body and (exc.status == 422 or exc.status in (400, 500) and "string" in exc.body)
            if retok or not refused:
                raise
            # a server that takes only text prompts (llama-cpp-python: 422 on a list of ids): send
            # the decoded prompt from now on; the server re-tokenises it, so mark the result
            self.text_prompts = retok = True
            body["prompt"] = self.decode(prompt)
            choice = self._post("/completions", body)["choices"][0]
        lp = choice.get("logprobs") or {}
        tokens, token_lps = lp.get("tokens") or [], lp.get("token_logprobs") or []
        ids = choice.get("token_ids")
        parsed = [_TOKEN_ID.match(t) for t in tokens] if isinstance(tokens, list) else []
        if ids is None and tokens and all(parsed):
            ids = [int(m.group(1)) for m in parsed]
        if ids is None:  # plain token strings (or nothing): the text is all we can trust
            ids, retok = self.encode(choice.get("text") or ""), True
        lps = [float("nan") if v is None else float(v) for v in token_lps]
        if len(lps) != len(ids):
            lps = [float("nan")] * len(ids)
        return self._finish(ids, lps, choice, sp, retok)

    def _chat(self, prompt: list[int], sp: SamplingParams, seed: int | None) -> Completion:
        messages, cont = self._messages(prompt)
        body = {**self._payload(sp, seed), "messages": messages, "logprobs": True}
        if cont and not self.strict:  # vLLM and our server continue the assistant message, not open a new one
            body.update(continue_final_message=True, add_generation_prompt=False)
        choice = self._post("/chat/completions", body)["choices"][0]
        text = (choice.get("message") or {}).get("content") or ""
        if choice.get("finish_reason") == "stop" and sp.stop and first_stop(text, sp.stop) < 0:
            text += _stripped_stop(text, sp.stop, choice.get("stop_reason"))
        ids = self.encode(text)
        content = (choice.get("logprobs") or {}).get("content") or []
        lps = [float(c.get("logprob", float("nan"))) for c in content]
        if len(lps) != len(ids):
            lps = [float("nan")] * len(ids)
        return self._finish(ids, lps, choice, sp, True)

    def _messages(self, prompt: list[int]) -> tuple[list[dict], bool]:
        """The chat messages behind ``prompt``: the recorded user message, plus everything after it
        (agent actions and observations) as one assistant message to be continued."""
        with self._lock:
            known = list(self._user_texts.items())
        for ids, user in sorted(known, key=lambda kv: -len(kv[0])):
            if tuple(prompt[: len(ids)]) == ids:
                rest = self.decode(prompt[len(ids):])
                msgs = [{"role": "user", "content": user}]
                return (msgs + [{"role": "assistant", "content": rest}], True) if rest else (msgs, False)
        return [{"role": "user", "content": self.tokenizer.decode(prompt, skip_special_tokens=True)}], False

    def _finish(self, ids: list[int], lps: list[float], choice: dict, sp: SamplingParams, retok: bool) -> Completion:
        c = cut_completion(ids, lps, self.decode, sp.stop, self.eos_ids)
        if c.finish_reason == "length" and choice.get("finish_reason") == "stop" and len(ids) < sp.max_new_tokens:
            c.finish_reason = "eos"  # stopped by the server at an end-of-turn token it did not return (chat)
        if retok:
            c.extra["retokenized"] = True
        if choice.get("finish_reason"):
            c.extra["server_finish_reason"] = choice["finish_reason"]
        return c

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.session.close()


def _stripped_stop(text: str, stops: Sequence[str], stop_reason: Any) -> str:
    """The stop string a chat server removed from ``text``: the one it names, else the closing tag
    of the last action tag opened in ``text``, else the only stop; '' when unknown."""
    if isinstance(stop_reason, str) and stop_reason in stops:
        return stop_reason
    best, where = "", -1
    for s in stops:
        if s.startswith("</"):
            i = text.rfind("<" + s[2:])
            if i > where:
                best, where = s, i
    if best:
        return best
    return stops[0] if len(stops) == 1 else ""


