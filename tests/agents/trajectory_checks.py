"""Checks the rollout tests share: a trajectory's runs of equal loss mask, and its sampling
log-probs beside one forward pass of a model over the finished trajectory."""
from __future__ import annotations

import torch


def mask_runs(tr) -> list[tuple[int, list[int]]]:
    """The completion ids split into runs of equal loss-mask value: ``[(mask, ids), ...]``."""
    runs: list[tuple[int, list[int]]] = []
    for t, m in zip(tr.completion_ids, tr.loss_mask):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(t)
        else:
            runs.append((m, [t]))
    return runs


def agent_logprobs(model, tr) -> tuple[list[float], list[float]]:
    """(the sampling log-probs of the mask-1 tokens, the same tokens' log-probs from one forward
    pass of ``model`` over prompt + completion, on the model's device)."""
    ids = torch.tensor([tr.prompt_ids + tr.completion_ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    n0 = len(tr.prompt_ids)
    got = [lp for lp, m in zip(tr.logprobs, tr.loss_mask) if m]
    want = [logp[n0 + t - 1, tok].item() for t, (tok, m) in enumerate(zip(tr.completion_ids, tr.loss_mask)) if m]
    return got, want
