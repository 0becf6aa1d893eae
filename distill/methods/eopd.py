"""eopd: entropy-aware on-policy distillation - opd plus a forward KL where the teacher is unsure.

``L = L_opd + alpha * sum_t 1[H(q_t) >= tau] * KL(q~_t || p_t) / (all agent tokens)``, where
``L_opd`` is the k1 policy-gradient form of opd, ``H`` the teacher's entropy in nats over the
full vocabulary, ``q~`` the teacher renormalised on its own top-``topk`` tokens and ``p`` the
student's full-vocabulary log-probs gathered at those tokens. Divided by all agent tokens, not
only the gated ones. Defaults tau=0.8, alpha=1, k=16 as reported. Teacher rows are computed
per micro-batch from a local teacher's distribution.

Choice: the forward term follows the paper's definition as METHODS.md states it (the paper's
full text was not in reach to cite an equation number): the student is NOT renormalised on the
top-k. So at teacher == student the term is ``-log(top-k mass of q) > 0`` per gated token, and
its gradient (``p_j - q~_j`` on the logits) moves the student's mass into the teacher's top-k: a
declared exemption from the zero-signal identity (tests/distill/test_methods.py asserts that
value). Renormalising the student too would restore the identity but depart from the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.losses import entropy, masked_mean, topk_forward_kl
from distill.methods import Method, Signal, as_mean, env_signal, pg_term
from distill.methods.opd import OPDConfig


@dataclass
class EOPDConfig(OPDConfig):
    name: str = "eopd"
    tau: float = 0.8
    alpha: float = 1.0
    topk: int = 16

    def __post_init__(self):
        super().__post_init__()
        if self.form != "k1":  # the opd part of eopd is its k1 form; jsd/topk (and their beta) do not apply
            raise ValueError(f"eopd uses opd's k1 form only, got form={self.form!r}")


def prepare(trajectories, teacher, cfg, ctx) -> Signal:
    return env_signal(trajectories, cfg, ctx)


def loss(mb, teacher, cfg):
    t_logits = teacher.distribution(mb.seqs, mb.targets)
    logq_all = torch.log_softmax(t_logits, -1)
    logq = logq_all.gather(-1, mb.target_ids_N[:, None]).squeeze(-1)
    k1 = mb.logprobs_N.detach() - logq
    pg, m = pg_term(mb, cfg, mb.advantages_N - cfg.kl_coef * k1)
    h = entropy(t_logits)
    gate = (h >= cfg.tau).float()
    q_vals, q_ids = logq_all.topk(cfg.topk, dim=-1)
    logp_at = torch.log_softmax(mb.logits_N_V.float(), -1).gather(-1, q_ids)
    fkl = topk_forward_kl(q_vals, logp_at)
    term = masked_mean(gate * fkl, mb.weight_N, mb.denominator)
    m.update({"kl_k1": float(masked_mean(k1, mb.weight_N)), "eopd_term": as_mean(term, mb),
              "teacher_entropy": float(h.mean()), "gate_rate": float(gate.mean())})
    return pg + cfg.alpha * term, m


METHOD = Method("eopd", EOPDConfig, needs=lambda cfg: frozenset({"distribution"}), prepare=prepare, loss=loss, token_level=True)
