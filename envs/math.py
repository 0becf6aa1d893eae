"""Math-v0: solve a math word problem (GSM8K, MATH-500) in one answer action.

## Description
``reset`` draws a problem (with ``self.np_random``) and returns the prompt. One ``step`` takes
the agent's whole solution and ends the episode: the final answer is extracted from it and
graded against the reference answer. The observation is empty. This is the math setting of the
OVD, OPSD, OPRD and entropy-aware OPD papers: one sampled solution per episode.

## Action format
Free text (chain of thought allowed) with the final answer in ``\\boxed{...}`` (the last one
counts). ``<answer>...</answer>`` and GSM8K's ``#### n`` are also accepted (``envs/math_grading``
has the order). A reply with none of them gets reward 0 and ``info["extracted"] = False``;
nothing raises.

## Rewards
1.0 when the extracted answer equals a reference answer under ``math-verify``'s symbolic check
(numbers, fractions, LaTeX, tuples, sets, intervals), else 0.0. ``info["grader"]`` says how it
was decided (``math_verify``, ``fallback`` where the library could not parse one side,
``timeout``, ``too_long``, ``none`` with no answer). ``info`` also carries ``em`` (= the
reward), ``f1`` (the same value: one answer is right or wrong), ``answer``, ``gold_answers``.

## Arguments
``dataset`` (a QA name such as ``gsm8k``, ``gsm8k:train``, ``math500``, or a JSONL path; records
may carry ``solution``), ``prompt_template`` (with ``{question}``), ``limit``,
``grade_timeout`` (seconds per comparison), ``max_turns`` (1: the one answer).

## Version history
* v0: first release.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym

from envs.actions import MAX_ACTION_CHARS
from envs.math_grading import extract_answer, is_equivalent
from envs.questions import load_questions, pick_question
from envs.spaces import AnyText

# The usual convention of math RL (Qwen2.5-Math's chain-of-thought prompt)
MAX_OBS_CHARS = 32_000
MATH_PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


class MathEnv(gym.Env[str, str]):
    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, dataset: str = "gsm8k", prompt_template: str | None = None, limit: int | None = None,
                 grade_timeout: int = 5, max_turns: int = 1, render_mode: str | None = None):
        if max_turns != 1:
            raise ValueError(f"Math-v0 is one answer per episode: max_turns must be 1, got {max_turns}")
        if render_mode not in (None, "ansi"):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.dataset, self.limit, self.grade_timeout = dataset, limit, int(grade_timeout)
        self.max_turns, self.render_mode = 1, render_mode
        self.prompt_template = prompt_template or MATH_PROMPT
        self.observation_space = AnyText(MAX_OBS_CHARS)  # the prompt (reset); steps return ""
        self.action_space = AnyText(MAX_ACTION_CHARS)
        self._questions: list[dict] | None = None
        self._example: dict | None = None
        self._done = True
        self._transcript: list[str] = []

    @property
    def questions(self) -> list[dict]:
        if self._questions is None:
            self._questions = load_questions(self.dataset, self.limit)
        return self._questions

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_questions"] = None  # reloaded from the name/path
        return state

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        # an example of your own does not need the QA set loaded
        ex = pick_question([] if "example" in (options or {}) else self.questions, options, self.np_random, self.dataset)
        self._example, self._done = ex, False
        prompt = self.prompt_template.format(question=ex["question"].strip())
        self._transcript = [prompt]
        return prompt, {"question_id": ex["id"], "question": ex["question"], "dataset": ex.get("dataset", self.dataset),
                        "turn": 0, "max_turns": 1}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self._done:
            raise RuntimeError("step() called on a finished episode: call reset() first")
        text = action if isinstance(action, str) else ""
        self._transcript.append(text)
        self._done = True
        answer, source = extract_answer(text)
        gold = list(self._example["answers"])
        if answer is None:
            correct, how = False, "none"
        else:
            v = is_equivalent(answer, gold, self.grade_timeout)
            correct, how = v.correct, v.how
        reward = 1.0 if correct else 0.0
        info = {"turn": 1, "action": "answer", "answer": answer, "extracted": answer is not None, "answer_source": source,
                "grader": how, "em": reward, "f1": reward, "cover_em": reward, "gold_answers": gold,
                "question_id": self._example["id"], "invalid_actions": 0 if answer is not None else 1,
                "turns": 1, "end_reason": "answer" if answer is not None else "no_answer",
                "error": None if isinstance(action, str) else f"action must be a str, got {type(action).__name__}"}
        return "", reward, True, False, info

    def render(self) -> str | None:
        return "".join(self._transcript) if self.render_mode == "ansi" else None

    def privileged(self) -> dict:
        """The reference answer(s) and solution (opsd's privileged context; the ovd grader's gold)."""
        if self._example is None:
            raise RuntimeError("privileged() needs a problem: call reset() first")
        ex = self._example
        sol = ex.get("solution") or ""
        return {"question_id": ex["id"], "question": ex["question"], "answers": list(ex["answers"]), "solution": sol,
                "supporting_passages": []}

