"""Pure advantage functions: group (GRPO) and per-turn advantages. Names carry shapes.

``P`` questions, ``G`` samples per question; ``..._G_T`` is one group's ragged per-sample lists
of per-agent-token values. Identities (METHODS.md, last section), tested in
``tests/distill/test_advantages.py``: zero mean per group; 0, not huge, when a group's rewards
are all equal or the group has one sample.
"""
from __future__ import annotations

from typing import Sequence

import torch


def tied_groups(rewards_P_G: torch.Tensor) -> torch.Tensor:
    """``[P, 1]`` True where every reward of the group is equal (groups of one included). Exact
    equality, not ``std == 0``: the float mean of equal values can miss them by an ulp."""
    return (rewards_P_G == rewards_P_G[..., :1]).all(dim=-1, keepdim=True)


def group_advantages(rewards_P_G: torch.Tensor, eps: float = 1e-6, scale: bool = True) -> torch.Tensor:
    """GRPO advantages (METHODS.md, grpo): ``(r - mean_group(r)) / (std_group(r) + eps)``.

    ``std`` is the population std. A tied group (all rewards equal, or one sample) gets exactly 0.
    ``scale=False`` is Dr.GRPO's mean-centring only. Zero mean per group either way.
    """
    centred = rewards_P_G - rewards_P_G.mean(dim=-1, keepdim=True)
    if scale:
        centred = centred / (rewards_P_G.std(dim=-1, unbiased=False, keepdim=True) + eps)
    return torch.where(tied_groups(rewards_P_G), torch.zeros_like(centred), centred)


def turn_advantages(
    token_rewards_G_T: Sequence[Sequence[float]],
    rewards_G: Sequence[float],
    scale: bool = True,
    eps: float = 1e-6,
) -> list[list[float]]:
    """Per-token advantages of one group from per-token rewards (per-turn scores repeated over
    each turn's tokens): ``(x_t - mean(r)) / (std(r) + eps)`` with the mean and population std of
    the group's trajectory rewards ``r`` (the baseline GRPO would use for the whole trajectory).

    Choice: when ``std(r)`` is 0 (tied rewards, or one sample), or below 1e-9 of the largest
    ``|r|`` (rewards equal up to float rounding), the scaled advantage is 0: the turn deviations
    would otherwise be divided by ``eps`` (turn scores [3, 9] and [9, 3], both
    averaging 6, gave about +-1.7e5 after ovd's reward mix). ``scale=False`` centres only
    (``x_t - mean(r)``), except that a group of one, having no baseline, gets 0 too.
    """
    if len(token_rewards_G_T) != len(rewards_G):
        raise ValueError(f"{len(token_rewards_G_T)} token-reward lists for {len(rewards_G)} rewards")
    if not rewards_G:
        return []
    r = torch.tensor([list(rewards_G)], dtype=torch.float64)
    tied = bool(tied_groups(r))
    std = float(r.std(unbiased=False))
    # a near-tie counts as a tie: the same turn scores in another order average to rewards an ulp
    # apart, whose std (~1e-17) would divide the turn deviations as eps does
    near_tied = std <= 1e-9 * max(1.0, float(r.abs().max()))  # exact ties included
    if len(rewards_G) == 1 or (scale and near_tied):
        return [[0.0] * len(xs) for xs in token_rewards_G_T]
    mean = float(r[0, 0]) if tied else float(r.mean())  # the exact common value, no rounding
    den = std + eps if scale else 1.0
    return [[(float(x) - mean) / den for x in xs] for xs in token_rewards_G_T]


def sample_advantages(
    rewards: Sequence[float | None],
    num_tokens: Sequence[int],
    group_size: int,
    scale: bool = True,
    token_rewards: Sequence[Sequence[float]] | None = None,
    weight: float = 1.0,
) -> list[list[float] | None]:
    """Per trajectory, the advantage of each of its ``num_tokens[i]`` agent tokens, times
    ``weight``; ``None`` for a dropped trajectory (reward ``None``).

    Trajectories are question-major: ``group_size`` consecutive ones share a question. Each
    group's kept trajectories get :func:`group_advantages` of their rewards, the same for every
    token; with ``token_rewards`` (per-turn rewards), :func:`turn_advantages` against the same
    group statistics."""
    out: list[list[float] | None] = [None] * len(rewards)
    for g in range(0, len(rewards), group_size):
        idx = [i for i in range(g, min(g + group_size, len(rewards))) if rewards[i] is not None]
        if not idx:
            continue
        r = [float(rewards[i]) for i in idx]
        if token_rewards is not None:
            per = turn_advantages([token_rewards[i] for i in idx], r, scale=scale)
        else:
            adv = group_advantages(torch.tensor([r], dtype=torch.float64), scale=scale)[0].tolist()
            per = [[a] * num_tokens[i] for a, i in zip(adv, idx)]
        for i, xs in zip(idx, per):
            out[i] = [x * weight for x in xs]
    return out
