"""Identities of the pure loss functions (METHODS.md, last section); advantages: test_advantages.py."""
import math

import pytest
import torch

from distill import losses as L

torch.manual_seed(0)
V = 50


def logits(*shape):
    return torch.randn(*shape, V, dtype=torch.float64) * 2


def test_jsd_endpoints_equal_forward_and_reverse_kl():
    # GKD/TRL convention: beta=0 is KL(q || p) (forward), beta=1 is KL(p || q) (reverse)
    p, q = logits(7), logits(7)
    assert torch.allclose(L.generalized_jsd(p, q, 0.0), L.forward_kl(p, q), atol=1e-10)
    assert torch.allclose(L.generalized_jsd(p, q, 1.0), L.reverse_kl(p, q), atol=1e-10)
    assert not torch.allclose(L.forward_kl(p, q), L.reverse_kl(p, q), rtol=1e-2)  # the two ends differ here


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jsd_continuous_at_both_ends(seed):
    # the mixture formula's limits must be the endpoint values: JSD/beta -> KL(q||p) as beta -> 0,
    # JSD/(1-beta) -> KL(p||q) as beta -> 1 (JSD itself -> 0 at both ends)
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(5, V, dtype=torch.float64, generator=g) * 2
    q = torch.randn(5, V, dtype=torch.float64, generator=g) * 2
    b = 1e-5  # the relative error is O(beta): about 2e-3 here
    assert torch.allclose(L.generalized_jsd(p, q, b) / b, L.forward_kl(p, q), rtol=1e-2)
    assert torch.allclose(L.generalized_jsd(p, q, 1 - b) / b, L.reverse_kl(p, q), rtol=1e-2)
    assert torch.allclose(L.generalized_jsd(p, q, b) / b, L.generalized_jsd(p, q, 0.0), rtol=1e-2)
    assert torch.allclose(L.generalized_jsd(p, q, 1 - b) / b, L.generalized_jsd(p, q, 1.0), rtol=1e-2)


def test_jsd_is_symmetric_at_one_half_bounded_and_nonnegative():
    p, q = logits(5), logits(5)
    assert torch.allclose(L.generalized_jsd(p, q, 0.5), L.generalized_jsd(q, p, 0.5), atol=1e-10)
    assert torch.allclose(L.generalized_jsd(p, q, 0.3), L.generalized_jsd(q, p, 0.7), atol=1e-10)  # beta <-> 1-beta swaps p, q
    assert (L.generalized_jsd(p, q, 0.5) <= math.log(2) + 1e-9).all()
    assert (L.generalized_jsd(p, q, 0.3) >= 0).all()
    with pytest.raises(ValueError):
        L.generalized_jsd(p, q, 1.5)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_divergences_vanish_with_zero_gradient_when_teacher_equals_student(beta):
    s = logits(6).requires_grad_(True)
    t = s.detach().clone()
    d = L.generalized_jsd(s, t, beta).sum()
    assert abs(float(d)) < 1e-12
    (g,) = torch.autograd.grad(d, s)
    assert g.abs().max() < 1e-9


def test_sampled_token_kls_vanish_when_equal_and_k3_is_nonnegative():
    lp = torch.log_softmax(logits(9), -1).max(-1).values
    assert torch.equal(L.kl_k1(lp, lp), torch.zeros_like(lp))
    assert torch.equal(L.kl_k3(lp, lp), torch.zeros_like(lp))
    lq = lp + torch.randn_like(lp)
    assert (L.kl_k3(lp, lq) >= 0).all()


def test_topk_terms():
    s = logits(4)
    lp = torch.log_softmax(s, -1)
    ids = lp.topk(8, -1).indices
    s_ = s.clone().requires_grad_(True)
    lps = torch.log_softmax(s_, -1).gather(-1, ids)
    z = L.topk_reverse_kl(lps, lps.detach()).sum()
    (g,) = torch.autograd.grad(z, s_)
    assert abs(float(z)) < 1e-12 and g.abs().max() < 1e-12  # zero signal and zero gradient at p = q
    # full vocabulary: top-k reverse KL is the reverse KL
    t = logits(4)
    lq = torch.log_softmax(t, -1)
    allids = torch.arange(V).expand(4, V)
    assert torch.allclose(L.topk_reverse_kl(lp.gather(-1, allids), lq.gather(-1, allids)), L.reverse_kl(s, t), atol=1e-10)
    # eopd's forward term with k = V is KL(q || p); with teacher == student and k < V it is -log(top-k mass)
    assert torch.allclose(L.topk_forward_kl(lq, lp), L.forward_kl(s, t), atol=1e-10)
    vals, idx = lp.topk(8, -1)
    mass = vals.exp().sum(-1)
    assert torch.allclose(L.topk_forward_kl(vals, lp.gather(-1, idx)), -torch.log(mass), atol=1e-10)


def test_entropy_uniform_is_log_v():
    assert torch.allclose(L.entropy(torch.zeros(3, V)), torch.full((3,), math.log(V)), atol=1e-6)


def test_masked_tokens_get_no_gradient_and_ratio_one_is_reinforce():
    B, T = 2, 6
    lg = logits(B, T).requires_grad_(True)
    ids = torch.randint(0, V, (B, T))
    mask = torch.tensor([[0, 1, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0]])
    adv = torch.randn(B, T, dtype=torch.float64)
    lp = L.token_logprobs(lg.reshape(-1, V), ids.reshape(-1)).reshape(B, T)
    loss = L.policy_gradient_loss(lp, lp.detach(), adv, mask)
    (g,) = torch.autograd.grad(loss, lg)
    assert g[mask == 0].abs().max() == 0  # prompt / observation positions: no gradient at all
    assert g[mask == 1].abs().max() > 0
    # ratio 1: the gradient is that of -mean(A * log pi) over agent tokens
    lg2 = lg.detach().clone().requires_grad_(True)
    lp2 = L.token_logprobs(lg2.reshape(-1, V), ids.reshape(-1)).reshape(B, T)
    ref = -((adv * lp2 * mask).sum() / mask.sum())
    (g2,) = torch.autograd.grad(ref, lg2)
    assert torch.allclose(g, g2, atol=1e-12)


def test_micro_batches_with_a_global_denominator_equal_one_batch():
    x = torch.randn(4, 5, dtype=torch.float64)
    m = (torch.rand(4, 5) > 0.4).long()
    whole = L.masked_mean(x, m)
    parts = L.masked_mean(x[:2], m[:2], float(m.sum())) + L.masked_mean(x[2:], m[2:], float(m.sum()))
    assert torch.allclose(whole, parts, atol=1e-12)


def test_ppo_clip_limits_the_ratio():
    lp = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)  # ratio e > 1 + eps
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss = L.policy_gradient_loss(lp, old, adv, torch.ones(1, 2), clip_eps=0.2)
    (g,) = torch.autograd.grad(loss, lp)
    assert g[0, 0] == 0  # positive advantage above 1 + eps: clipped, no gradient
    assert g[0, 1] != 0  # negative advantage: the unclipped (pessimistic) branch keeps the gradient


def test_hidden_mse_zero_when_equal_and_stops_teacher_gradient():
    hs = torch.randn(3, 4, 8, requires_grad=True)
    assert float(L.hidden_mse(hs, hs.detach().clone())) == 0.0
    ht = torch.randn(3, 4, 8, requires_grad=True)
    L.hidden_mse(hs, ht).backward()
    assert ht.grad is None and hs.grad is not None
    assert float(L.hidden_mse(hs, 3 * hs.detach(), normalize=True)) < 1e-12  # bridge compares directions
