"""A step's trajectories as training samples, and samples as micro-batches for the loss.

``build_samples`` keeps one sample per trajectory the method did not drop: the sequence, the
positions of its agent tokens, and what the method attached per agent token (advantage, train
weight, extras, the sampler's log-probs for the PPO ratio). ``micro_batch`` runs the student's
forward pass at those positions only (``distill.forward``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.rollout import SOURCE_STUDENT, Trajectory
from distill.forward import forward_at
from distill.losses import token_logprobs
from distill.methods import MicroBatch, Signal


@dataclass
class Sample:
    seq: list[int]
    targets: list[int]  # positions of agent tokens in seq
    advantages: list[float]
    weights: list[float]
    extras: dict[str, list[float]]
    teacher_seq: list[int] | None = None
    teacher_targets: list[int] | None = None
    old_logprobs: list[float] | None = None  # the sampler's log-prob per target (NaN: not the student's sample)


def sampler_logprobs(t: Trajectory) -> list[float]:
    """The stored sampling log-prob of each agent token the student sampled; NaN for tokens a
    teacher wrote (ovd), whose ratio is then taken against the learner's own log-prob."""
    src = t.sources or [SOURCE_STUDENT if m else 0 for m in t.loss_mask]
    return [lp if s == SOURCE_STUDENT else float("nan") for lp, s, m in zip(t.logprobs, src, t.loss_mask) if m]


def build_samples(trajs: list[Trajectory], sig: Signal) -> list[Sample]:
    """One sample per kept trajectory: its sequence, agent-token positions, and what the method
    attached per agent token (advantage, train weight, extras)."""
    samples = []
    for i, t in enumerate(trajs):
        if sig.advantages[i] is None:
            continue
        p = len(t.prompt_ids)
        targets = [p + k for k, m in enumerate(t.loss_mask) if m]
        if not targets:
            continue
        weights = [float(x) for x in sig.train_masks[i]] if sig.train_masks is not None else [1.0] * len(targets)
        if not any(weights):
            continue  # none of its tokens trains (ovd: all the teacher's, masked)
        samples.append(Sample(list(t.prompt_ids) + list(t.completion_ids), targets, list(sig.advantages[i]), weights,
                              {k: v[i] for k, v in sig.extras.items()},
                              sig.teacher_seqs[i] if sig.teacher_seqs else None,
                              sig.teacher_targets[i] if sig.teacher_targets else None, sampler_logprobs(t)))
    return samples


def micro_batch(model, samples: list[Sample], pad_id: int, denominator: float, layers, **kw) -> MicroBatch:
    out = forward_at(model, [s.seq for s in samples], [s.targets for s in samples], pad_id, layers=layers)
    device = out.logits_N_V.device if out.logits_N_V is not None else None  # the learner's (a GPU's)
    cat = lambda xs: torch.tensor([x for s in xs for x in s], dtype=torch.float32, device=device)  # noqa: E731
    return MicroBatch(
        seqs=[s.seq for s in samples], targets=[s.targets for s in samples], logits_N_V=out.logits_N_V,
        logprobs_N=token_logprobs(out.logits_N_V, out.target_ids_N), hidden_L_N_D=out.hidden_L_N_D,
        seq_index_N=out.seq_index_N, target_ids_N=out.target_ids_N,
        advantages_N=cat([s.advantages for s in samples]), weight_N=cat([s.weights for s in samples]),
        old_logprobs_N=cat([s.old_logprobs for s in samples]),
        extras={k: cat([s.extras[k] for s in samples]) for k in (samples[0].extras if samples else {})},
        denominator=denominator,
        teacher_seqs=[s.teacher_seq for s in samples] if samples[0].teacher_seq is not None else None,
        teacher_targets=[s.teacher_targets for s in samples] if samples[0].teacher_seq is not None else None, **kw)


@torch.no_grad()
def student_hidden(model, pad_id, seqs, targets, layers):
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else _null()
    with ctx:
        return forward_at(model, seqs, targets, pad_id, with_logits=False, layers=layers).hidden_L_N_D


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
