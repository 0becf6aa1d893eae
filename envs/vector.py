"""``gym.make_vec("WebQA-v0", num_envs=N)``: N WebQA episodes with one batched retrieval per step.

Each ``step(actions)`` parses the N actions, sends every search query of this step to the
retriever in one ``search(queries, k)`` call (one BM25 batch, or one HTTP request), then lets
each sub-env render its own observation. Results equal N single envs stepped one by one.

Autoreset follows Gymnasium's default ``NEXT_STEP`` mode: after a sub-env ends, its next
``step`` resets it (the action given for it is ignored) and returns the new prompt.
Observations are tuples of strings; infos use Gymnasium's ``key`` / ``_key`` mask layout.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from corpora.recording import ReplayMiss
from envs.webqa import WebQAEnv


def batched_search(envs: Sequence, parsed: Sequence) -> dict[int, list]:
    """One ``search`` call per (retriever, k) for every search action among ``parsed``."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(parsed):
        if p is not None and p.kind == "search":
            groups.setdefault((id(envs[i].retriever), envs[i].top_k), []).append(i)
    hits: dict[int, list] = {}
    for (_, k), idx in groups.items():
        retriever = envs[idx[0]].retriever
        try:
            rows = retriever.search([parsed[i].arg for i in idx], k=k)
        except ReplayMiss:  # a replay that lacks some of them: each query on its own, misses marked
            rows = []
            for i in idx:
                try:
                    rows.append(retriever.search([parsed[i].arg], k=k)[0])
                except ReplayMiss as exc:
                    rows.append(exc)
        for i, h in zip(idx, rows):
            hits[i] = h
    return hits


def step_envs(envs: Sequence, actions: Sequence[str]) -> list[tuple]:
    """Step several envs at once, each through its own wrappers. WebQA-style envs (``parse`` and
    ``prefetch``) share one batched retrieval, handed to each before its step; any other
    Gymnasium env is simply stepped."""
    base = [getattr(e, "unwrapped", e) for e in envs]
    parsed = [b.parse(a) if hasattr(b, "parse") and hasattr(b, "prefetch") else None for b, a in zip(base, actions)]
    for i, hits in batched_search(base, parsed).items():
        if not isinstance(hits, ReplayMiss):  # a miss: the env's own step reports it
            base[i].prefetch(parsed[i].arg, hits)
    return [env.step(a) for env, a in zip(envs, actions)]


class WebQAVectorEnv(VectorEnv):
    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, max_episode_steps: int | None = None, **kwargs: Any):
        if num_envs < 1:
            raise ValueError("num_envs must be >= 1")
        self.num_envs = num_envs
        self.envs = [WebQAEnv(**kwargs) for _ in range(num_envs)]
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._needs_reset = np.zeros(num_envs, dtype=bool)

    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict | None = None):
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} envs")
        obs, infos = [], {}
        for i, (env, s) in enumerate(zip(self.envs, seeds)):
            o, info = env.reset(seed=s, options=options)
            obs.append(o)
            infos = self._add_info(infos, info, i)
        self._needs_reset[:] = False
        return tuple(obs), infos

    def step(self, actions: Sequence[str]):
        if len(actions) != self.num_envs:
            raise ValueError(f"got {len(actions)} actions for {self.num_envs} envs")
        parsed = [None if self._needs_reset[i] else env.parse(a) for i, (env, a) in enumerate(zip(self.envs, actions))]
        hits_by_env = batched_search(self.envs, parsed)
        obs, infos = [], {}
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terms = np.zeros(self.num_envs, dtype=bool)
        truncs = np.zeros(self.num_envs, dtype=bool)
        for i, env in enumerate(self.envs):
            if parsed[i] is None:
                o, info = env.reset()
                self._needs_reset[i] = False
            else:
                got = hits_by_env.get(i)
                miss = str(got) if isinstance(got, ReplayMiss) else ""
                o, rewards[i], terms[i], truncs[i], info = env.apply(parsed[i], None if miss else got, actions[i], miss=miss)
                self._needs_reset[i] = terms[i] or truncs[i]
            obs.append(o)
            infos = self._add_info(infos, info, i)
        return tuple(obs), rewards, terms, truncs, infos

    def privileged(self) -> list[dict]:
        return [env.privileged() for env in self.envs]

    def close_extras(self, **kwargs: Any) -> None:
        self.envs = []
