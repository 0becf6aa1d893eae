"""Request bodies -> response bodies for ``agents.openai_server`` (``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``): field parsing and checks against the caps, prompts
to token ids, sampling through the :class:`agents.openai_worker.ModelWorker`, and OpenAI's
response shapes (log-probs, echo, stop strings). No HTTP in here."""
from __future__ import annotations

import time
import uuid
from dataclasses import replace

from agents.openai_request import INT64, MAX_STOP_CHARS, MAX_TEMPERATURE, MIN_TEMPERATURE, BadRequest, ServerLimits, Waiter
from agents.openai_worker import ModelWorker


def _get(body: dict, name: str, types, default=None, *, check=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRequest(f"'{name}' must be {what or types}, got {value!r}", name)
    if not isinstance(value, types):
        raise BadRequest(f"'{name}' must be {what or getattr(types, '__name__', types)}, got {type(value).__name__}", name)
    if check is not None and not check(value):
        raise BadRequest(f"'{name}' must be {what}, got {value!r}", name)
    return value


def _is_ids(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class OpenAIApp:
    """Turns request bodies into response bodies; no HTTP in here (the handler passes a
    :class:`Waiter` that knows about its connection)."""

    def __init__(self, worker: ModelWorker, model_name: str, tokenizer_name: str, limits: ServerLimits | None = None):
        self.worker, self.tok = worker, worker.tokenizer
        self.model_name, self.tokenizer_name = model_name, tokenizer_name
        self.vocab = max(len(self.tok), int(getattr(worker.model.config, "vocab_size", 0) or 0))  # padded rows count
        self.limits = (limits or ServerLimits()).resolved(worker.model)
        self.created = int(time.time())

    # -- shared field parsing ---------------------------------------------------------------------
    def _sampling(self, body: dict, allow_zero: bool):
        """(SamplingParams with a placeholder budget, the explicit max_tokens or None, n)."""
        from agents.policy import SamplingParams

        lim = self.limits
        max_tokens = _get(body, "max_tokens", int, None, check=lambda v: v >= 0, what="an integer >= 0")
        if "max_completion_tokens" in body:
            max_tokens = _get(body, "max_completion_tokens", int, check=lambda v: v >= 0, what="an integer >= 0")
        if max_tokens == 0 and not allow_zero:
            raise BadRequest("'max_tokens' must be >= 1 (0 is only allowed with echo)", "max_tokens")
        if max_tokens is not None and max_tokens > lim.max_new_tokens:
            raise BadRequest(f"'max_tokens' {max_tokens} is over this server's limit of {lim.max_new_tokens} "
                             "(--max-new-tokens)", "max_tokens")
        temperature = float(_get(body, "temperature", (int, float), 1.0,
                                 check=lambda v: v == 0 or MIN_TEMPERATURE <= v <= MAX_TEMPERATURE,
                                 what=f"0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}]"))
        top_p = float(_get(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, what="a number in (0, 1]"))
        top_k = _get(body, "top_k", int, 0, check=lambda v: -1 <= v <= INT64[1], what="an integer >= -1")
        seed = _get(body, "seed", int, None, check=lambda v: INT64[0] <= v <= INT64[1] - lim.max_n,
                    what=f"a 64-bit signed integer (at most {INT64[1] - lim.max_n})")
        stop = body.get("stop")
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= lim.max_stop:
            stop = tuple(stop)
        else:
            raise BadRequest(f"'stop' must be a string or a list of at most {lim.max_stop} non-empty strings "
                             "(--max-stop)", "stop")
        if stop == ("",):
            raise BadRequest("'stop' strings must not be empty", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise BadRequest(f"'stop' strings must be at most {MAX_STOP_CHARS} characters", "stop")
        n = _get(body, "n", int, 1, check=lambda v: 1 <= v <= lim.max_n, what=f"an integer in [1, {lim.max_n}] (--max-n)")
        if body.get("stream"):
            raise BadRequest("streaming is not supported", "stream")
        sp = SamplingParams(temperature=temperature, top_p=top_p, top_k=max(0, top_k), max_new_tokens=1,
                            stop=stop, seed=seed)
        return sp, max_tokens, n

    def _budget(self, n_prompt: int, max_tokens: int | None, default: int) -> int:
        """The generation budget of a prompt of ``n_prompt`` tokens: ``max_tokens``, or the default
        cut to what the context leaves; 400 when the prompt or the sum is over a limit."""
        lim = self.limits
        if n_prompt > lim.max_prompt_tokens:
            raise BadRequest(f"the prompt has {n_prompt} tokens, over this server's limit of {lim.max_prompt_tokens} "
                             "(--max-prompt-tokens)", "prompt")
        room = lim.max_model_len - n_prompt
        if max_tokens is None:
            if room < 1:
                raise BadRequest(f"the prompt has {n_prompt} tokens and leaves no room for a completion in the model's "
                                 f"context of {lim.max_model_len} tokens (--max-model-len)", "prompt")
            return min(default, room, lim.max_new_tokens)
        if max_tokens > room:
            raise BadRequest(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) is over the model's context "
                             f"of {lim.max_model_len} tokens (--max-model-len)", "max_tokens")
        return max_tokens

    def _check_text(self, chars: int, param: str) -> None:
        """Refuse text that cannot fit before tokenising it (tokenising 20 MB exhausted memory)."""
        if chars > self.limits.max_prompt_chars:
            raise BadRequest(f"the prompt has {chars} characters, over this server's limit of {self.limits.max_prompt_chars} "
                             "(--max-prompt-chars)", param)

    def _token_str(self, tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else self.tok.decode([tid], skip_special_tokens=False)

    def _check_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise BadRequest(f"token id {bad[0]} is out of range [0, {self.vocab})", param)

    # -- /v1/completions -------------------------------------------------------------------------
    def completions(self, body: dict, waiter: Waiter | None = None) -> dict:
        waiter = waiter or Waiter()
        lim = self.limits
        prompt = body.get("prompt")
        if isinstance(prompt, str) or _is_ids(prompt) and prompt:
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (_is_ids(p) and p) for p in prompt):
            prompts = prompt
        else:
            raise BadRequest("'prompt' must be a string, a non-empty list of token ids, or a list of those", "prompt")
        if len(prompts) > lim.max_prompts:
            raise BadRequest(f"{len(prompts)} prompts are over this server's limit of {lim.max_prompts} per request "
                             "(--max-prompts)", "prompt")
        echo = bool(_get(body, "echo", bool, False))
        as_ids = bool(_get(body, "return_tokens_as_token_ids", bool, False))
        keep_stop = bool(_get(body, "include_stop_str_in_output", bool, False))
        k = _get(body, "logprobs", int, None, check=lambda v: 0 <= v <= lim.max_logprobs,
                 what=f"an integer in [0, {lim.max_logprobs}] (--max-logprobs)")
        sp, max_tokens, n = self._sampling(body, allow_zero=echo)
        tokenised = []
        for p in prompts:  # every prompt checked before any runs
            if isinstance(p, str):
                self._check_text(len(p), "prompt")
                ids = list(self.tok(p, add_special_tokens=True)["input_ids"])
            else:
                ids = p
            if not ids:
                raise BadRequest("the prompt is empty after tokenisation", "prompt")
            budget = self._budget(len(ids), max_tokens, 16)
            self._check_ids(ids, "prompt")
            tokenised.append((list(ids), budget))
        choices, n_prompt, n_completion = [], 0, 0
        for index, (ids, budget) in enumerate(tokenised):
            for j, gen in enumerate(self._generate(ids, sp, budget, n, waiter)):
                choice, n_gen = self._complete_one(index * n + j, ids, gen, echo, as_ids, keep_stop, k, waiter)
                choices.append(choice)
                n_completion += n_gen
            n_prompt += len(ids)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion},
        }

    def _generate(self, ids: list[int], sp, max_tokens: int, n: int, waiter: Waiter) -> list[tuple]:
        """``n`` samples, each (token ids, sampling log-probs, finish_reason, stop_reason, text with
        the stop kept). The jobs are queued together (the worker batches them) and all cancelled
        when the request stops."""
        if max_tokens == 0:
            return [([], [], "length", None, "")] * n
        sp = replace(sp, max_new_tokens=max_tokens)
        jobs = [self.worker.submit(ids, sp if sp.seed is None or not j else replace(sp, seed=sp.seed + j)) for j in range(n)]
        out = []
        try:
            for job in jobs:
                c = waiter.wait(job.future, job.cancel)
                if c.finish_reason == "stop":
                    # TransformersPolicy cut the text right after the earliest stop string
                    stop_reason = max((s for s in sp.stop if c.text.endswith(s)), key=len, default=None)
                    out.append((c.token_ids, c.logprobs, "stop", stop_reason, c.text))
                else:
                    out.append((c.token_ids, c.logprobs, "stop" if c.finish_reason == "eos" else "length", None, c.text))
        except BaseException:
            for job in jobs:
                job.cancel.set()
                job.future.cancel()
            raise
        return out

    @staticmethod
    def _strip_stop(text: str, stop_reason, keep_stop: bool) -> str:
        if stop_reason and not keep_stop and text.endswith(stop_reason):
            return text[: -len(stop_reason)]
        return text

    def _complete_one(self, index, ids, gen, echo, as_ids, keep_stop, k, waiter: Waiter):
        gen_ids, gen_lps, finish, stop_reason, gen_text = gen
        text = self._strip_stop(gen_text, stop_reason, keep_stop)
        if echo:
            text = self.tok.decode(ids, skip_special_tokens=False) + text
        logprobs = None
        if k is not None:
            toks: list[int] = []
            lps: list[float | None] = []
            tops: list[list[tuple[int, float]] | None] = []
            if echo or k > 0:
                s_lps, s_tops = self.worker.score(ids + gen_ids, k, waiter)
            if echo:
                toks += ids
                lps += s_lps[: len(ids)]
                tops += s_tops[: len(ids)] if k else [None] + [[(t, lp)] for t, lp in zip(ids[1:], s_lps[1 : len(ids)])]
            toks += gen_ids
            lps += gen_lps
            if k:
                tops += s_tops[len(ids):]
            else:
                tops += [[(t, lp)] for t, lp in zip(gen_ids, gen_lps)]
            pieces = [self.tok.decode([t], skip_special_tokens=False) for t in toks]
            strs = [f"token_id:{t}" for t in toks] if as_ids else pieces
            offsets, pos = [], 0
            for piece in pieces:  # offsets into the returned text, by per-token decoded lengths (as vLLM does)
                offsets.append(pos)
                pos += len(piece)
            top_dicts = [None if top is None else {self._token_str(i, as_ids): v for i, v in top} for top in tops]
            logprobs = {"tokens": strs, "token_logprobs": lps, "top_logprobs": top_dicts, "text_offset": offsets}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
                "stop_reason": stop_reason}, len(gen_ids)

    # -- /v1/chat/completions ---------------------------------------------------------------------
    def chat(self, body: dict, waiter: Waiter | None = None) -> dict:
        waiter = waiter or Waiter()
        lim = self.limits
        msgs = body.get("messages")
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content", ""), (str, type(None)))
            for m in msgs)
        if not ok:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects with string content", "messages")
        msgs = [{**m, "content": m.get("content") or ""} for m in msgs]
        want_lp = bool(_get(body, "logprobs", bool, False))
        k = _get(body, "top_logprobs", int, 0, check=lambda v: 0 <= v <= lim.max_logprobs,
                 what=f"an integer in [0, {lim.max_logprobs}] (--max-logprobs)")
        keep_stop = bool(_get(body, "include_stop_str_in_output", bool, False))
        cont = bool(_get(body, "continue_final_message", bool, False))
        add_gen = bool(_get(body, "add_generation_prompt", bool, not cont))
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BadRequest("'tools' must be a list", "tools")
        if cont and msgs[-1]["role"] != "assistant":
            raise BadRequest("continue_final_message needs a final assistant message", "continue_final_message")
        sp, max_tokens, n = self._sampling(body, allow_zero=False)
        if not getattr(self.tok, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template; use /v1/completions", "messages")
        self._check_text(sum(len(m["content"]) + len(m["role"]) for m in msgs) + (len(repr(tools)) if tools else 0), "messages")
        try:
            out = self.tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=add_gen,
                                               continue_final_message=cont, tokenize=True)
        except Exception as exc:  # noqa: BLE001 - template errors are the client's messages
            raise BadRequest(f"chat template failed on these messages: {exc}", "messages") from None
        ids = [int(x) for x in (out["input_ids"] if hasattr(out, "keys") else out)]
        budget = self._budget(len(ids), max_tokens, 512)
        choices, n_completion = [], 0
        for index, (gen_ids, gen_lps, finish, stop_reason, gen_text) in enumerate(self._generate(ids, sp, budget, n, waiter)):
            text = self._strip_stop(gen_text, stop_reason, keep_stop)
            if finish == "stop" and stop_reason is None and gen_ids and gen_ids[-1] in self.worker.policy.eos_ids:
                text = self.tok.decode(gen_ids[:-1], skip_special_tokens=False)  # no end-of-turn token in the content
            logprobs = None
            if want_lp:
                tops = self.worker.score(ids + gen_ids, k, waiter)[1][len(ids):] if k else [[] for _ in gen_ids]
                content = []
                for t, lp, top in zip(gen_ids, gen_lps, tops):
                    s = self.tok.decode([t], skip_special_tokens=False)
                    content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                                    "top_logprobs": [{"token": (u := self.tok.decode([i], skip_special_tokens=False)),
                                                      "logprob": v, "bytes": list(u.encode())} for i, v in top]})
                logprobs = {"content": content}
            choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                            "finish_reason": finish, "stop_reason": stop_reason})
            n_completion += len(gen_ids)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name, "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n_completion, "total_tokens": len(ids) + n_completion},
        }

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "webqa-gym", "tokenizer": self.tokenizer_name,
                                            "max_model_len": self.limits.max_model_len}]}
