"""Checkpoints and the metrics log, written so that a kill at any moment loses nothing.

Order of writes at the end of step ``s`` (1-based):

1. the checkpoint goes to ``checkpoints/.tmp-step_s`` and is renamed to ``checkpoints/step_s``
   (a rename is atomic): trainable weights, optimizer, scheduler, RNG states, method state,
   and the step's metrics line; last of all, ``manifest.json`` (written atomically) records
   the size and sha256 of each of those files, as read back from disk;
2. the metrics line is appended to ``metrics.jsonl`` and fsynced.

On resume, the newest *intact* checkpoint ``k`` wins: one whose files match its manifest (a disk
that truncated or flipped a file, or a copy that lost one, fails this). Each newer checkpoint
that fails is named in one printed line and skipped. A checkpoint without a manifest (written
before manifests existed) is accepted as legacy, with a printed note, if its files load.
``metrics.jsonl`` is then rewritten (atomically) to exactly the lines of steps ``1..k`` - a torn
last line or a line of an unfinished or skipped step is dropped, and step ``k``'s line is
restored from the checkpoint if the kill fell between 1 and 2. So every step appears once, and
the run continues at step ``k + 1`` (rewriting any skipped checkpoint as it goes).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common.files import atomic_write_text

STATE = "trainer_state.pt"
WEIGHTS = "trainable.safetensors"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def checkpoints(run_dir: Path) -> list[Path]:
    """Every published ``step_*`` folder, oldest first (unchecked)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and p.is_dir())


def latest_checkpoint(run_dir: Path, intact: bool = True, report: Callable[[str], None] = print) -> Path | None:
    """The newest intact checkpoint (see the module docstring), or None. Each newer one that is
    corrupt is named in one ``report`` line; a legacy one used gets a note. ``intact=False``: the
    newest published folder, unchecked (is there a run here at all?)."""
    found = checkpoints(run_dir)
    if not intact:
        return found[-1] if found else None
    bad: list[tuple[Path, str]] = []
    chosen, legacy = None, False
    for ck in reversed(found):
        legacy = not (ck / MANIFEST).exists()
        problem = _loads(ck) if legacy else verify(ck)
        if problem is None:
            chosen = ck
            break
        bad.append((ck, problem))
    where = f"falling back to {chosen}" if chosen is not None else "no intact checkpoint is left: starting afresh"
    for ck, problem in bad:
        report(f"resume: checkpoint {ck} is corrupt ({problem}); {where}")
    if chosen is not None and legacy:
        report(f"resume: checkpoint {chosen} has no manifest (written before manifests existed); accepted as legacy "
               f"because its files load")
    return chosen


def verify(ckpt: Path) -> str | None:
    """None when every file ``manifest.json`` lists has the recorded size and sha256 (and the
    weights and trainer state are listed); else what is wrong, in a few words."""
    try:
        m = json.loads((Path(ckpt) / MANIFEST).read_text(encoding="utf-8"))
        files = m["files"]
        if m.get("format") != MANIFEST_FORMAT or m["step"] != _step_of(ckpt) or not isinstance(files, dict):
            return f"{MANIFEST} does not describe this checkpoint"
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} unreadable: {type(exc).__name__}"
    for need in (WEIGHTS, STATE):
        if need not in files:
            return f"{MANIFEST} does not list {need}"
    for name, meta in sorted(files.items()):
        f = Path(ckpt) / name
        try:
            size = f.stat().st_size
            if size != meta["bytes"]:
                return f"{name}: {size} bytes, the manifest says {meta['bytes']}"
            if _sha256(f) != meta["sha256"]:
                return f"{name}: sha256 differs from the manifest"
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, KeyError, TypeError) as exc:
            return f"{name}: {type(exc).__name__}"
    return None


def _step_of(ckpt: Path) -> int:
    return int(Path(ckpt).name.removeprefix("step_"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _loads(ckpt: Path) -> str | None:
    """A legacy checkpoint's check: both files load."""
    try:
        load_file(str(ckpt / WEIGHTS))
        torch.load(ckpt / STATE, weights_only=False, map_location="cpu")
    except FileNotFoundError as exc:
        return f"no manifest and {Path(exc.filename or '?').name} is missing"
    except Exception as exc:  # noqa: BLE001 - any failure to read means the checkpoint cannot be used
        return f"no manifest and it does not load: {type(exc).__name__}"
    return None


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
    files = {}
    for f in sorted(tmp.iterdir()):  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")  # last
    _fsync_dir(tmp)
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
