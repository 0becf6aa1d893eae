"""The Policy protocol: token ids in, token ids (with log-probs) out.

A policy turns a batch of token-id prompts into completions. The rollout appends exactly
the returned ids to each episode's history and never decodes and re-encodes it, so what a
trainer scores is what the policy sampled. Backends: ``TransformersPolicy`` (CPU/GPU,
``agents/hf_policy.py``), ``ScriptedPolicy`` (``agents/scripted_policy.py``); vLLM and
OpenAI-compatible HTTP follow the same protocol.

``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the model's *raw* next-token
distribution (temperature 1, no top-p/top-k), as vLLM reports by default; a trainer that
samples at another temperature recomputes what it needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from agents.schedulers import Lockstep  # noqa: F401  (re-exported: it lived here)

# Generation stops right after one of these (the end of an action), or at EOS.
ACTION_STOPS = ("</search>", "</browse>", "</answer>", "</tool_call>")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 500
    stop: tuple[str, ...] = ACTION_STOPS
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError(f"invalid sampling parameters: {self}")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (action end), "eos", "length"
    extra: dict[str, Any] = field(default_factory=dict)


class Policy(Protocol):
    """What the rollout needs from an acting model."""

    def encode(self, text: str) -> list[int]:
        """Tokenise text with no special tokens (observations)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def prompt_ids(self, user_text: str, tools: list[dict] | None = None) -> list[int]:
        """The first prompt: the model's chat template around one user message."""
        ...

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, contexts: Sequence[dict] | None = None
    ) -> list[Completion]:
        """One completion per prompt. ``contexts`` carries per-episode data for scripted policies."""
        ...


class TokenizerPolicy:
    """``encode``/``decode``/``prompt_ids`` of a policy that holds a transformers-style
    ``self.tokenizer`` (the chat template formats the first prompt)."""

    tokenizer: Any

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def prompt_ids(self, user_text: str, tools: list[dict] | None = None) -> list[int]:
        return chat_ids(self.tokenizer, [{"role": "user", "content": user_text}], tools)


def chat_ids(tokenizer, messages: Sequence[dict], tools: list[dict] | None = None) -> list[int]:
    """``messages`` through the tokenizer's chat template with the generation prompt opened; plain
    encoding of the concatenated contents when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(list(messages), tools=tools, add_generation_prompt=True, tokenize=True)
        return [int(x) for x in (out["input_ids"] if hasattr(out, "keys") else out)]
    return list(tokenizer.encode("\n".join(m["content"] for m in messages), add_special_tokens=False))


def first_stop(text: str, stops: Sequence[str]) -> int:
    """End offset of the earliest stop string in ``text``, or -1."""
    best = -1
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best < 0 or i + len(s) < best):
            best = i + len(s)
    return best


class TurnScheduler(Protocol):
    """How the rollout drives a policy, one episode turn at a time.

    ``submit(key, ids, max_new_tokens, context)`` asks for the next turn of episode ``key`` whose
    whole history (prompt, earlier turns, observations) is ``ids``; ``advance()`` generates and
    returns ``[(key, Completion)]`` for at least one submitted episode whose turn ended;
    ``release(key)`` forgets an episode that finished. Two schedulers exist, both in
    :mod:`agents.schedulers`: :class:`~agents.schedulers.Lockstep` (any policy: one batched
    ``generate`` over every submitted episode per ``advance``) and the transformers policy's
    continuous one (an episode whose turn ends leaves the decode batch and rejoins it,
    observation prefilled, while the others keep decoding).
    """

    def submit(self, key: int, ids: Sequence[int], max_new_tokens: int, context: dict | None = None) -> None: ...

    def advance(self) -> list[tuple[int, Completion]]: ...

    def release(self, key: int) -> None: ...


def cut_completion(ids: Sequence[int], lps: Sequence[float], decode, stops: Sequence[str], eos_ids) -> Completion:
    """A Completion that ends the way TransformersPolicy ends one: at the first token whose text
    completes a stop string (kept; the text is cut right after the stop), else at the first EOS
    (kept), else ``"length"``. A server that ran past a stop is cut back here."""
    ids, lps = list(ids), list(lps)
    text = decode(ids)
    if stops and first_stop(text, stops) >= 0:
        lo, hi = 1, len(ids)  # the shortest prefix whose text holds a stop
        while lo < hi:
            mid = (lo + hi) // 2
            if first_stop(decode(ids[:mid]), stops) >= 0:
                hi = mid
            else:
                lo = mid + 1
        text = decode(ids[:lo])
        return Completion(ids[:lo], lps[:lo], text[: first_stop(text, stops)], "stop")
    for k, t in enumerate(ids):
        if t in eos_ids:
            return Completion(ids[: k + 1], lps[: k + 1], decode(ids[: k + 1]), "eos")
    return Completion(ids, lps, text, "length")
