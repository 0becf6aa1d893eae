"""The one multi-turn rollout loop: N questions x G samples, token-in token-out.

Each round: the policy's turn scheduler returns the episodes whose turn just ended, one batched
retrieval serves every search among them (``envs.vector.step_envs``), then each episode appends

* the generated ids exactly as generated (``loss_mask`` 1, with their sampling log-probs), and
* the observation text tokenised on its own (``loss_mask`` 0, log-prob 0),

and is submitted for its next turn. The history is never decoded and re-encoded, so
``prompt_ids + completion_ids`` is exactly the sequence the policy conditioned on. Budgets are
in tokens: ``max_tokens_per_turn`` caps one generation, ``max_total_tokens`` caps the completion
(agent + observation tokens); when it is hit the episode stops with
``truncation="context_budget"`` (the last observation is cut to fit). The prompt (with the
question) is never truncated.

Schedules (``schedule=``): ``"lockstep"`` runs one batched ``policy.generate`` per turn over all
live episodes (every backend: vLLM, HTTP, scripted); ``"continuous"`` lets an episode whose turn
ends rejoin decoding as soon as its observation is in, without waiting for the turn's longest
row (the transformers policy; on CPU a decode step costs about the same for 3 rows as for 8, so
lockstep turns waste most of their steps); ``"auto"`` (default) takes continuous where the policy
offers it. ``batch_size`` caps the episodes under way at once; a finished episode's place goes
to the next one (default: all at once). ``on_episode`` is called with each trajectory as it
finishes (the eval appends it to its results file there).

Works with any Gymnasium env whose ``reset`` returns a text prompt and whose ``step`` takes
the action text and returns the new observation text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import gymnasium as gym

from agents.policy import Lockstep, Policy, SamplingParams
from envs.vector import step_envs


# Who wrote each completion token (``Trajectory.sources``): the env (observations), the policy
# that was rolled out, or a teacher that took over (ovd; a completion with extra["source"] ==
# "teacher"). ``loss_mask`` is 1 on both kinds of agent tokens.
SOURCE_ENV, SOURCE_STUDENT, SOURCE_TEACHER = 0, 1, 2


@dataclass
class Trajectory:
    question_id: str
    question: str
    sample_index: int  # 0..G-1 within its group
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)  # per completion token: SOURCE_ENV / _STUDENT / _TEACHER
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
    batch_size: int | None = None,
    schedule: str = "auto",
    on_episode: Callable[[Trajectory], None] | None = None,
) -> list[Trajectory]:
    """Roll out ``len(reset_options) * group_size`` episodes; returns them question-major.

    ``reset_options[i]`` is passed to ``env.reset(options=...)`` (e.g. ``{"question_id": ...}``
    or ``{"example": {...}}``); sample g of question i is at index ``i * group_size + g``.
    The loop is here; what one episode does at each step is :class:`_Episodes`.
    """
    if schedule not in ("auto", "lockstep", "continuous"):
        raise ValueError(f"schedule must be auto, lockstep or continuous, not {schedule!r}")
    n = len(reset_options) * group_size
    slots = n if not batch_size else max(1, int(batch_size))
    clear = getattr(policy, "clear_cache", None)  # a policy may keep KV caches between turns
    if clear:
        clear()
    eps = _Episodes(policy, _scheduler(policy, sampling, schedule), make_env, reset_options, group_size, seed,
                    max_tokens_per_turn, max_total_tokens, max_turns, with_privileged)
    queue = list(range(n))[::-1]
    active: set[int] = set()
    finished = 0
    while queue or active:
        while queue and len(active) < slots:
            j = queue.pop()
            active.add(j)
            eps.start(j)
        ended = eps.sched.advance()
        for j, c in ended:
            eps.append_turn(j, c)
        results = step_envs([eps.envs[j] for j, _ in ended], [eps.trajs[j].actions[-1] for j, _ in ended])
        for (j, _), (obs, reward, term, trunc, info) in zip(ended, results):
            if not eps.observe(j, obs, reward, term, trunc, info):
                continue  # submitted for its next turn
            active.discard(j)
            finished += 1
            if on_episode:
                on_episode(eps.trajs[j])
            if progress:
                progress(finished, n)
    if clear:
        clear()
    return eps.trajs


def _scheduler(policy: Policy, sampling: SamplingParams, schedule: str):
    """The policy's continuous turn scheduler (unless ``schedule="lockstep"``), else lockstep."""
    sched = None
    if schedule != "lockstep" and hasattr(policy, "turn_scheduler"):
        sched = policy.turn_scheduler(sampling)
    if sched is None:
        if schedule == "continuous":
            raise ValueError(f"{type(policy).__name__} has no continuous schedule (use schedule=lockstep or auto)")
        sched = Lockstep(policy, sampling)
    return sched


class _Episodes:
    """The episodes of one ``rollout`` call (index j): their envs, trajectories and scheduler
    contexts, and the steps of one episode: start, append a generated turn, append the env's
    observation, submit the next turn or end."""

    def __init__(self, policy: Policy, sched, make_env: Callable[[], gym.Env], reset_options: Sequence[dict],
                 group_size: int, seed: int | None, max_tokens_per_turn: int, max_total_tokens: int,
                 max_turns: int | None, with_privileged: bool):
        self.policy, self.sched, self.make_env = policy, sched, make_env
        self.reset_options, self.group_size, self.seed = reset_options, group_size, seed
        self.max_tokens_per_turn, self.max_total_tokens = max_tokens_per_turn, max_total_tokens
        self.turn_cap, self.with_privileged = max_turns, with_privileged
        self.envs: dict[int, gym.Env] = {}
        self.trajs: list[Trajectory | None] = [None] * (len(reset_options) * group_size)
        self.contexts: dict[int, dict] = {}
        self.t0 = time.perf_counter()

    def submit(self, j: int) -> None:
        tr = self.trajs[j]
        room = self.max_total_tokens - len(tr.completion_ids)
        self.sched.submit(j, tr.prompt_ids + tr.completion_ids, max(1, min(self.max_tokens_per_turn, room)),
                          self.contexts[j])

    def start(self, j: int) -> None:
        env = self.envs[j] = self.make_env()
        opts = self.reset_options[j // self.group_size]
        prompt, info = env.reset(seed=None if self.seed is None else self.seed + j, options=opts)
        base = env.unwrapped
        if self.turn_cap is None:
            self.turn_cap = getattr(base, "max_turns", None) or 10**9
        tools = base.tool_schemas() if getattr(base, "protocol", "tags") == "tool_call" else None
        ids = self.policy.prompt_ids(prompt, tools=tools)
        qid = str(info.get("question_id", opts.get("question_id", j // self.group_size)))
        tr = self.trajs[j] = Trajectory(qid, str(info.get("question", "")), j % self.group_size, list(ids))
        tr.info["prompt_text"] = prompt
        if tools is not None:
            tr.info["tools"] = tools  # the tool schemas in the prompt (a teacher re-prompting needs them too)
        tr.info["max_turns"] = info.get("max_turns", getattr(base, "max_turns", None))  # the env's turn limit
        tr.info["turn_spans"] = []  # [start, end) of each turn's generated ids in completion_ids
        # actions/observations: the episode's history so far (live lists; a chat teacher renders it)
        ctx = self.contexts[j] = {"episode": j, "prompt": prompt, "info": info, "observation": prompt,
                                  "actions": tr.actions, "observations": tr.observations}
        if self.with_privileged and hasattr(base, "privileged"):
            ctx["privileged"] = tr.info["privileged"] = base.privileged()
        self.submit(j)

    def append_turn(self, j: int, c) -> None:
        """The generated ids of a finished turn, exactly as generated (cut to the token budget)."""
        tr = self.trajs[j]
        room = self.max_total_tokens - len(tr.completion_ids)
        ids, lps = c.token_ids[:room], c.logprobs[:room]
        tr.info["turn_spans"].append([len(tr.completion_ids), len(tr.completion_ids) + len(ids)])
        tr.completion_ids += ids
        tr.loss_mask += [1] * len(ids)
        per_token = c.extra.get("sources")  # a turn written partly by the student, partly by a teacher (ovd)
        if per_token is not None:
            tr.sources += list(per_token[: len(ids)])
        else:
            tr.sources += [SOURCE_TEACHER if c.extra.get("source") == "teacher" else SOURCE_STUDENT] * len(ids)
        tr.logprobs += lps
        tr.actions.append(c.text if len(ids) == len(c.token_ids) else self.policy.decode(ids))

    def observe(self, j: int, obs: str, reward: float, term: bool, trunc: bool, info: dict) -> bool:
        """Append the env's answer to episode j's turn; submit its next turn, or end it (True)."""
        tr = self.trajs[j]
        tr.observations.append(obs)
        tr.invalid_actions = int(info.get("invalid_actions", tr.invalid_actions))
        done = term or trunc
        if not done and len(tr.completion_ids) >= self.max_total_tokens:
            done, tr.truncation = True, "context_budget"
        if obs and not (term or tr.truncation):
            done = self._append_observation(tr, obs) or done
        self.contexts[j]["observation"] = obs
        if term or trunc:
            tr.terminated = bool(term)
            tr.truncation = tr.truncation or ("max_turns" if trunc else None)
            _finish(tr, reward, info)
        elif done:
            _finish(tr, 0.0, info)
        elif len(tr.actions) >= self.turn_cap:  # turn cap of the loop itself (env without its own max_turns)
            tr.truncation = "max_turns"
            _finish(tr, 0.0, {})
        else:
            self.submit(j)
            return False
        self.sched.release(j)
        self.envs.pop(j).close()
        tr.text = self.policy.decode(tr.prompt_ids + tr.completion_ids)
        tr.info["rollout_seconds"] = round(time.perf_counter() - self.t0, 3)
        return True

    def _append_observation(self, tr: Trajectory, obs: str) -> bool:
        """The observation tokenised on its own (loss_mask 0); True when it had to be cut to the budget."""
        obs_ids = self.policy.encode(obs)
        room = self.max_total_tokens - len(tr.completion_ids)
        cut = len(obs_ids) > room
        if cut:
            obs_ids, tr.truncation = obs_ids[:room], "context_budget"
        tr.completion_ids += obs_ids
        tr.loss_mask += [0] * len(obs_ids)
        tr.sources += [SOURCE_ENV] * len(obs_ids)
        tr.logprobs += [0.0] * len(obs_ids)
        return cut


def _finish(tr: Trajectory, reward: float, info: dict) -> None:
    tr.reward = float(reward)
    tr.answer = info.get("answer")
    tr.em = float(info.get("em", 0.0) or 0.0)
    tr.f1 = float(info.get("f1", 0.0) or 0.0)
    tr.cover_em = float(info.get("cover_em", 0.0) or 0.0)
    tr.info.update(info)
