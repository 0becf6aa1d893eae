"""Pure loss functions shared by every method. Names carry shapes.

Shape letters: ``B`` batch (sequences), ``T`` token positions, ``N`` agent tokens flattened
across a micro-batch (any leading dims work where ``..._T`` is written), ``V`` vocabulary,
``K`` top-k entries, ``D`` hidden width, ``P`` questions, ``G`` samples per question.
A ``mask_B_T`` is 1 on agent tokens (``loss_mask``) and 0 on prompt, observation and padding.

Every function here is tested on its identities in ``tests/distill/test_losses.py``
(METHODS.md, last section): zero signal when teacher equals student, generalised JSD
continuous at both ends (beta 0 / 1 are forward / reverse KL), and masked positions receive no
gradient. Group and per-turn advantages live in ``distill.advantages``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill.advantages import group_advantages  # noqa: F401  (re-exported; the advantages live there)


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits are upcast; float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def masked_mean(values_B_T: torch.Tensor, mask_B_T: torch.Tensor, denominator: float | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is 1, divided by the mask's sum (or ``denominator``).

    A fixed ``denominator`` (all agent tokens of the whole step) makes gradient accumulation
    over micro-batches equal to one pass over the full batch.
    """
    mask = mask_B_T.to(values_B_T.dtype)
    total = (values_B_T * mask).sum()
    den = mask.sum().clamp(min=1.0) if denominator is None else max(float(denominator), 1.0)
    return total / den


def token_logprobs(logits_N_V: torch.Tensor, ids_N: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[id] per position, in float32."""
    return torch.log_softmax(_up(logits_N_V), dim=-1).gather(-1, ids_N.unsqueeze(-1)).squeeze(-1)


def policy_gradient_loss(
    logprobs_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    clip_eps: float = 0.2,
    denominator: float | None = None,
    dual_clip: float = 3.0,
) -> torch.Tensor:
    """PPO-clip: ``-mean_t min(ratio A, clip(ratio, 1-eps, 1+eps) A)`` over agent tokens, with
    the dual clip of Ye et al. 2020 (arXiv:1912.09729, Eq. 5) for negative advantages:
    ``max(min(ratio A, clip(ratio) A), c A)`` where ``A < 0``.

    PPO's clip bounds the ratio from above only where ``A > 0``; where ``A < 0`` the unclipped
    ``ratio A`` is the minimum, so a token the sampler found much less likely than the learner
    does (a large ratio) would weigh without bound. The dual clip truncates that ratio at ``c``
    (no gradient beyond it): the truncated importance weight (METHODS.md) where sampler and
    learner differ. ``dual_clip=0`` turns it off (plain PPO-clip); ``MethodConfig`` checks it is > 1.

    With ``old_logprobs = logprobs.detach()`` (one update per batch) the ratio is 1 and the
    gradient is the REINFORCE gradient ``-A grad log pi``.
    """
    ratio = torch.exp(logprobs_B_T - old_logprobs_B_T)
    adv = advantages_B_T.detach()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    surrogate = torch.minimum(unclipped, clipped)
    if dual_clip:
        surrogate = torch.where(adv < 0, torch.maximum(surrogate, dual_clip * adv), surrogate)
    return -masked_mean(surrogate, mask_B_T, denominator)


def kl_k1(logp_B_T: torch.Tensor, logq_B_T: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(p || q) on tokens sampled from p: ``log p - log q``."""
    return logp_B_T - logq_B_T


def kl_k3(logp_B_T: torch.Tensor, logq_B_T: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(p || q) (Schulman): ``exp(log q - log p) - (log q - log p) - 1`` >= 0."""
    d = logq_B_T - logp_B_T
    return torch.exp(d) - d - 1.0


def entropy(logits_N_V: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) per position."""
    logp = torch.log_softmax(_up(logits_N_V), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def forward_kl(student_logits_N_V: torch.Tensor, teacher_logits_N_V: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per position over the full vocabulary (teacher q, student p)."""
    logp = torch.log_softmax(_up(student_logits_N_V), -1)
    logq = torch.log_softmax(_up(teacher_logits_N_V), -1)
    return (logq.exp() * (logq - logp)).sum(-1)


def reverse_kl(student_logits_N_V: torch.Tensor, teacher_logits_N_V: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position over the full vocabulary."""
    logp = torch.log_softmax(_up(student_logits_N_V), -1)
    logq = torch.log_softmax(_up(teacher_logits_N_V), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def generalized_jsd(student_logits_N_V: torch.Tensor, teacher_logits_N_V: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised JSD per position in GKD's (and TRL's) convention, teacher q, student p:
    ``m = beta q + (1 - beta) p``, ``JSD_beta = beta KL(q || m) + (1 - beta) KL(p || m)``.

    beta=0 is forward KL(q || p) and beta=1 reverse KL(p || q), as limits of the formula
    (``JSD_beta / beta -> KL(q || p)`` as beta -> 0, ``JSD_beta / (1 - beta) -> KL(p || q)`` as
    beta -> 1); the endpoints are computed as those KLs. beta=0.5 is the symmetric JSD.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits_N_V, teacher_logits_N_V)
    if beta == 1.0:
        return reverse_kl(student_logits_N_V, teacher_logits_N_V)
    logp = torch.log_softmax(_up(student_logits_N_V), -1)
    logq = torch.log_softmax(_up(teacher_logits_N_V), -1)
    logm = torch.logsumexp(torch.stack([logq + math.log(beta), logp + math.log(1.0 - beta)]), dim=0)
    kl_qm = (logq.exp() * (logq - logm)).sum(-1)
    kl_pm = (logp.exp() * (logp - logm)).sum(-1)
    return beta * kl_qm + (1.0 - beta) * kl_pm


def topk_reverse_kl(student_logprobs_N_K: torch.Tensor, teacher_logprobs_N_K: torch.Tensor) -> torch.Tensor:
    """Reverse KL over K tokens (the student's top-k), both sides renormalised on those tokens:
    ``sum_k p~_k (log p~_k - log q~_k)``. Renormalising keeps the identity "zero signal, zero
    gradient when teacher equals student" (the unnormalised sum would still push mass into the
    top-k); with K = V it is the full reverse KL.
    """
    lp = student_logprobs_N_K - torch.logsumexp(student_logprobs_N_K, dim=-1, keepdim=True)
    lq = teacher_logprobs_N_K - torch.logsumexp(teacher_logprobs_N_K, dim=-1, keepdim=True)
    return (lp.exp() * (lp - lq)).sum(-1)


def topk_forward_kl(teacher_topk_logprobs_N_K: torch.Tensor, student_logprobs_N_K: torch.Tensor) -> torch.Tensor:
    """``KL(q~ || p)`` with q~ the teacher renormalised on its own top-k tokens and p the student's
    full-vocabulary log-probs gathered at those tokens (eopd's forward term, METHODS.md). Not 0
    at p = q unless k = V: it is then ``-log(top-k mass)``."""
    logq_tilde = teacher_topk_logprobs_N_K - torch.logsumexp(teacher_topk_logprobs_N_K, dim=-1, keepdim=True)
    return (logq_tilde.exp() * (logq_tilde - student_logprobs_N_K)).sum(-1)


def hidden_sq_err_N(student_hidden_L_N_D: torch.Tensor, teacher_hidden_L_N_D: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Per row: mean over layers and dims of ``(h_S - sg(h_T))^2`` (oprd). ``normalize`` compares
    L2-normalised vectors (the bridge mode)."""
    hs, ht = _up(student_hidden_L_N_D), _up(teacher_hidden_L_N_D.detach())
    if normalize:
        hs, ht = F.normalize(hs, dim=-1), F.normalize(ht, dim=-1)
    return ((hs - ht) ** 2).mean(dim=(0, 2))


def hidden_mse(student_hidden_L_N_D: torch.Tensor, teacher_hidden_L_N_D: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Mean over layers, tokens and dims of ``(h_S - sg(h_T))^2`` (oprd); 0 with no rows."""
    if student_hidden_L_N_D.numel() == 0:
        return _up(student_hidden_L_N_D).sum() * 0.0
    return hidden_sq_err_N(student_hidden_L_N_D, teacher_hidden_L_N_D, normalize).mean()
