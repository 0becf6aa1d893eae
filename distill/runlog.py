"""What a training run writes and shows: the metrics line of a step, the progress bar, the
trajectory and evaluation files, TensorBoard / W&B, the plot, and peak memory."""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_write_json, atomic_write_text, save_figure


def peak_rss_mb() -> float:
    """Peak resident set since the process started. It counts the file-backed pages of the
    memory-mapped safetensors weights too (clean page cache the kernel can drop), so it
    overstates what a run needs; ``AnonPeak`` measures the process's own memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class AnonPeak:
    """Peak anonymous resident memory (``RssAnon`` of /proc/self/status: heap, activations,
    copied weights; not the mapped weight files), sampled every ``interval`` seconds by a daemon
    thread. ``take()`` returns the peak since the last ``take()`` in MB (0 off Linux)."""

    def __init__(self, interval: float = 0.1):
        import threading

        self.peak = 0.0
        self._lock = threading.Lock()
        self.ok = os.path.exists("/proc/self/status")
        if self.ok:
            threading.Thread(target=self._run, args=(interval,), daemon=True, name="anon-peak").start()

    @staticmethod
    def now() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024.0
        return 0.0

    def _run(self, interval: float) -> None:
        while True:
            v = self.now()
            with self._lock:
                self.peak = max(self.peak, v)
            time.sleep(interval)

    def take(self) -> float:
        if not self.ok:
            return 0.0
        with self._lock:
            out, self.peak = max(self.peak, self.now()), 0.0
        return out


def metrics_line(step, trajs, sig, loss_sum, agg, rows, ent_sum, grad_norm, lr, n_samples, times, teacher, anon=None) -> dict:
    n = max(len(trajs), 1)
    t0, t1, t2, t3 = times
    line = {
        "step": step,
        "reward": sum(t.reward for t in trajs) / n,
        "em": sum(t.em for t in trajs) / n,
        "f1": sum(t.f1 for t in trajs) / n,
        "cover_em": sum(t.cover_em for t in trajs) / n,
        "turns": sum(len(t.actions) for t in trajs) / n,
        "answered": sum(t.answer is not None for t in trajs) / n,
        "invalid_actions": sum(t.invalid_actions for t in trajs) / n,
        "invalid_action_rate": sum(t.invalid_actions for t in trajs) / max(sum(len(t.actions) for t in trajs), 1),
        "trajectories": len(trajs),
        "trained_samples": n_samples,
        "agent_tokens": sum(t.num_agent_tokens for t in trajs),
        "tokens": sum(t.num_tokens for t in trajs),
        "loss": loss_sum,
        "entropy": ent_sum / max(rows, 1),
        "grad_norm": grad_norm,
        "lr": lr,
        "seconds": t3 - t0,
        "seconds_rollout": t1 - t0,
        "seconds_teacher": t2 - t1,
        "seconds_update": t3 - t2,
        "peak_rss_mb": peak_rss_mb(),
        "peak_anon_mb": anon.take() if anon is not None else 0.0,
    }
    if torch.cuda.is_available():
        line["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    line.update({k: float(v) for k, v in sig.metrics.items()})
    line.update({k: v / max(rows, 1) for k, v in agg.items()})
    for k, v in (getattr(teacher, "stats", None) or {}).items():
        line[f"teacher_{k}_total"] = v
    pool = teacher.pool_stats() if hasattr(teacher, "pool_stats") else {}
    if len(pool) > 1:  # a teacher pool: per endpoint, numbered in the order of teacher.url
        for i, s in enumerate(pool.values()):
            line.update({f"teacher_endpoint{i}_requests_total": s["requests"],
                         f"teacher_endpoint{i}_failures_total": s["failures"], f"teacher_endpoint{i}_down": int(s["down"])})
    return line


def postfix(line: dict) -> str:
    out = f"reward {line['reward']:.3f} EM {line['em']:.3f}"
    if "teacher_score_mean" in line:
        out += f" teacher {line['teacher_score_mean']:.2f}"
        if "teacher_score_std" in line:
            out += f"±{line['teacher_score_std']:.2f}"
    if "accept_rate" in line:
        out += f" accept {line['accept_rate']:.2f} replaced {line['replaced_turns']:.0f} turns {line['teacher_tokens']:.0f} tok"
    return out + f" loss {line['loss']:+.4f}"


def write_trajectories(run_dir: Path, step: int, trajs) -> None:
    from agents.evaluation import episode_record

    out = run_dir / "trajectories" / f"step_{step:06d}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    recs = []
    for t in trajs:
        r = episode_record(t, "train")
        r.update({"step": step, "sample_index": t.sample_index, "text": t.text, "sources": t.sources,
                  "replaced_from_turn": t.info.get("replaced_from_turn")})
        recs.append(r)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))


def write_eval(run_dir: Path, which: str, summary: dict, recs: list[dict]) -> None:
    atomic_write_text(run_dir / f"eval_{which}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    atomic_write_json(run_dir / f"eval_{which}.json", summary)


def tensorboard(run_dir: Path, cfg, start: int):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed: pip install tensorboard (continuing without it)")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1)


def wandb_run(run_dir: Path, cfg, mcfg):
    try:
        import wandb
    except ImportError:
        print("wandb=true but wandb is not installed: pip install wandb (continuing without it)")
        return None
    return wandb.init(project="webqa-gym", dir=str(run_dir), config={"method": asdict(mcfg)}, resume="allow")


def log(writer, wandb_run, line: dict) -> None:
    for k, v in line.items():
        if k != "step" and isinstance(v, (int, float)):
            if writer is not None:
                writer.add_scalar(k, v, line["step"])
    if writer is not None:
        writer.flush()
    if wandb_run is not None:
        wandb_run.log({k: v for k, v in line.items() if k != "step"}, step=line["step"])


def progress(cfg, start):
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, unit="step", dynamic_ncols=True)


def plot(run_dir: Path, history: list[dict]) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    panels = [("reward", "env reward"), ("em", "EM"), ("teacher_score_mean", "teacher score (0-9)"), ("loss", "loss")]
    panels = [(k, t) for k, t in panels if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (k, title) in zip(np.atleast_1d(axes), panels):
        ax.plot(steps, [h.get(k, float("nan")) for h in history], marker="o")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, run_dir / "plot.png")
