"""Checkpoints and the metrics log, written so that a kill at any moment loses nothing.

Order of writes at the end of step ``s`` (1-based):

1. the checkpoint goes to ``checkpoints/.tmp-step_s`` and is renamed to ``checkpoints/step_s``
   (a rename is atomic): trainable weights, optimizer, scheduler, RNG states, method state,
   and the step's metrics line;
2. the metrics line is appended to ``metrics.jsonl`` and fsynced.

On resume, the newest complete checkpoint ``k`` wins; ``metrics.jsonl`` is rewritten (atomically)
to exactly the lines of steps ``1..k`` - a torn last line or a line of an unfinished step is
dropped, and step ``k``'s line is restored from the checkpoint if the kill fell between 1 and 2.
So every step appears once, and the run continues at step ``k + 1``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from corpora.cache import atomic_write_text

STATE = "trainer_state.pt"
WEIGHTS = "trainable.safetensors"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE).is_file())
    return done[-1] if done else None


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def save(run_dir: Path, step: int, model, optimizer, scheduler, method_state: dict, metrics_line: dict, keep: int = 2) -> Path:
    final = step_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / WEIGHTS))
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), "method_state": method_state, "metrics": metrics_line}, tmp / STATE)
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    old = sorted(p for p in final.parent.iterdir() if p.name.startswith("step_"))
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load(ckpt: Path, model, optimizer, scheduler) -> dict:
    weights = load_file(str(ckpt / WEIGHTS))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    state = torch.load(ckpt / STATE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def append_metrics(path: Path, line: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for raw in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
    return out


def repair_metrics(path: Path, last_step: int, last_line: dict | None) -> list[dict]:
    """Rewrite ``metrics.jsonl`` to steps ``1..last_step``, each exactly once."""
    by_step: dict[int, dict] = {}
    for rec in read_metrics(path):
        s = int(rec.get("step", -1))
        if 1 <= s <= last_step and s not in by_step:
            by_step[s] = rec
    if last_step >= 1 and last_step not in by_step and last_line is not None:
        by_step[last_step] = last_line
    lines = [by_step[s] for s in sorted(by_step)]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
    return lines


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
