"""The verbal grader: a teacher reads a (partial) trajectory and answers ``Score: <digit 0-9>``.

Used by ovd (acceptance test of each turn prefix, OVD Eq. 5), by ``benchmarks.eval
feedback=true`` (the same test at inference) and by ``benchmarks.grader`` (which measures how
well a grader configuration separates good trajectories from bad).

A grader configuration is a prompt (a row of ``PROMPTS``), whether the gold answer is shown,
and a read-out:

* ``expected``: S = sum_d d * P(d), the mean digit under the teacher's distribution over the ten
  score tokens right after ``Score:`` (OVD S3.2: a distribution over a verbal vocabulary of size
  10 gives the score). A local teacher reads it from one forward pass; an HTTP teacher from the
  top log-probs of the digit token of its chat reply. Where no distribution can be had (a
  chat-only endpoint) the parsed digit of the reply is used and counted (``score_fallback``).
* ``digit``: the parsed digit of the teacher's (greedy) reply.

Parsing takes the *last* ``Score: d`` of a reply (a reply that reasons first states its verdict
last). Unparseable replies are retried (an HTTP teacher samples again; a local one decodes
constrained to the digits), then counted and returned as ``None``: the caller drops that
trajectory, it is never scored 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

SYSTEM = "You are a strict grader of search agents. You reply with one line: Score: <digit>."

_ANCHORS = (
    "0 = no answer, or the actions are malformed or nonsense;\n"
    "3 = wrong answer, but the searches were relevant;\n"
    "6 = partly right (close answer, or right answer without using the evidence found);\n"
    "9 = correct answer, supported by the retrieved text, with few and well-aimed searches.\n"
)
_ANCHORS_PREFIX = (
    "0 = malformed or nonsense actions, or a search unrelated to the question;\n"
    "3 = relevant searches, but nothing found yet that leads to the answer;\n"
    "6 = on track: the retrieved text is about the right entities;\n"
    "9 = the retrieved text already contains the answer, or the agent answered correctly.\n"
)

# name -> (instructions for a finished trajectory, instructions for a turn prefix)
PROMPTS: dict[str, tuple[str, str]] = {
    # anchors on the whole process (the prompt ovd used before the grader benchmark)
    "rubric": (
        "Rate how well the agent did, on a scale from 0 to 9:\n" + _ANCHORS
        + "Use the digits in between for cases in between. Reply with exactly one line: Score: <digit>",
        "Rate how well the agent is doing so far, on a scale from 0 to 9:\n" + _ANCHORS
        + "Use the digits in between for cases in between. Reply with exactly one line: Score: <digit>",
    ),
    # first the final answer against the gold, then the process
    "answer_first": (
        "First compare the agent's final answer with the gold answer(s): if they mean the same thing "
        "the score is 7, 8 or 9 (9 when the searches were well aimed); if the answer is wrong or missing "
        "the score is 0 to 3 (3 when the searches were at least relevant). Reply with exactly one line: "
        "Score: <digit>",
        "The agent has not answered yet. Judge whether it is on track to find the gold answer, on a scale "
        "from 0 to 9:\n" + _ANCHORS_PREFIX + "Reply with exactly one line: Score: <digit>",
    ),
    # the final answer against the gold only (the trajectory's last turn); a prefix is judged as in
    # answer_first. Short prompts: the weak embedded teacher compares two strings better than it
    # judges a long transcript, and a forward pass over them is several times cheaper
    "answer_match": (
        "Does the agent's final answer mean the same as the gold answer(s)? Score 9 if it does, 5 if it "
        "is partly right, 0 if it is wrong or missing. Reply with exactly one line: Score: <digit>",
        "The agent has not answered yet. Judge whether it is on track to find the gold answer, on a scale "
        "from 0 to 9:\n" + _ANCHORS_PREFIX + "Reply with exactly one line: Score: <digit>",
    ),
}
# a partial solution of a one-turn env (Math-v0): ovd scores its step prefixes (OVD v2: keep the
# student's good prefix, resample the rest); the same instructions for every prompt row
SOLUTION_PREFIX = (
    "The agent has not finished its solution. Judge whether its reasoning so far is correct and on "
    "track to reach the gold answer, on a scale from 0 to 9:\n"
    "0 = wrong, nonsense or off-topic;\n"
    "3 = a plausible start, but with an error or no progress;\n"
    "6 = correct so far and heading towards the gold answer;\n"
    "9 = correct so far and the gold answer is as good as reached.\n"
    "Reply with exactly one line: Score: <digit>"
)
DEFAULT_PROMPT = "answer_match"  # measured best by benchmarks.grader (results/grader/summary.json)
# prompts whose finished-trajectory form shows only the question, gold and final answer
ANSWER_ONLY = frozenset({"answer_match"})

_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*([0-9])(?![0-9])", re.IGNORECASE)
_BARE = re.compile(r"\s*\**([0-9])\**\s*(?:/\s*9)?\s*[.!]?\s*")


@dataclass(frozen=True)
class GraderConfig:
    prompt: str = DEFAULT_PROMPT  # a row of PROMPTS
    show_gold: bool = True  # the teacher is privileged: it sees the gold answers
    readout: str = "expected"  # expected | digit
    retries: int = 2  # re-asks (sampling) for unparseable or failed replies
    obs_chars: int = 400  # characters of each observation shown

    def __post_init__(self):
        if self.prompt not in PROMPTS:
            raise ValueError(f"unknown grader prompt {self.prompt!r}; choose from {sorted(PROMPTS)}")
        if self.readout not in ("expected", "digit"):
            raise ValueError(f"grader readout must be 'expected' or 'digit', got {self.readout!r}")


def parse_score(reply: str | None) -> int | None:
    """The digit of the *last* ``Score: 7`` (also ``score=7``, ``**7**``) in ``reply``, or of a
    bare ``7`` / ``7/9`` reply; None when there is none."""
    if reply is None:
        return None
    found = _SCORE.findall(reply)
    if found:
        return int(found[-1])
    m = _BARE.fullmatch(reply)
    return int(m.group(1)) if m else None


def render(question: str, gold: Sequence[str] | None, actions: Sequence[str], observations: Sequence[str],
           answer: str | None, upto_turn: int | None = None, cfg: GraderConfig = GraderConfig()) -> list[dict]:
    """Chat messages asking the teacher to grade a trajectory (its first ``upto_turn`` turns if
    given and fewer than all, else the whole of it with its final answer)."""
    n = len(actions)
    partial = upto_turn is not None and upto_turn < n
    if partial:
        n = upto_turn
    lines = [f"Question: {question}"]
    if cfg.show_gold and gold:
        lines.append(f"Gold answer(s): {' | '.join(map(str, gold))}")
    if not partial and cfg.prompt in ANSWER_ONLY:
        lines += [f"Agent's final answer: {answer if answer is not None else '(none)'}", "", PROMPTS[cfg.prompt][0]]
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]
    lines += ["", f"The agent's first {n} turn(s):" if partial else "The agent's trajectory:"]
    for k in range(n):
        lines.append(f"[turn {k + 1}, agent] {actions[k].strip()}")
        if k < len(observations) and observations[k]:
            obs = observations[k].strip()
            cut = f"{obs[: cfg.obs_chars]}{' ...' if len(obs) > cfg.obs_chars else ''}"
            lines.append(f"[turn {k + 1}, environment] {cut}")
    if not partial:
        lines.append(f"Final answer: {answer if answer is not None else '(none)'}")
    full, prefix = PROMPTS[cfg.prompt]
    lines += ["", prefix if partial else full]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def render_solution_prefix(question: str, gold: Sequence[str] | None, partial: str, cfg: GraderConfig = GraderConfig()) -> list[dict]:
    """Chat messages asking the teacher to grade the first steps of a one-turn solution."""
    lines = [f"Question: {question}"]
    if cfg.show_gold and gold:
        lines.append(f"Gold answer(s): {' | '.join(map(str, gold))}")
    lines += ["", "The agent's solution so far:", partial.strip(), "", SOLUTION_PREFIX]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def gold_of(tr) -> list | None:
    return (tr.info.get("privileged") or {}).get("answers") or tr.info.get("gold_answers")


def render_trajectory(tr, upto_turn: int | None = None, cfg: GraderConfig = GraderConfig()) -> list[dict]:
    """``render`` of an ``agents.rollout.Trajectory`` (gold from its privileged info)."""
    return render(tr.question, gold_of(tr), tr.actions, tr.observations, tr.answer, upto_turn, cfg)


def expected_digit(probs: Sequence[float]) -> float:
    """S = sum_d d * P(d) over the ten digits (``probs`` renormalised)."""
    z = sum(probs)
    return sum(d * p for d, p in enumerate(probs)) / z


def grade(teacher, messages: Sequence[list[dict]], cfg: GraderConfig = GraderConfig(), seed: int = 0) -> tuple[list[float | None], dict]:
    """Scores (0-9, float) of each chat, and request counts.

    ``expected``: the teacher's ``score_distribution`` (a list of ten probabilities, or None
    where it could not give one) -> expected digit; the rest fall back to the parsed digit.
    ``digit``: the parsed digit, retried with sampling up to ``cfg.retries`` times."""
    messages = list(messages)
    scores: list[float | None] = [None] * len(messages)
    fallback = 0
    if cfg.readout == "expected" and messages and "score_distribution" in getattr(teacher, "capabilities", ()):
        for i, probs in enumerate(teacher.score_distribution(messages)):
            if probs is not None and sum(probs) > 0:
                scores[i] = expected_digit(probs)
    todo = [i for i, s in enumerate(scores) if s is None]
    if cfg.readout == "expected":
        fallback = len(todo)
    failed = unparseable = 0
    for attempt in range(cfg.retries + 1):
        if not todo:
            break
        replies = teacher.score([messages[i] for i in todo], sample=attempt > 0, seed=seed + attempt)
        for i, r in zip(todo, replies):
            failed += r is None
            s = parse_score(r)
            unparseable += r is not None and s is None
            scores[i] = None if s is None else float(s)
        todo = [i for i in todo if scores[i] is None]
    return scores, {"teacher_requests": len(messages), "teacher_failed": failed, "teacher_unparseable": unparseable,
                    "score_fallback": fallback}
