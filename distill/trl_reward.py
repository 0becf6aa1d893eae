"""The verbal teacher score (``distill/verbal.py``) as a TRL reward function.

``verbal_reward(teacher)`` returns a function for ``GRPOTrainer(reward_funcs=[...])`` used with
``environment_factory=envs.trl.WebQAToolEnv``: it renders each finished episode (question, gold
answers when ``cfg.show_gold``, the tool calls and their results, the final answer) exactly as
the project's grader does, asks the teacher, and returns the score divided by 9 (0 to 1). A
reply that cannot be parsed gives ``None``, which TRL leaves out of that rollout's reward (never
a silent 0). The teacher's request counts are logged through TRL's ``log_metric``.
It lives in ``distill`` (not ``envs``) because the grader and teachers belong to this layer.
"""
from __future__ import annotations

from typing import Callable

from distill.verbal import GraderConfig, grade, render
from envs.trl import finish_episodes


def verbal_reward(teacher, cfg: GraderConfig = GraderConfig(), seed: int = 0) -> Callable[..., list[float | None]]:
    """A TRL reward function scoring each WebQA episode with ``teacher`` (any object with
    ``score`` and optionally ``score_distribution``, e.g. ``distill.teachers`` backends)."""

    def verbal_reward(completions=None, environments=None, log_metric=None, **kwargs) -> list[float | None]:
        finish_episodes(environments, completions)
        messages = [render(env.question, env.gold_answers, env.actions, env.observations, env.final_answer, cfg=cfg)
                    for env in environments]
        scores, counts = grade(teacher, messages, cfg, seed=seed)
        if log_metric is not None:
            for name, value in counts.items():
                log_metric(f"verbal/{name}", float(value))
        return [None if s is None else s / 9.0 for s in scores]

    return verbal_reward
