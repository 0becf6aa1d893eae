"""oprd: on-policy representation distillation - align hidden states on the student's rollouts.

``L = mean over layers l, agent tokens t, dims of (h_S^l_t - sg(h_T^l_t))^2`` over the block
outputs of ``layers`` (``all`` or a comma list, 1-based; as transformers' ``hidden_states``
give them, the last layer's is after the model's final norm, on both sides) at the last
``positions`` agent tokens of each sequence (0 = all of them). No LM head is involved. The mean
over ``t`` is over the selected positions of the whole step: ``prepare`` gives each selected token the weight
``1 / (selected positions of the step's kept trajectories)`` (extra ``oprd_weight``), so ``mu``
means the same whatever the number of unselected agent tokens, and micro-batches add up.

Same depth and width (e.g. ``teacher=self``): no projection. Otherwise the bridge: student
layer l maps to teacher layer ``round((l-1)/(L_S-1)*(L_T-1))+1``; a frozen PCA projector to
rank ``rank`` is fitted on the teacher's states and a frozen linear projector (least squares)
maps the student's states onto those PCA coordinates, both fitted once on the first step's
rollouts with the initial student (rank 0's rollouts under torchrun) and kept in the checkpoint;
the loss compares L2-normalised projected vectors. Combine with opd through ``opd_coef`` (k1
form, ``L = L_opd + mu L_oprd``) or use it alone (``opd_coef=0``: the env advantage plus ``mu L_oprd``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distill import dist
from distill.losses import hidden_sq_err_N, masked_mean
from distill.methods import Method, MethodConfig, Signal, env_signal, pg_term
from distill.methods.opd import agent_targets


@dataclass
class OPRDConfig(MethodConfig):
    name: str = "oprd"
    env_weight: float = 1.0
    layers: str = "all"  # "all" or a comma list of 1-based student layers
    positions: int = 0  # last k agent tokens per sequence; 0 = all
    mu: float = 1.0
    opd_coef: float = 0.0  # > 0 adds opd's k1 advantage with this coefficient
    rank: int = 64  # bridge projection rank


def student_layers(cfg, n_student: int, n_teacher: int) -> list[int]:
    if str(cfg.layers) == "all":
        return list(range(1, n_student + 1))
    ls = [int(x) for x in str(cfg.layers).split(",") if x.strip()]
    bad = [x for x in ls if not 1 <= x <= n_student]
    if bad:
        raise ValueError(f"oprd layers {bad} outside 1..{n_student}")
    return ls


def teacher_layer(l: int, n_student: int, n_teacher: int) -> int:
    if n_student == n_teacher or n_student == 1:
        return l if n_student == n_teacher else n_teacher
    return round((l - 1) / (n_student - 1) * (n_teacher - 1)) + 1


def select_last(targets: list[list[int]], k: int) -> list[list[int]]:
    return [ts[-k:] if k > 0 else list(ts) for ts in targets]


def needs(cfg) -> frozenset[str]:
    return frozenset({"hidden_states"} | ({"logprobs"} if cfg.opd_coef > 0 else set()))


def selection_weights(trajectories, kept: list[bool], k: int) -> list[list[float]]:
    """Per agent token: ``1 / n_selected`` at the last ``k`` agent tokens (all when ``k=0``) of
    each kept trajectory, else 0; ``n_selected`` counts the selected tokens of the whole step,
    every rank's under torchrun (the ranks' gradients are summed, as the PG term's are)."""
    flags = []
    for t, keep in zip(trajectories, kept):
        n = sum(t.loss_mask)
        first = 0 if k <= 0 else max(n - k, 0)
        flags.append([float(keep and j >= first) for j in range(n)])
    total = max(dist.all_sum(sum(map(sum, flags))), 1.0)
    return [[f / total for f in fs] for fs in flags]


def prepare(trajectories, teacher, cfg, ctx) -> Signal:
    lq, failed = None, set()
    if cfg.opd_coef > 0:
        seqs, targets = agent_targets(trajectories)
        lq = teacher.logprobs(seqs, targets)
        failed = {i for i, x in enumerate(lq) if x is None}
    sig = env_signal(trajectories, cfg, ctx, failed)
    if lq is not None:
        sig.extras["teacher_logprobs"] = lq
    sig.extras["oprd_weight"] = selection_weights(trajectories, [a is not None for a in sig.advantages], cfg.positions)
    if "bridge" not in ctx.state:
        # under torchrun every rank takes rank 0's projectors, so all ranks optimise one objective
        ctx.state["bridge"] = dist.broadcast(fit_bridge(trajectories, teacher, cfg, ctx))
    return sig


@torch.no_grad()
def fit_bridge(trajectories, teacher, cfg, ctx) -> dict | None:
    """None when student and teacher have the same depth and width, else frozen projectors."""
    ls = student_layers(cfg, ctx.n_student_layers, ctx.n_teacher_layers)
    lt = [teacher_layer(l, ctx.n_student_layers, ctx.n_teacher_layers) for l in ls]
    # every position of the first step's sequences (prompts, actions, observations): many more
    # rows than dimensions, so the fit is not an interpolation of the agent tokens it will be scored on
    seqs, _ = agent_targets(trajectories)
    targets = [list(range(1, len(s))) for s in seqs]
    h_t = teacher.hidden_states(seqs, targets, lt)  # [L, N, D_T]
    h_s = ctx.student_hidden(seqs, targets, ls)  # [L, N, D_S], initial student, no grad
    if ls == lt and h_t.shape[-1] == h_s.shape[-1]:
        return None
    r = max(1, min(cfg.rank, h_t.shape[1] - 1, h_t.shape[-1], h_s.shape[-1]))
    mu_t, mu_s = h_t.mean(1, keepdim=True), h_s.mean(1, keepdim=True)
    proj_t, proj_s = [], []
    for l in range(h_t.shape[0]):
        ct, cs = (h_t[l] - mu_t[l]).float(), (h_s[l] - mu_s[l]).float()
        _, _, v = torch.linalg.svd(ct, full_matrices=False)
        p = v[:r].T  # [D_T, r]
        w = torch.linalg.lstsq(cs, ct @ p).solution  # [D_S, r]
        proj_t.append(p)
        proj_s.append(w)
    return {"mu_t": mu_t, "mu_s": mu_s, "proj_t": torch.stack(proj_t), "proj_s": torch.stack(proj_s), "rank": r}


def loss(mb, teacher, cfg):
    adv = mb.advantages_N
    m = {}
    if cfg.opd_coef > 0:
        k1 = mb.logprobs_N.detach() - mb.extras["teacher_logprobs"]
        adv = adv - cfg.opd_coef * k1
        m["kl_k1"] = float(masked_mean(k1, mb.weight_N))
    pg, m2 = pg_term(mb, cfg, adv)
    n_s, n_t = mb.n_layers
    ls = student_layers(cfg, n_s, n_t)
    lt = [teacher_layer(l, n_s, n_t) for l in ls]
    sel = select_last(mb.targets, cfg.positions)
    rows = _row_mask(mb.targets, sel).to(mb.hidden_L_N_D.device)
    h_s = mb.hidden_L_N_D[:, rows]
    h_t = teacher.hidden_states(mb.seqs, sel, lt)
    bridge = mb.state.get("bridge")
    if bridge is None:
        err = hidden_sq_err_N(h_s, h_t)
    else:
        z_s = torch.einsum("lnd,ldr->lnr", h_s - bridge["mu_s"], bridge["proj_s"])
        z_t = torch.einsum("lnd,ldr->lnr", h_t - bridge["mu_t"], bridge["proj_t"])
        err = hidden_sq_err_N(z_s, z_t, normalize=True)
    # weights 1 / (selected positions of the step): summed over micro-batches, the mean over them
    w = mb.extras["oprd_weight"].to(err.device)[rows]
    term = (err * w).sum()
    m.update(m2)
    m["oprd_mse"] = float(err.detach().mean()) if err.numel() else 0.0
    return pg + cfg.mu * term, m


def _row_mask(targets: list[list[int]], selected: list[list[int]]) -> torch.Tensor:
    keep = []
    for ts, ss in zip(targets, selected):
        s = set(ss)
        keep += [t in s for t in ts]
    return torch.tensor(keep, dtype=torch.bool)


METHOD = Method("oprd", OPRDConfig, needs=needs, prepare=prepare, loss=loss, student_layers=lambda cfg, ls, lt: student_layers(cfg, ls, lt), token_level=True)
