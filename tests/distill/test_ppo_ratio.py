"""The shared policy-gradient term takes its PPO ratio against the sampler's stored log-probs:
ratio 1 is REINFORCE, a shifted sampler log-prob gives the clipped value, a token the student
did not sample (NaN) falls back to ratio 1; and the trainer hands the stored log-probs over."""
import math

import pytest
import torch

from distill.methods import MethodConfig, MicroBatch, pg_term


def batch(logp, old, adv):
    lp = torch.tensor(logp, requires_grad=True)
    n = len(logp)
    mb = MicroBatch(seqs=[], targets=[], logits_N_V=None, logprobs_N=lp, hidden_L_N_D=None,
                    seq_index_N=torch.zeros(n, dtype=torch.long), target_ids_N=torch.zeros(n, dtype=torch.long),
                    advantages_N=torch.tensor(adv), weight_N=torch.ones(n), extras={}, denominator=float(n),
                    old_logprobs_N=None if old is None else torch.tensor(old))
    return lp, mb


def test_ratio_one_is_reinforce():
    lp, mb = batch([-1.0, -2.0], [-1.0, -2.0], [0.5, -1.5])
    loss, _ = pg_term(mb, MethodConfig())
    loss.backward()
    assert float(loss) == pytest.approx(-(0.5 - 1.5) / 2)
    assert lp.grad.tolist() == pytest.approx([-0.5 / 2, 1.5 / 2])  # -A grad log pi / N


def test_shifted_sampler_logprob_gives_the_clipped_value():
    # learner log-prob 0.5 above the sampler's: ratio e^0.5 = 1.65 > 1 + eps
    lp, mb = batch([-1.0], [-1.5], [2.0])
    loss, _ = pg_term(mb, MethodConfig(clip_eps=0.2))
    loss.backward()
    assert float(loss) == pytest.approx(-1.2 * 2.0)  # min(1.65 A, 1.2 A) for A > 0
    assert lp.grad.tolist() == [0.0]  # clipped: no gradient
    lp, mb = batch([-1.0], [-1.5], [-2.0])  # A < 0: the unclipped ratio is the min
    loss, _ = pg_term(mb, MethodConfig(clip_eps=0.2))
    assert float(loss) == pytest.approx(math.exp(0.5) * 2.0)


def test_a_negative_advantage_ratio_is_truncated_by_the_dual_clip():
    """Found in review: PPO's clip bounds the ratio only where A > 0. Learner log-prob -0.1 against
    a sampler's -5 (ratio e^4.9 = 134) with A = -1 gave a loss of 134 and a gradient to match;
    the dual clip (Ye et al. 2020) truncates it at c = 3, with no gradient beyond."""
    lp, mb = batch([-0.1], [-5.0], [-1.0])
    loss, _ = pg_term(mb, MethodConfig())
    loss.backward()
    assert float(loss) == pytest.approx(3.0) and lp.grad.tolist() == [0.0]
    lp, mb = batch([-0.1], [-5.0], [-1.0])
    loss, _ = pg_term(mb, MethodConfig(dual_clip=0))  # off: plain PPO-clip, unbounded
    assert float(loss) == pytest.approx(math.exp(4.9))
    lp, mb = batch([-0.1], [-5.0], [1.0])  # A > 0: PPO's own clip at 1 + eps, as before
    loss, _ = pg_term(mb, MethodConfig())
    assert float(loss) == pytest.approx(-1.2)
    lp, mb = batch([-1.0], [-1.5], [-2.0])  # below c the dual clip changes nothing
    assert float(pg_term(mb, MethodConfig())[0]) == pytest.approx(math.exp(0.5) * 2.0)
    with pytest.raises(ValueError, match="dual_clip"):
        MethodConfig(dual_clip=0.5)


def test_unknown_sampler_logprob_is_ratio_one():
    lp, mb = batch([-1.0, -3.0], [float("nan"), -3.0], [1.0, 1.0])
    loss, _ = pg_term(mb, MethodConfig())
    loss.backward()
    assert float(loss) == pytest.approx(-1.0) and lp.grad.tolist() == pytest.approx([-0.5, -0.5])


def test_sampler_logprobs_of_a_mixed_trajectory():
    from agents.rollout import SOURCE_ENV, SOURCE_STUDENT, SOURCE_TEACHER, Trajectory
    from distill.batches import sampler_logprobs

    t = Trajectory("q", "q", 0, [1], completion_ids=[5, 6, 7, 8], loss_mask=[1, 0, 1, 1], logprobs=[-0.1, 0.0, -0.3, -0.4],
                   sources=[SOURCE_STUDENT, SOURCE_ENV, SOURCE_TEACHER, SOURCE_STUDENT])
    got = sampler_logprobs(t)
    assert got[0] == -0.1 and math.isnan(got[1]) and got[2] == -0.4
