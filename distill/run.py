"""``python -m distill.run env=webqa method=ovd [group=option ...] [key=value ...]``

Trains the embedded student (Qwen2.5-Coder-0.5B-Instruct, LoRA) in WebQA-v0 with the method
named (``grpo``, ``ovd``, ``opd``, ``eopd``, ``opsd``, ``oprd``; see distill/methods/) and the
embedded teacher (Qwen2.5-Coder-1.5B-Instruct) on CPU, offline. Presets: ``model=small``
(SmolLM2-135M, a run of a minute or two), ``model=tiny`` (random, for smoke tests),
``teacher=http teacher.url=http://127.0.0.1:8001/v1`` (a remote teacher), ``teacher=self``.

Writes to ``output_dir`` (default ``runs/<env>-<method>-<model>``): ``config.yaml``,
``metrics.jsonl``, ``tensorboard/``, ``trajectories/step_*.jsonl`` (view with
``python -m benchmarks.viewer``), ``checkpoints/step_*``, ``final_adapter/``, ``plot.png``,
``eval_before.json`` / ``eval_after.json`` (held-out EM/F1) and ``summary.json``.
``resume=true`` continues the run in ``output_dir`` from its last checkpoint; ``resume=DIR``
continues the run in DIR with its saved config (``key=value`` overrides still apply).
``--cfg`` prints the resolved config and exits.

Data-parallel: ``torchrun --nproc_per_node=N -m distill.run ...`` (``--nnodes`` for several
machines, the same code; ``distill/dist.py``): each rank rolls out its share of a step's
questions, the gradients are summed over ranks, rank 0 writes.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from distill.config import ConfigError, TrainConfig, resolve, to_yaml


def run_dir_for(cfg: TrainConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path("runs") / f"{cfg.env.name}-{cfg.method['name']}-{cfg.model.name.replace('/', '_')}"


def _resume_config(run_dir: Path, overrides: list[str]):
    from omegaconf import OmegaConf

    from distill.config import resolve_saved

    saved = run_dir / "config.yaml"
    if not saved.exists():
        raise ConfigError(f"resume: true, false or a run directory (one holding config.yaml), got {str(run_dir)!r}")
    return resolve_saved(OmegaConf.load(saved), [o for o in overrides if not o.startswith("resume=")])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    show = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    flags = ("false", "true", "0", "1", "no", "yes", "")
    # resume=DIR: the saved config is the base, not the presets, so it is not composed from them
    # first (a teacher.<key> override is a key of the saved run's teacher backend, not the default's)
    resume = next((a.split("=", 1)[1].strip("'\"") for a in reversed(argv) if a.startswith("resume=")), "false")
    try:
        if resume.lower() in flags:
            cfg, mcfg = resolve(argv)
            resume = str(cfg.resume)
        if resume.lower() not in flags:
            run_dir = Path(resume)
            cfg, mcfg = _resume_config(run_dir, argv)
            cfg.output_dir, resume_flag = str(run_dir), True
        else:
            run_dir, resume_flag = run_dir_for(cfg), resume.lower() in ("true", "1", "yes")
    except ConfigError as exc:  # one line: <key>: <what is allowed>, got <value>
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    if show:
        print(to_yaml(cfg, mcfg))
        return 0
    from distill import checkpoint as ckpt

    if not resume_flag and ckpt.latest_checkpoint(run_dir, intact=False) is not None and not cfg.overwrite:
        print(f"error: {run_dir} already holds a run; pass resume=true to continue it, overwrite=true to start "
              f"afresh there, or output_dir=... for a new one", file=sys.stderr)
        return 2
    from distill import dist

    main_rank = dist.is_main()  # under torchrun only rank 0 prints and clears the run directory
    if cfg.overwrite and not resume_flag and run_dir.exists() and main_rank:
        import shutil

        shutil.rmtree(run_dir)
    if cfg.threads > 0:  # before numba loads: its OpenMP layer would reset torch's thread count
        os.environ.setdefault("NUMBA_NUM_THREADS", str(cfg.threads))
    from distill.train import TrainingError, train

    if main_rank:
        print(f"run directory: {run_dir}  (method {mcfg.name}, model {cfg.model.name}, teacher {cfg.teacher.kind}:{cfg.teacher.name})",
              flush=True)
    try:
        result = train(cfg, mcfg, run_dir, resume_flag)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if main_rank:
        _print_summary(result)
    return 0


def _print_summary(result: dict) -> None:
    before, after = result.get("eval_before"), result.get("eval_after")
    rows = [("", "EM", "F1", "turns", "answered")]
    for name, s in (("before", before), ("after", after)):
        if s and s.get("episodes"):
            rows.append((f"held-out {name} ({s['episodes']} q)", f"{s['em']:.3f}", f"{s['f1']:.3f}", f"{s['avg_turns']:.2f}", f"{s['answered']:.2f}"))
    if len(rows) > 1:
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    rd = result["run_dir"]
    print(f"metrics: {rd}/metrics.jsonl  plot: {rd}/plot.png  tensorboard --logdir {rd}/tensorboard")


if __name__ == "__main__":
    raise SystemExit(main())
