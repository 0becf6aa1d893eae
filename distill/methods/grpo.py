"""grpo: the env reward only (the baseline every other method is compared with).

G samples per question; each sample's advantage is ``(r - mean(r)) / (std(r) + 1e-6)`` over its
group, the same for all its agent tokens; optional k3 KL to the initial policy (``kl_beta``).
"""
from __future__ import annotations

from dataclasses import dataclass

from distill.methods import Method, MethodConfig, Signal, env_signal, pg_term


@dataclass
class GRPOConfig(MethodConfig):
    name: str = "grpo"
    env_weight: float = 1.0


def prepare(trajectories, teacher, cfg: GRPOConfig, ctx) -> Signal:
    return env_signal(trajectories, cfg, ctx)


def loss(mb, teacher, cfg: GRPOConfig):
    return pg_term(mb, cfg)


METHOD = Method("grpo", GRPOConfig, needs=lambda cfg: frozenset(), prepare=prepare, loss=loss, default_teacher="none",
                advantage_only=lambda cfg: cfg.kl_beta == 0)
