"""The one multi-turn rollout loop: N questions x G samples in lockstep, token-in token-out.

Per turn: one batched ``policy.generate`` for every live episode, one batched retrieval for
every search among them (``envs.vector.step_envs``), then each episode appends

* the generated ids exactly as generated (``loss_mask`` 1, with their sampling log-probs), and
* the observation text tokenised on its own (``loss_mask`` 0, log-prob 0).

The history is never decoded and re-encoded, so ``prompt_ids + completion_ids`` is exactly
the sequence the policy conditioned on. Budgets are in tokens: ``max_tokens_per_turn`` caps
one generation, ``max_total_tokens`` caps the completion (agent + observation tokens); when it
is hit the episode stops with ``truncation="context_budget"`` (the last observation is cut to
fit). The prompt (with the question) is never truncated.

Works with any Gymnasium env whose ``reset`` returns a text prompt and whose ``step`` takes
the action text and returns the new observation text.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import gymnasium as gym

from agents.policy import Policy, SamplingParams
from envs.vector import step_envs


@dataclass
class Trajectory:
    question_id: str
    question: str
    sample_index: int  # 0..G-1 within its group
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    reward: float = 0.0
    answer: str | None = None
    em: float = 0.0
    f1: float = 0.0
    cover_em: float = 0.0
    invalid_actions: int = 0
    terminated: bool = False
    truncation: str | None = None  # None, "max_turns", "context_budget", "turn_tokens"
    info: dict[str, Any] = field(default_factory=dict)
    text: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def num_agent_tokens(self) -> int:
        return sum(self.loss_mask)

    def to_record(self) -> dict:
        """A JSON-able record (the eval/trajectory JSONL format)."""
        d = asdict(self)
        d["num_tokens"] = self.num_tokens
        d["num_agent_tokens"] = self.num_agent_tokens
        d["info"] = {k: v for k, v in self.info.items() if isinstance(v, (str, int, float, bool, list, type(None)))}
        return d


def rollout(
    policy: Policy,
    make_env: Callable[[], gym.Env],
    reset_options: Sequence[dict],
    group_size: int = 1,
    sampling: SamplingParams = SamplingParams(),
    max_tokens_per_turn: int = 500,
    max_total_tokens: int = 4096,
    max_turns: int | None = None,
    seed: int | None = None,
    with_privileged: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[Trajectory]:
    """Roll out ``len(reset_options) * group_size`` episodes; returns them question-major.

    ``reset_options[i]`` is passed to ``env.reset(options=...)`` (e.g. ``{"question_id": ...}``
    or ``{"example": {...}}``); sample g of question i is at index ``i * group_size + g``.
    """
    n = len(reset_options) * group_size
    clear = getattr(policy, "clear_cache", None)  # a policy may keep KV caches between turns
    if clear:
        clear()
    envs = [make_env() for _ in range(n)]
    trajs: list[Trajectory] = []
    contexts: list[dict] = []
    for j, env in enumerate(envs):
        opts = reset_options[j // group_size]
        prompt, info = env.reset(seed=None if seed is None else seed + j, options=opts)
        base = env.unwrapped
        tools = base.tool_schemas() if getattr(base, "protocol", "tags") == "tool_call" else None
        ids = policy.prompt_ids(prompt, tools=tools)
        qid = str(info.get("question_id", opts.get("question_id", j // group_size)))
        tr = Trajectory(qid, str(info.get("question", "")), j % group_size, list(ids))
        tr.info["prompt_text"] = prompt
        tr.info["turn_spans"] = []  # [start, end) of each turn's generated ids in completion_ids
        trajs.append(tr)
        ctx = {"episode": j, "prompt": prompt, "info": info, "observation": prompt}
        if with_privileged and hasattr(base, "privileged"):
            ctx["privileged"] = tr.info["privileged"] = base.privileged()
        contexts.append(ctx)
    live = list(range(n))
    turn_cap = max_turns or getattr(envs[0].unwrapped, "max_turns", None) or 10**9
    t0 = time.perf_counter()
    turn = 0
    while live and turn < turn_cap:
        turn += 1
        budget = {j: max_total_tokens - len(trajs[j].completion_ids) for j in live}
        sp = SamplingParams(**{**asdict(sampling), "max_new_tokens": max(1, min(max_tokens_per_turn, max(budget.values())))})
        if sampling.seed is not None:
            sp = SamplingParams(**{**asdict(sp), "seed": sampling.seed + turn})
        outs = policy.generate(
            [trajs[j].prompt_ids + trajs[j].completion_ids for j in live], sp, [contexts[j] for j in live]
        )
        for j, c in zip(live, outs):
            ids, lps = c.token_ids[: budget[j]], c.logprobs[: budget[j]]
            tr = trajs[j]
            tr.info["turn_spans"].append([len(tr.completion_ids), len(tr.completion_ids) + len(ids)])
            tr.completion_ids += ids
            tr.loss_mask += [1] * len(ids)
            tr.logprobs += lps
            tr.actions.append(c.text if len(ids) == len(c.token_ids) else policy.decode(ids))
        results = step_envs([envs[j] for j in live], [trajs[j].actions[-1] for j in live])
        still = []
        for j, (obs, reward, term, trunc, info) in zip(live, results):
            tr = trajs[j]
            tr.observations.append(obs)
            tr.invalid_actions = int(info.get("invalid_actions", tr.invalid_actions))
            done = term or trunc
            if not done and len(tr.completion_ids) >= max_total_tokens:
                done, tr.truncation = True, "context_budget"
            if obs and not (term or tr.truncation):
                obs_ids = policy.encode(obs)
                room = max_total_tokens - len(tr.completion_ids)
                if len(obs_ids) > room:
                    obs_ids, done, tr.truncation = obs_ids[:room], True, "context_budget"
                tr.completion_ids += obs_ids
                tr.loss_mask += [0] * len(obs_ids)
                tr.logprobs += [0.0] * len(obs_ids)
            contexts[j]["observation"] = obs
            if term or trunc:
                tr.terminated = bool(term)
                tr.truncation = tr.truncation or ("max_turns" if trunc else None)
                _finish(tr, reward, info)
            elif done:
                _finish(tr, 0.0, info)
            else:
                still.append(j)
        live = still
        if progress:
            progress(n - len(live), n)
    for j in live:  # turn cap of the loop itself (env without its own max_turns)
        trajs[j].truncation = "max_turns"
        _finish(trajs[j], 0.0, {})
    if clear:
        clear()
    for tr in trajs:
        tr.text = policy.decode(tr.prompt_ids + tr.completion_ids)
        tr.info["rollout_seconds"] = round(time.perf_counter() - t0, 3)
    return trajs


def _finish(tr: Trajectory, reward: float, info: dict) -> None:
    tr.reward = float(reward)
    tr.answer = info.get("answer")
    tr.em = float(info.get("em", 0.0) or 0.0)
    tr.f1 = float(info.get("f1", 0.0) or 0.0)
    tr.cover_em = float(info.get("cover_em", 0.0) or 0.0)
    tr.info.update(info)
