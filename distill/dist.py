"""Data-parallel training under ``torchrun`` (torch.distributed): one process per rank.

    torchrun --nproc_per_node=2 -m distill.run env=webqa method=grpo
    torchrun --nnodes=2 --node_rank=R --rdzv_endpoint=HOST:29500 --nproc_per_node=8 -m distill.run ...

Without ``WORLD_SIZE`` (plain ``python -m distill.run``) everything here is a no-op for one rank.

* Each rank rolls out a contiguous share of the step's questions (``share``), every sample of a
  question on the same rank, so group statistics (GRPO's mean and std) stay exact.
* Every loss is a sum over agent tokens divided by the *global* number of trained tokens
  (``all_sum`` of the ranks' counts); the ranks' gradients are then summed (``all_reduce_grads``),
  which gives exactly the gradient one process would compute over the whole step. Clipping and
  the optimizer step then run identically on every rank, so the weights stay equal without a
  broadcast.
* Rank 0 alone evaluates, writes metrics, trajectories, checkpoints and the final adapter; it
  gathers the other ranks' trajectories and metrics first (``gather``). Resume: every rank loads
  the same checkpoint (the run directory must be shared between nodes).
* Backend: gloo on CPU, NCCL where the student is on a GPU.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

COUNT_KEYS = frozenset({"teacher_requests", "teacher_failed", "teacher_unparseable", "score_fallback", "dropped",
                        "replaced_trajectories", "replaced_turns", "teacher_turns", "teacher_tokens", "kept_steps"})


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init(device: str = "cpu") -> tuple[int, int]:
    """Join the process group when launched by torchrun; returns (rank, world size)."""
    rank, size = world()
    if size > 1 and not active():
        backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return rank, size


def is_main() -> bool:
    return world()[0] == 0


def share(items: Sequence, rank: int, size: int) -> list:
    """Rank ``rank``'s contiguous share of ``items`` (the first ranks take one more when uneven)."""
    n, extra = divmod(len(items), size)
    start = rank * n + min(rank, extra)
    return list(items[start: start + n + (rank < extra)])


def all_sum(x: float) -> float:
    if not active():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t[0])


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled through the process group); ``obj`` itself
    outside torchrun."""
    if not active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_grads(params: Sequence[torch.Tensor]) -> None:
    """Sum the ranks' gradients in place (a rank with no sample contributes zeros)."""
    if not active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)


def gather(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (one rank: ``[obj]``)."""
    if not active():
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def merge_metrics(parts: Sequence[tuple[dict, int]]) -> dict:
    """One step's method metrics from every rank's ``(metrics, trajectories)``: counts summed,
    ``*_min``/``*_max`` taken over ranks, the rest averaged weighted by trajectories (for a std
    this is the mean of the ranks' stds, not the pooled std)."""
    if len(parts) == 1:
        return dict(parts[0][0])
    out: dict = {}
    keys = {k for m, _ in parts for k in m}
    for k in keys:
        vals = [(m[k], n) for m, n in parts if k in m]
        if k in COUNT_KEYS:
            out[k] = sum(v for v, _ in vals)
        elif k.endswith("_min"):
            out[k] = min(v for v, _ in vals)
        elif k.endswith("_max"):
            out[k] = max(v for v, _ in vals)
        else:
            out[k] = sum(v * n for v, n in vals) / max(sum(n for _, n in vals), 1)
    return out


def shutdown() -> None:
    if active():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
