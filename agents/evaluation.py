"""The one evaluation: greedy episodes through the one rollout loop, one record per episode, one
summary. ``benchmarks.eval`` (the CLI over the QA suite), the trainer's held-out evaluation and
``benchmarks.learning`` all call :func:`evaluate` with the defaults below, so their tables are
comparable. The env owns ``max_turns`` (``WebQA-v0``: 4).
"""
from __future__ import annotations

from typing import Callable, Sequence

# token budgets of an evaluation episode (Search-R1: 500 tokens per turn)
MAX_TOKENS_PER_TURN = 500
MAX_TOTAL_TOKENS = 4096
BATCH_SIZE = 8


def episode_record(tr, dataset: str) -> dict:
    """The JSON record of one finished episode (eval JSONL and training trajectory logs)."""
    info = tr.info
    return {
        "question_id": tr.question_id,
        "sample": tr.sample_index,
        "dataset": dataset,
        "question": tr.question,
        "gold_answers": info.get("gold_answers"),
        "actions": tr.actions,
        "observations": tr.observations,
        "retrieved_ids": info.get("all_retrieved_ids", []),
        "answer": tr.answer,
        "reward": tr.reward,
        "em": tr.em,
        "f1": tr.f1,
        "cover_em": tr.cover_em,
        "turns": len(tr.actions),
        "searches": info.get("n_searches", 0),
        "invalid_actions": tr.invalid_actions,
        "truncation": tr.truncation,
        "supporting_title_recall": info.get("supporting_title_recall"),
        "prompt_tokens": len(tr.prompt_ids),
        "completion_tokens": len(tr.completion_ids),
        "agent_tokens": tr.num_agent_tokens,
        **({"grader": info["grader"]} if "grader" in info else {}),  # Math-v0: how the answer was judged
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021, Codex paper, Eq. 1): the chance that at
    least one of k samples drawn without replacement from n, c of them correct, is correct:
    1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per question, got {n}")
    if n - c < k:
        return 1.0
    out = 1.0
    for i in range(n - c + 1, n + 1):
        out *= 1.0 - k / i
    return 1.0 - out


def sampled_summary(recs: Sequence[dict]) -> dict:
    """Per-question statistics of several samples per question: mean@n accuracy (= ``em``
    over all samples), unbiased pass@k for k = 1, 2, 4, ... <= n (questions with fewer samples
    than the others, from a stopped run, count with the samples they have)."""
    by_q: dict[str, list[float]] = {}
    for r in recs:
        by_q.setdefault(r["question_id"], []).append(float(r["em"] or 0.0))
    n = min(len(v) for v in by_q.values())
    out = {"questions": len(by_q), "samples_per_question": n}
    k = 1
    while k <= n:
        out[f"pass@{k}"] = sum(pass_at_k(len(v), int(sum(v)), k) for v in by_q.values()) / len(by_q)
        k *= 2
    return out


def summarise(recs: Sequence[dict]) -> dict:
    n = len(recs)
    if not n:
        return {"episodes": 0}
    mean = lambda k: sum(float(r[k] or 0) for r in recs) / n  # noqa: E731
    actions = sum(r["turns"] for r in recs)
    return {
        "episodes": n,
        "em": mean("em"),
        "f1": mean("f1"),
        "cover_em": mean("cover_em"),
        "avg_turns": mean("turns"),
        "avg_searches": mean("searches"),
        "invalid_action_rate": sum(r["invalid_actions"] for r in recs) / max(actions, 1),
        "answered": sum(r["answer"] is not None for r in recs) / n,
        "avg_agent_tokens": mean("agent_tokens"),
        "extraction_failures": sum(r["answer"] is None for r in recs) / n,
        **({"grader_fallback": sum(r.get("grader") == "fallback" for r in recs),
            "grader_timeouts": sum(r.get("grader") == "timeout" for r in recs)} if any("grader" in r for r in recs) else {}),
        **(sampled_summary(recs) if len({r["question_id"] for r in recs}) < n else {}),
    }


def evaluate(policy, make_env: Callable, question_ids: Sequence[str], dataset: str = "heldout", *, sampling=None,
             max_tokens_per_turn: int = MAX_TOKENS_PER_TURN, max_total_tokens: int = MAX_TOTAL_TOKENS,
             batch_size: int = BATCH_SIZE, schedule: str = "auto", with_privileged: bool = False, seed: int | None = None,
             on_episode: Callable | None = None, progress: Callable[[int, int], None] | None = None,
             samples: int = 1) -> tuple[dict, list[dict]]:
    """Greedy (unless ``sampling`` says otherwise) episodes on ``question_ids``, ``samples`` per
    question; returns (summary, records in question order). ``on_episode(trajectory)`` sees each
    as it ends."""
    from agents.policy import SamplingParams
    from agents.rollout import rollout

    if not question_ids:
        return {"episodes": 0}, []
    trajs = rollout(policy, make_env, [{"question_id": q} for q in question_ids], samples, sampling or SamplingParams(temperature=0.0),
                    max_tokens_per_turn, max_total_tokens, seed=seed, with_privileged=with_privileged, batch_size=batch_size,
                    schedule=schedule, on_episode=on_episode, progress=progress)
    recs = [episode_record(t, dataset) for t in trajs]
    return summarise(recs), recs
