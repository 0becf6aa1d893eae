"""opd: on-policy distillation with the teacher's token log-probs (reverse KL on own samples).

``form=k1`` (default): the teacher's log-prob of each sampled student token; the per-token
advantage is ``env_weight * A_env + kl_coef * (log q_t(y_t) - log p_t(y_t))`` (the sampled-token
estimate of -KL(p || q)), fed to the shared policy-gradient loss. Works with any teacher that
returns log-probs of given tokens, including an HTTP endpoint that returns prompt log-probs.
``form=topk``: reverse KL restricted to the student's top-``topk`` tokens at each position,
``form=jsd``: full-vocabulary generalised JSD in GKD's/TRL's convention, ``m = beta q + (1-beta) p``
(``beta=0`` forward KL(q || p), ``beta=1`` reverse KL(p || q), 0.5 symmetric; ``losses.generalized_jsd``);
both add ``kl_coef * term`` to the policy-gradient loss on the env advantage and need the
teacher's full distribution (a local teacher; computed per micro-batch, never for the whole
batch at once). Teacher and student must share a tokenizer (checked at start-up).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.losses import generalized_jsd, masked_mean, topk_reverse_kl
from distill.methods import Method, MethodConfig, Signal, as_mean, env_signal, pg_term


@dataclass
class OPDConfig(MethodConfig):
    name: str = "opd"
    env_weight: float = 1.0
    kl_coef: float = 1.0
    form: str = "k1"  # k1 | topk | jsd
    topk: int = 16
    beta: float = 0.5  # jsd only: 0 forward KL(q||p), 1 reverse KL(p||q) (GKD/TRL)

    def __post_init__(self):
        super().__post_init__()
        if self.form not in ("k1", "topk", "jsd"):
            raise ValueError(f"opd form must be k1, topk or jsd, got {self.form!r}")


def agent_targets(trajectories) -> tuple[list[list[int]], list[list[int]]]:
    """(full sequences, positions of their agent tokens) - the rows every token-level signal uses."""
    seqs, targets = [], []
    for t in trajectories:
        p = len(t.prompt_ids)
        seqs.append(list(t.prompt_ids) + list(t.completion_ids))
        targets.append([p + i for i, m in enumerate(t.loss_mask) if m])
    return seqs, targets


def needs(cfg) -> frozenset[str]:
    return frozenset({"logprobs"}) if cfg.form == "k1" else frozenset({"distribution"})


def prepare(trajectories, teacher, cfg, ctx) -> Signal:
    if cfg.form != "k1":  # the topk / jsd term reads the teacher inside the loss
        return env_signal(trajectories, cfg, ctx)
    seqs, targets = agent_targets(trajectories)
    lq = teacher.logprobs(seqs, targets)
    failed = {i for i, x in enumerate(lq) if x is None}
    sig = env_signal(trajectories, cfg, ctx, failed)
    sig.extras["teacher_logprobs"] = lq
    sig.metrics = {"teacher_failed": len(failed), "dropped": len(failed)}
    return sig


def distill_term(mb, teacher, cfg) -> tuple[torch.Tensor, dict]:
    """The topk / jsd term for one micro-batch (teacher rows computed here, then freed)."""
    t_logits = teacher.distribution(mb.seqs, mb.targets)
    if cfg.form == "jsd":
        per_tok = generalized_jsd(mb.logits_N_V, t_logits, cfg.beta)
    else:
        logp = torch.log_softmax(mb.logits_N_V.float(), -1)
        ids = logp.detach().topk(cfg.topk, dim=-1).indices
        logq = torch.log_softmax(t_logits, -1).gather(-1, ids)
        per_tok = topk_reverse_kl(logp.gather(-1, ids), logq)
    term = masked_mean(per_tok, mb.weight_N, mb.denominator)
    return term, {f"{cfg.form}_term": as_mean(term, mb)}


def loss(mb, teacher, cfg):
    if cfg.form == "k1":
        lq = mb.extras["teacher_logprobs"]
        k1 = mb.logprobs_N.detach() - lq
        adv = mb.advantages_N - cfg.kl_coef * k1
        total, m = pg_term(mb, cfg, adv)
        m["kl_k1"] = float(masked_mean(k1, mb.weight_N))
        return total, m
    pg, m = pg_term(mb, cfg)
    term, m2 = distill_term(mb, teacher, cfg)
    return pg + cfg.kl_coef * term, {**m, **m2}


METHOD = Method("opd", OPDConfig, needs=needs, prepare=prepare, loss=loss, token_level=True)
