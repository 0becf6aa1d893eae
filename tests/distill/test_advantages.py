"""Identities of the pure advantage functions (METHODS.md, last section).

The per-turn path used to live inline in ``distill.train.build_samples``: it divided the
per-token deviations by ``std + 1e-6`` even when the group's std was 0, so turn scores [3, 9]
and [9, 3] (both averaging 6) gave advantages of about +-1.7e5 after ovd's mix (+-3e6 raw).
"""
import pytest
import torch

from distill import losses
from distill.advantages import group_advantages, turn_advantages


def test_group_advantages_zero_mean_unit_std_per_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.4, 0.9, 0.1], [0.3, 0.7, 0.7, 0.7]], dtype=torch.float64)
    a = group_advantages(r)
    assert torch.allclose(a.mean(-1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(a.std(-1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(group_advantages(r, scale=False).mean(-1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert losses.group_advantages is group_advantages  # the old import path still works


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 1 / 3])
def test_group_advantages_are_exactly_zero_when_rewards_are_equal(scale, value):
    r = torch.full((2, 3), value, dtype=torch.float64)  # 0.1 * 3 / 3 != 0.1 in floats: the std is not exactly 0
    assert torch.equal(group_advantages(r, scale=scale), torch.zeros_like(r))


@pytest.mark.parametrize("scale", [True, False])
def test_group_of_one_gets_zero_advantage(scale):
    r = torch.tensor([[0.7], [0.0]], dtype=torch.float64)
    assert torch.equal(group_advantages(r, scale=scale), torch.zeros_like(r))
    assert turn_advantages([[0.2, 0.9, 0.9]], [0.7], scale=scale) == [[0.0, 0.0, 0.0]]


def test_group_scale_false_is_centring_only():
    r = torch.tensor([[1.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    assert torch.allclose(group_advantages(r, scale=False), r - 0.5)


def test_turn_advantages_bounded_when_trajectory_rewards_tie():
    # turn scores [3, 9] and [9, 3] (one token per turn): both trajectories average 6, std 0
    tok = [[3.0, 9.0], [9.0, 3.0]]
    traj = [6.0, 6.0]
    assert turn_advantages(tok, traj, scale=True) == [[0.0, 0.0], [0.0, 0.0]]  # the old path: +-3e6
    assert turn_advantages(tok, traj, scale=False) == [[-3.0, 3.0], [3.0, -3.0]]  # centring only: bounded
    assert turn_advantages([[0.1] * 3, [0.1] * 2], [0.1, 0.1], scale=True) == [[0.0] * 3, [0.0] * 2]
    assert turn_advantages([[0.1] * 3, [0.1] * 2, [0.1]], [0.1] * 3, scale=False) == [[0.0] * 3, [0.0] * 2, [0.0]]


def test_turn_advantages_bounded_when_trajectory_rewards_tie_up_to_rounding():
    """Found in review: ovd's turn rewards w*R + (1-w)*S/9 with digit scores (1, 1, 4) and
    (1, 4, 1) average to rewards an ulp apart; exact-equality tie detection let their ~1e-17 std
    divide the turn deviations (advantages of about +-1e5)."""
    from distill.advantages import sample_advantages

    turns = [[0.5 * 0 + 0.5 * s / 9 for s in (1, 1, 4)], [0.5 * 0 + 0.5 * s / 9 for s in (1, 4, 1)]]
    traj = [sum(t) / 3 for t in turns]
    assert traj[0] != traj[1] and abs(traj[0] - traj[1]) < 1e-15  # the float case itself
    got = sample_advantages(traj, [3, 3], 2, True, token_rewards=turns)
    assert got == [[0.0] * 3, [0.0] * 3]
    # a real difference still gives the scaled turn advantages
    real = sample_advantages([0.1, 0.3], [2, 2], 2, True, token_rewards=[[0.0, 0.2], [0.2, 0.4]])
    assert max(abs(x) for a in real for x in a) == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize("scale", [True, False])
def test_turn_advantages_equal_group_advantages_when_every_token_carries_its_trajectory_reward(scale):
    traj = [0.2, 0.9, 0.4]
    lengths = [3, 1, 4]
    got = turn_advantages([[r] * n for r, n in zip(traj, lengths)], traj, scale=scale)
    want = group_advantages(torch.tensor([traj], dtype=torch.float64), scale=scale)[0].tolist()
    for g, w, n in zip(got, want, lengths):
        assert len(g) == n and g == pytest.approx([w] * n, abs=1e-12)
    assert sum(g[0] for g in got) == pytest.approx(0.0, abs=1e-12)  # zero mean per group


def test_turn_advantages_use_the_trajectory_reward_statistics():
    tok = [[0.0, 1.0], [1.0]]
    traj = [0.0, 1.0]  # mean 0.5, population std 0.5
    assert turn_advantages(tok, traj, scale=True, eps=0.0) == [[-1.0, 1.0], [1.0]]
    assert turn_advantages(tok, traj, scale=False) == [[-0.5, 0.5], [0.5]]
    assert turn_advantages([], []) == []
    with pytest.raises(ValueError):
        turn_advantages([[1.0]], [1.0, 2.0])


def test_sample_advantages_groups_drops_and_weights():
    from distill.advantages import sample_advantages

    # two questions x two samples; sample 2 dropped: its group is a group of one (advantage 0)
    got = sample_advantages([1.0, 0.0, None, 0.5], [2, 1, 3, 2], group_size=2, weight=0.5)
    assert got[0] == pytest.approx([0.5, 0.5], rel=1e-5) and got[1] == pytest.approx([-0.5], rel=1e-5)  # (r - mean) / (std + 1e-6)
    assert got[2] is None and got[3] == [0.0, 0.0]
    turn = sample_advantages([6.0, 6.0], [2, 2], 2, token_rewards=[[3.0, 9.0], [9.0, 3.0]])
    assert turn == [[0.0, 0.0], [0.0, 0.0]]  # tied trajectory rewards: 0, not 1e5
