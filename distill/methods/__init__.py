"""The method table. One file per method, one line here each; CLI, tests and trainer read it.

A method is a ``Method`` record (see below):

* ``config``: a dataclass of its knobs (every one has ``env_weight``); Hydra's
  ``conf/method/<name>.yaml`` holds its defaults and ``method.<key>=...`` overrides them;
* ``needs(cfg)``: teacher capabilities it requires (``distill.teachers``), checked at start-up;
* ``prepare(trajectories, teacher, cfg, ctx) -> Signal``: attaches the teacher signal with no
  gradient: the advantage of every agent token (built in the method's own file from the pure
  functions of ``distill.advantages``; ``None`` drops a trajectory whose teacher call failed),
  per-token extras, replaced trajectories;
* ``loss(mb, teacher, cfg) -> (loss, metrics)`` on one micro-batch of student outputs.

All methods share the PPO-clip policy gradient on agent tokens (``pg_term``); they differ in
how the per-token advantage is built or in an extra loss term (METHODS.md).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from distill.losses import masked_mean, policy_gradient_loss

# name -> module defining METHOD. Add a method by adding a file and a line.
METHODS: dict[str, str] = {
    "grpo": "distill.methods.grpo",
    "ovd": "distill.methods.ovd",
    "opd": "distill.methods.opd",
    "eopd": "distill.methods.eopd",
    "opsd": "distill.methods.opsd",
    "oprd": "distill.methods.oprd",
}


@dataclass
class MethodConfig:
    """Knobs every method has."""

    name: str = ""
    env_weight: float = 1.0  # weight of the env reward in the reward / advantage
    clip_eps: float = 0.2  # PPO clip of pi_learner / pi_sampler (see pg_term)
    dual_clip: float = 3.0  # where A < 0, the ratio truncated at this (Ye et al. 2020); 0 = off
    scale_advantages: bool = True  # divide by the group std (GRPO); False = Dr.GRPO centring
    kl_beta: float = 0.0  # k3 KL to the initial policy (GRPO's reference term); 0 = off

    def __post_init__(self):
        if self.dual_clip and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or 0: off), got {self.dual_clip}")


@dataclass
class Signal:
    advantages: list[list[float] | None]  # per trajectory, per agent token; None = dropped (teacher failed)
    extras: dict[str, list[list[float] | None]] = field(default_factory=dict)  # per agent token
    teacher_seqs: list[list[int]] | None = None  # teacher-side sequences (privileged context)
    teacher_targets: list[list[int]] | None = None
    trajectories: list | None = None  # replaced trajectories (ovd mode=replace)
    train_masks: list[list[int]] | None = None  # per agent-token 0/1 (which generated tokens train)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class MicroBatch:
    """Student outputs and targets of one micro-batch, agent tokens flattened to N rows."""

    seqs: list[list[int]]
    targets: list[list[int]]  # positions (in seqs) of the agent tokens, row order
    logits_N_V: torch.Tensor | None  # with grad
    logprobs_N: torch.Tensor  # log pi(y_t), with grad
    hidden_L_N_D: torch.Tensor | None
    seq_index_N: torch.Tensor
    target_ids_N: torch.Tensor  # the sampled token at each row
    advantages_N: torch.Tensor  # env/teacher reward advantages (group-normalised)
    weight_N: torch.Tensor  # 1 where the token trains (0 for teacher tokens in ovd replace)
    extras: dict[str, torch.Tensor]
    denominator: float  # agent tokens in the whole step
    teacher_seqs: list[list[int]] | None = None
    teacher_targets: list[list[int]] | None = None
    old_logprobs_N: torch.Tensor | None = None  # the sampler's log-prob (NaN: a token the student did not sample)
    reference: Any = None  # the initial policy (a LocalTeacher) when kl_beta > 0
    state: dict = field(default_factory=dict)  # method state kept in checkpoints (oprd's bridge)
    n_layers: tuple[int, int] = (0, 0)  # (student, teacher) blocks


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    needs: Callable[[Any], frozenset[str]]
    prepare: Callable[..., Signal]
    loss: Callable[..., tuple[torch.Tensor, dict]]
    student_layers: Callable[[Any, int, int], list[int] | None] = lambda cfg, ls, lt: None
    default_teacher: str = "local"  # the teacher kind teacher=auto picks: local | self | none
    token_level: bool = False  # compares teacher and student token by token: needs the same tokenizer
    default_reward: str = "em"  # the env reward env.reward=auto picks for training
    # True when the loss is ``pg_term`` alone with no KL term: a sample whose every advantage is 0
    # then has exactly zero gradient, and the trainer runs it forward only (for its logged entropy
    # and drift), without the backward pass
    advantage_only: Callable[[Any], bool] = lambda cfg: False


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; the table has {sorted(METHODS)}")
    return importlib.import_module(METHODS[name]).METHOD


def pg_term(mb: MicroBatch, cfg: MethodConfig, token_advantages_N: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The shared PPO-clip loss on agent tokens, plus GRPO's k3 KL to the reference if asked.

    The ratio is pi_learner / pi_sampler with the sampler's stored log-prob (METHODS.md): 1 while
    the sampler is the learner's own module (up to float noise, logged as ``logprob_drift``),
    clipped to [1-eps, 1+eps] where they differ (vLLM, bfloat16 rollouts), and truncated at
    ``dual_clip`` where the advantage is negative (:func:`distill.losses.policy_gradient_loss`).
    Tokens the student did not sample (a teacher's, NaN) take the learner's own detached
    log-prob: ratio 1, REINFORCE."""
    adv = mb.advantages_N if token_advantages_N is None else token_advantages_N
    old = mb.logprobs_N.detach()
    if mb.old_logprobs_N is not None:
        old = torch.where(torch.isfinite(mb.old_logprobs_N), mb.old_logprobs_N, old)
    loss = policy_gradient_loss(mb.logprobs_N, old, adv, mb.weight_N, cfg.clip_eps, mb.denominator, cfg.dual_clip)
    metrics = {"pg_loss": as_mean(loss, mb)}
    if cfg.kl_beta > 0 and mb.reference is not None:
        from distill.losses import kl_k3

        ref = torch.tensor([x for lp in mb.reference.logprobs(mb.seqs, mb.targets) for x in lp], dtype=torch.float32,
                           device=mb.logprobs_N.device)
        kl = masked_mean(kl_k3(mb.logprobs_N, ref), mb.weight_N, mb.denominator)
        loss = loss + cfg.kl_beta * kl
        metrics["kl_ref"] = as_mean(kl, mb)
    return loss, metrics


def as_mean(term: torch.Tensor, mb: MicroBatch) -> float:
    """A term normalised by the whole step's agent tokens, as this micro-batch's mean (for logs;
    the trainer averages logged values weighted by rows)."""
    return float(term.detach()) * mb.denominator / max(float(mb.weight_N.sum()), 1.0)


def env_signal(trajectories, cfg: MethodConfig, ctx, dropped=()) -> Signal:
    """GRPO advantages of the env rewards, scaled by ``env_weight`` (scaling the rewards instead
    would be undone by the group normalisation); trajectories in ``dropped`` (their teacher call
    failed) leave their group's statistics and get ``None``."""
    from distill.advantages import sample_advantages

    rewards = [None if i in dropped else float(t.reward) for i, t in enumerate(trajectories)]
    adv = sample_advantages(rewards, [t.num_agent_tokens for t in trajectories], ctx.group_size, cfg.scale_advantages,
                            weight=float(cfg.env_weight))
    return Signal(advantages=adv)
