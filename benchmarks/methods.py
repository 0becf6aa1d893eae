"""Method benchmark: training-side cost of each method, and a short learning comparison.

    python -m benchmarks.methods                              # cost table, model=small presets
    python -m benchmarks.methods model=student steps=1        # the embedded student/teacher pair
    python -m benchmarks.methods learn=true learn_steps=4     # + ovd vs grpo vs opd, held-out EM

Every option is ``key=value`` on :class:`MethodsConfig` (an unknown key is an error that names it).

**Cost.** Each method runs ``python -m distill.run`` in its own process with the same student,
questions, batch and seed (``steps`` steps, no evaluation), so each process's peak RSS is
that method's training-side memory, model loading included. Peak RSS counts the pages of the
memory-mapped weight files (clean page cache, shared between processes, droppable), so the
table also gives the peak *anonymous* memory during the steps (``peak_anon_mb``: activations,
gradients, optimizer state, copied weights), which is what grows with the method. ``ovd-remote`` runs ovd with the
teacher behind an OpenAI-compatible server in another process (``agents.openai_server``): the
server's memory is not the trainer's. Reported per method: peak RSS (MB) and its ratio to
grpo, seconds per step and the ratio, teacher seconds per step (the ``prepare`` phase; for
opd-family methods whose teacher runs inside the loss, it is part of the update time), and
the teacher used. On a GPU, ``peak_gpu_mb`` (torch's max allocated) is reported too.

**Learning.** ovd, grpo and opd at equal steps on the HotpotQA train sample, greedy EM/F1 on
held-out questions (the HotpotQA dev subset) before and after.

Writes JSON (``out``/methods.json) and prints Markdown tables.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# method label -> (distill.run overrides, teacher description) per student preset
_SHARED = {
    "grpo": (["method=grpo"], "none"),
    "ovd": (["method=ovd", "teacher=teacher"], "local Qwen2.5-Coder-1.5B (verbal)"),
    "ovd-remote": (["method=ovd", "teacher=http", "teacher.timeout=1800"], "HTTP Qwen2.5-Coder-1.5B (verbal)"),
    "opsd": (["method=opsd"], "self (adapters off)"),
}
# token-level methods need the student's tokenizer: SmolLM2 for the small student, Qwen's teacher for the 0.5B
_TOKEN_LEVEL = {"small": ("small", "local SmolLM2-135M (same tokenizer)"), "student": ("teacher", "local Qwen2.5-Coder-1.5B")}
PRESETS = {
    model: {**_SHARED, **{m: ([f"method={m}", f"teacher={teacher}"], desc + (" (bridge)" if m == "oprd" and model == "student" else ""))
                          for m in ("opd", "eopd", "oprd")}}
    for model, (teacher, desc) in _TOKEN_LEVEL.items()
}


def run_args(label: str, overrides: list[str], common: list[str], out: Path, teacher_url: str | None) -> list[str]:
    """The ``python -m distill.run`` command line of one method's run (printed, so it can be
    run by hand, e.g. on another core, and picked up later with ``skip_done=true``)."""
    args = [sys.executable, "-m", "distill.run", *overrides, *common, f"output_dir={out / label}", "overwrite=true"]
    if teacher_url and "teacher=http" in overrides:
        args.append(f"teacher.url={teacher_url}")
    return args


def finished_run(run_dir: Path, args: list[str]) -> bool:
    """``run_dir`` holds a finished run made with exactly ``args`` (its summary.json and the
    command line recorded next to it)."""
    cmd = run_dir / "command.json"
    return (run_dir / "summary.json").exists() and cmd.exists() and json.loads(cmd.read_text()) == args[1:]


def run_method(label: str, overrides: list[str], common: list[str], out: Path, teacher_url: str | None,
               skip_done: bool = False) -> dict:
    run_dir = out / label
    args = run_args(label, overrides, common, out, teacher_url)
    t0 = time.perf_counter()
    if skip_done and finished_run(run_dir, args):
        print(f"{label}: reusing the finished run in {run_dir}", flush=True)
    else:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            return {"method": label, "error": (p.stdout + p.stderr)[-1500:], "wall_s": time.perf_counter() - t0}
        (run_dir / "command.json").write_text(json.dumps(args[1:]))
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    n = len(lines)
    res = {
        "method": label,
        "steps": n,
        "peak_rss_mb": max(x["peak_rss_mb"] for x in lines),
        "peak_anon_mb": max(x.get("peak_anon_mb", 0.0) for x in lines),
        "s_per_step": sum(x["seconds"] for x in lines) / n,
        "teacher_s_per_step": sum(x["seconds_teacher"] for x in lines) / n,
        "update_s_per_step": sum(x["seconds_update"] for x in lines) / n,
        "rollout_s_per_step": sum(x["seconds_rollout"] for x in lines) / n,
        "agent_tokens_per_step": sum(x["agent_tokens"] for x in lines) / n,
        "dropped": sum(x.get("dropped", 0) for x in lines),
        "wall_s": wall,
    }
    if "peak_gpu_mb" in lines[-1]:
        res["peak_gpu_mb"] = max(x["peak_gpu_mb"] for x in lines)
    for k in ("eval_before", "eval_after"):
        p2 = run_dir / f"{k}.json"
        if p2.exists():
            res[k] = json.loads(p2.read_text())
    return res


def cost_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["method"] == "grpo" and "error" not in r), None)
    out = ["| method | teacher | peak RSS MB | x grpo | peak anon MB (steps) | x grpo | s/step | x grpo | teacher s/step | update s/step |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | {r.get('teacher', '')} | failed: {r['error'].splitlines()[-1][:80] if r['error'] else ''} |||||||| ")
            continue
        rm = r["peak_rss_mb"] / base["peak_rss_mb"] if base else float("nan")
        ra = r["peak_anon_mb"] / base["peak_anon_mb"] if base and base.get("peak_anon_mb") else float("nan")
        rs = r["s_per_step"] / base["s_per_step"] if base else float("nan")
        out.append(f"| {r['method']} | {r['teacher']} | {r['peak_rss_mb']:.0f} | {rm:.2f} | {r.get('peak_anon_mb', 0):.0f} | {ra:.2f} | "
                   f"{r['s_per_step']:.1f} | {rs:.2f} | "
                   f"{r['teacher_s_per_step']:.1f} | {r['update_s_per_step']:.1f} |")
    return "\n".join(out)


def learn_table(rows: list[dict]) -> str:
    out = ["| method | steps | held-out EM before | after | F1 before | after | train reward (mean over steps) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | failed |||||")
            continue
        b, a = r.get("eval_before", {}), r.get("eval_after", {})
        out.append(f"| {r['method']} | {r['steps']} | {b.get('em', float('nan')):.3f} | {a.get('em', float('nan')):.3f} | "
                   f"{b.get('f1', float('nan')):.3f} | {a.get('f1', float('nan')):.3f} | {r.get('train_reward', float('nan')):.3f} |")
    return "\n".join(out)


@dataclass
class MethodsConfig:
    model: str = "small"  # the student preset: small or student (PRESETS)
    methods: str = ",".join(PRESETS["small"])  # the cost rows, comma-separated
    steps: int = 2
    questions: int = 2  # questions per step
    group: int = 2
    tokens_per_turn: int = 96
    max_turns: int = 3
    threads: int = 1
    learn: bool = False  # also run the learning comparison
    learn_only: bool = False
    learn_steps: int = 4
    learn_eval: int = 10  # held-out questions
    learn_methods: str = "grpo,ovd,opd"
    skip_done: bool = False  # reuse runs already finished with the same command line
    out: str = "results/methods"


def parse_args(argv: list[str]) -> MethodsConfig:

    from benchmarks.eval import typed_config

    a: MethodsConfig = typed_config(argv, MethodsConfig, {"model": PRESETS})
    return a


def run_cost(a: MethodsConfig, common: list[str], out: Path) -> list[dict]:
    """The cost rows: each of ``methods`` for ``steps`` steps, no evaluation (``ovd-remote``
    with the teacher behind a model server started here)."""
    labels = [m for m in a.methods.split(",") if m]
    unknown = [m for m in labels if m not in PRESETS[a.model]]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(PRESETS[a.model])}")
    server = None
    if "ovd-remote" in labels:
        from agents.openai_server import ModelServerProcess

        server = ModelServerProcess("teacher", extra_args=["--threads", str(a.threads)], startup_timeout=600).start()
    rows = []
    from tqdm import tqdm

    for label in tqdm(labels, desc="methods", unit="method"):
        overrides, teacher = PRESETS[a.model][label]
        r = run_method(label, overrides, common, out / "cost", server.url if server else None, a.skip_done)
        r["teacher"] = teacher
        rows.append(r)
        tqdm.write(f"{label}: " + (f"peak {r['peak_rss_mb']:.0f} MB, {r['s_per_step']:.1f} s/step" if "error" not in r else "FAILED"))
    if server is not None:
        server.stop()
    return rows


def run_learn(a: MethodsConfig, out: Path) -> dict:
    """The learning rows: each of ``learn_methods`` for ``learn_steps`` steps, held-out EM/F1
    before (evaluated once, with the first method, and shared) and after."""
    lc = [f"model={a.model}", f"steps={a.learn_steps}", f"questions_per_step={a.questions}", f"group_size={a.group}",
          f"max_tokens_per_turn={a.tokens_per_turn}", f"env.max_turns={a.max_turns}", f"threads={a.threads}", "progress=false",
          f"eval.questions={a.learn_eval}", "tensorboard=false"]
    rows = []
    for k, label in enumerate(m for m in a.learn_methods.split(",") if m):
        overrides, teacher = PRESETS[a.model][label]
        # the before-evaluation is greedy with the same initial model and questions for every
        # method: run it once (with the first method) and share it
        before = [] if k == 0 or "error" in rows[0] else ["eval.before=false"]
        r = run_method(label, overrides, lc + before, out / "learn", None, a.skip_done)
        if before and "error" not in r:
            r["eval_before"] = rows[0]["eval_before"]
        if "error" not in r:
            lines = [json.loads(x) for x in (out / "learn" / label / "metrics.jsonl").read_text().splitlines()]
            r["train_reward"] = sum(x["reward"] for x in lines) / len(lines)
        r["teacher"] = teacher
        rows.append(r)
    return {"settings": lc, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else list(argv))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"model={a.model}", f"steps={a.steps}", f"questions_per_step={a.questions}", f"group_size={a.group}",
              f"max_tokens_per_turn={a.tokens_per_turn}", f"env.max_turns={a.max_turns}", f"threads={a.threads}", "progress=false", "eval.before=false",
              "eval.after=false", "tensorboard=false"]
    report: dict = {"model": a.model, "settings": common}
    if not a.learn_only:
        report["cost"] = rows = run_cost(a, common, out)
        print(f"\n## Training-side cost, model={a.model} ({a.steps} steps of {a.questions}x{a.group} episodes)\n")
        print(cost_table(rows))
    if a.learn or a.learn_only:
        report["learn"] = run_learn(a, out)
        print(f"\n## Learning comparison, model={a.model}, {a.learn_steps} steps, {a.learn_eval} held-out questions\n")
        print(learn_table(report["learn"]["rows"]))
    tmp = out / "methods.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out / "methods.json")
    print(f"\nwrote {out / 'methods.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
