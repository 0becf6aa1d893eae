"""A teacher that is a transformers model in this process (or the student with adapters off).

Every token-level call runs ``forward_at`` in batches of ``batch_size`` sequences, so only
the rows at the requested positions ever get vocabulary-sized logits. ``distribution``
returns those rows for one micro-batch at a time; callers chunk by calling it per micro-batch.
Scores are generated greedily after the assistant turn is opened with ``"Score:"``; a retry
decodes constrained to the ten digits (the most likely one), so a local teacher always parses.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch

from agents.hf_policy import TransformersPolicy
from agents.policy import SamplingParams, chat_ids
from distill.forward import forward_at

SCORE_PREFIX = "Score:"


def digit_tokens(tokenizer, name: str = "teacher") -> tuple[list[int], list[int]]:
    """(prompt suffix ids, the token of each digit 0-9) such that ``Score: <d>`` encodes as
    suffix + [token of d]: ``Score:`` + " d" where " d" is one token, else ``Score: `` + "d"
    (Qwen splits " 6" into " " and "6": scoring the digit right after ``Score:`` would measure
    the space)."""
    enc = lambda x: tokenizer.encode(x, add_special_tokens=False)  # noqa: E731
    for prefix, form in ((SCORE_PREFIX, " {}"), (SCORE_PREFIX + " ", "{}")):
        head = enc(prefix)
        toks = [enc(prefix + form.format(d)) for d in range(10)]
        if all(len(t) == len(head) + 1 and t[:-1] == head for t in toks):
            return head, [t[-1] for t in toks]
    raise ValueError(f"teacher {name!r}: its tokenizer has no single-token digits after {SCORE_PREFIX!r}")


class LocalTeacher:
    capabilities = frozenset({"score", "score_distribution", "logprobs", "topk_logprobs", "distribution", "hidden_states", "act"})

    def __init__(self, model, tokenizer, name: str = "local", batch_size: int = 4, disable_adapter: bool = False):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.batch_size = max(1, int(batch_size))
        self._disable_adapter = disable_adapter
        self._policy = TransformersPolicy(model, tokenizer)
        self.pad_id = self._policy.pad_id
        self.stats = {"requests": 0, "errors": 0}

    @classmethod
    def self_teacher(cls, model, tokenizer, name: str = "self", batch_size: int = 4) -> "LocalTeacher":
        """The student's initial policy: adapters disabled under peft, else a frozen copy made now."""
        if hasattr(model, "disable_adapter"):
            return cls(model, tokenizer, name=name, batch_size=batch_size, disable_adapter=True)
        frozen = copy.deepcopy(model).requires_grad_(False).eval()
        return cls(frozen, tokenizer, name=name, batch_size=batch_size)

    def _ctx(self):
        return self.model.disable_adapter() if self._disable_adapter else contextlib.nullcontext()

    # -- score ----------------------------------------------------------------------------------
    def score(self, messages: Sequence[list[dict]], sample: bool = False, seed: int = 0) -> list[str | None]:
        """Greedy reply after ``Score:``. A retry (``sample=True``) decodes constrained to the
        digits 0-9 (the teacher's most likely digit), so a local teacher always parses on retry."""
        prefix = self.tokenizer.encode(SCORE_PREFIX, add_special_tokens=False)
        prompts = []
        for msgs in messages:
            prompts.append(chat_ids(self.tokenizer, msgs) + prefix)
        replies: list[str | None] = []
        with self._ctx():
            for i in range(0, len(prompts), self.batch_size):
                chunk = prompts[i : i + self.batch_size]
                if sample:
                    replies += [f"{SCORE_PREFIX} {d}" for d in self._best_digit(chunk)]
                else:
                    outs = self._policy.generate(chunk, SamplingParams(temperature=0.0, max_new_tokens=4, stop=("\n",)))
                    replies += [SCORE_PREFIX + o.text for o in outs]
        self.stats["requests"] += len(prompts)
        return replies

    def _digits(self) -> tuple[list[int], torch.Tensor]:
        if getattr(self, "_digit_setup", None) is None:
            head, ids = digit_tokens(self.tokenizer, self.name)
            self._digit_setup = (head, torch.tensor(ids))
        return self._digit_setup

    @torch.no_grad()
    def score_distribution(self, messages: Sequence[list[dict]]) -> list[list[float]]:
        """The teacher's probabilities of the digits 0..9 as the reply to each chat (renormalised
        over the ten digits), read from one forward pass; ``ovd`` with ``method.score=expected``
        uses their mean, a graded version of the same verbal score."""
        head, digit_tok = self._digits()
        prompts = [chat_ids(self.tokenizer, msgs) + head for msgs in messages]
        out: list[list[float]] = []
        with self._ctx():
            for i in range(0, len(prompts), self.batch_size):
                chunk = prompts[i : i + self.batch_size]
                seqs = [list(p) + [self.pad_id] for p in chunk]  # target a placeholder right after the prompt
                got = forward_at(self.model, seqs, [[len(p)] for p in chunk], self.pad_id)
                out += torch.softmax(got.logits_N_V[:, digit_tok].float(), -1).tolist()
        self.stats["requests"] += len(prompts)
        return out

    def _best_digit(self, prompts) -> list[int]:
        """The most likely digit after each prompt (the prompts end with ``Score:``)."""
        head, digit_tok = self._digits()
        extra = head[len(self.tokenizer.encode(SCORE_PREFIX, add_special_tokens=False)):]
        seqs = [list(p) + extra + [self.pad_id] for p in prompts]
        with torch.no_grad():
            out = forward_at(self.model, seqs, [[len(s) - 1] for s in seqs], self.pad_id)
        return out.logits_N_V[:, digit_tok].argmax(-1).tolist()

    # -- token level ----------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, seqs, targets, with_logits=True, layers=None):
        with self._ctx():
            return forward_at(self.model, seqs, targets, self.pad_id, with_logits=with_logits, layers=layers)

    def _chunks(self, n):
        for i in range(0, n, self.batch_size):
            yield i, min(n, i + self.batch_size)

    def logprobs(self, seqs, targets) -> list[list[float] | None]:
        out: list[list[float] | None] = []
        for a, b in self._chunks(len(seqs)):
            o = self._forward(seqs[a:b], targets[a:b])
            lp = torch.log_softmax(o.logits_N_V.float(), -1).gather(-1, o.target_ids_N[:, None]).squeeze(-1)
            for i in range(b - a):
                out.append(lp[o.seq_index_N == i].tolist())
        self.stats["requests"] += len(seqs)
        return out

    def topk_logprobs(self, seqs, targets, k: int):
        """Per sequence: (ids_n_K, logprobs_n_K) of the teacher's own top-k tokens."""
        out = []
        for a, b in self._chunks(len(seqs)):
            o = self._forward(seqs[a:b], targets[a:b])
            lp = torch.log_softmax(o.logits_N_V.float(), -1)
            vals, ids = lp.topk(k, dim=-1)
            for i in range(b - a):
                sel = o.seq_index_N == i
                out.append((ids[sel], vals[sel]))
        return out

    def distribution(self, seqs, targets) -> torch.Tensor:
        """Logits rows ``[N, V]`` (float32, no grad) at the targets of all ``seqs``, concatenated."""
        rows = [self._forward(seqs[a:b], targets[a:b]).logits_N_V.float() for a, b in self._chunks(len(seqs))]
        return torch.cat(rows) if rows else torch.empty(0)

    def hidden_states(self, seqs, targets, layers: Sequence[int]) -> torch.Tensor:
        """Block outputs ``[L, N, D]`` of ``layers`` (1-based) at the targets, concatenated over seqs."""
        parts = [self._forward(seqs[a:b], targets[a:b], with_logits=False, layers=list(layers)).hidden_L_N_D for a, b in self._chunks(len(seqs))]
        return torch.cat(parts, dim=1)

    # -- act ------------------------------------------------------------------------------------
    def chat(self, messages: Sequence[list[dict]], sampling: SamplingParams) -> list[str | None]:
        """The teacher's reply to each chat (its own chat template and tokenizer), generated up to
        and including the first of ``sampling.stop``."""
        prompts = [chat_ids(self.tokenizer, msgs) for msgs in messages]
        out: list[str | None] = []
        with self._ctx():
            for i in range(0, len(prompts), self.batch_size):
                out += [c.text for c in self._policy.generate(prompts[i : i + self.batch_size], sampling)]
        self.stats["requests"] += len(prompts)
        return out

    def policy(self):
        """The teacher as an acting Policy (ovd ``mode=replace``)."""
        if self._disable_adapter:
            raise NotImplementedError("the self teacher does not act; use a separate teacher model")
        return self._policy
