"""The learning benchmark: what each method does to the student, at equal budgets.

    python -m benchmarks.learning                                # every method, resumable
    python -m benchmarks.learning methods=grpo,ovd steps=12      # a subset
    python -m benchmarks.learning report_only=true               # table, JSON and PNG of what is done
    python -m benchmarks.learning env=math methods=grpo,opsd,ovd out=results/learning_math   # Math-v0 (GSM8K)

Same student (the embedded Qwen2.5-Coder-0.5B + LoRA), same embedded teacher, same training
questions (the HotpotQA train sample), same seed, same step budget (``steps`` x
``questions_per_step`` x ``group_size`` episodes) for every method. Each method trains in its own
``python -m distill.run`` process (``output_dir=OUT/runs/<method>``, ``resume=true``), first to
``steps // 2``, then to ``steps``. At step 0 (shared: the same initial student), the midpoint and
the end, the student (with that run's adapter) is evaluated greedily by ``benchmarks.eval`` -
the one evaluation function, with its defaults - on the first ``heldout`` questions of HotpotQA
dev, which no run trains on. Every phase resumes where a kill left it: training from its last
checkpoint, evaluation episode by episode; a finished phase is skipped.

Writes ``OUT/learning.json`` (``{"methods": {name: {"steps", "heldout": {"before", "mid",
"after"}, "curve": [per-step metrics]}}, "settings": {...}}``), ``OUT/learning.png`` (held-out EM
and train reward against step, every method) and ``OUT/README.md`` (the table), and prints the
table. ``dtype`` is pinned for the student's sampler (``rollout.dtype``), the embedded teacher
(``teacher.dtype``, where the method has one) and the evaluations, so a change of ``distill.run``'s
defaults cannot change a benchmark that is resumed over several days. Its default is bfloat16 (the
learner stays float32): on a CPU with AVX512-BF16 a grpo step of 4 episodes took 0.41x the float32 time (59 vs 144 s), with a mean
log-prob drift of 0.017 against the learner (``results/scaling_bf16``), and the grader's AUROC is
unchanged (``results/grader_dtype``). Where the CPU has no native bfloat16, ``dtype=float32``. The
float32 series begun before that measurement is kept in ``results/learning_float32``.

``env=math`` runs the same protocol on Math-v0: the runs train on GSM8K train (``env=math``'s
training id) and the held-out set is the first ``heldout`` problems of GSM8K test (accuracy by
math-verify, reported in the EM and F1 columns, which are equal there). ``midpoint=false`` skips
the midpoint evaluation where the budget is short.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.files import save_figure

ROOT = Path(__file__).resolve().parents[1]

# method -> distill.run overrides (the teacher is each method's default: teacher=auto)
METHODS: dict[str, list[str]] = {
    "grpo": ["method=grpo"],  # the env's EM reward (reward=auto: em for every method but ovd)
    "grpo_f1": ["method=grpo", "env.reward=f1"],  # grpo on ovd's F1 reward: what ovd's teacher adds beyond the reward
    "ovd": ["method=ovd"],  # the published default: mode=replace, F1 reward; the teacher's tokens train
    "ovd_masked": ["method=ovd", "method.train_on_teacher_tokens=false"],  # only the student's own tokens train
    "ovd_positive": ["method=ovd", "method.teacher_token_advantage=positive"],  # teacher tokens only where A > 0
    "ovd_reward": ["method=ovd", "method.mode=reward"],  # the other reading: S/9 mixed into the reward
    "opd": ["method=opd"],
    "opsd": ["method=opsd"],
    "eopd": ["method=eopd"],
    "oprd": ["method=oprd"],
}
HELDOUT = {"webqa": ("hotpotqa", "HotpotQA dev"), "math": ("gsm8k", "GSM8K test")}  # env -> (benchmarks.eval dataset, label)
LOCAL_TEACHER = {"ovd", "ovd_masked", "ovd_positive", "ovd_reward", "opd", "eopd", "oprd"}  # teacher=auto is the embedded teacher
CURVE_KEYS = ("reward", "em", "f1", "answered", "invalid_action_rate", "teacher_score_mean", "teacher_score_std", "accept_rate",
              "teacher_tokens", "replaced_turns", "loss", "logprob_drift", "sampled_tokens", "seconds", "seconds_rollout",
              "seconds_teacher", "seconds_scoring", "seconds_continuation", "seconds_update", "peak_anon_mb")


@dataclass
class LearningConfig:
    methods: str = "ovd,ovd_masked,ovd_positive,grpo,grpo_f1,opd,opsd,ovd_reward"
    steps: int = 12
    questions_per_step: int = 2
    group_size: int = 4
    heldout: int = 100
    model: str = "student"
    seed: int = 0
    threads: int = 2
    dtype: str = "bfloat16"  # the sampler's, the embedded teacher's and the evaluation's (the learner is float32)
    out: str = "results/learning"
    env: str = "webqa"  # webqa (held out: HotpotQA dev) or math (held out: GSM8K test)
    midpoint: bool = True  # evaluate at steps // 2 as well as before and after
    report_only: bool = False
    extra: str = ""  # more distill.run overrides for every method, space-separated
    eval_extra: str = ""  # more benchmarks.eval overrides (tests: smaller budgets); not for reported runs


def run(args: list[str], log: Path) -> None:
    from benchmarks.eval import code_version

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(args)}  # code {code_version()}\n")  # report() lists each run's versions
        fh.flush()
        p = subprocess.run(args, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(args)}; see {log}")


def heldout(cfg: LearningConfig, out: Path, label: str, adapter: str = "") -> dict:
    """The held-out evaluation (resumable episode by episode); its summary."""
    folder = out / "heldout" / label
    done = folder / "summary.json"
    dataset = HELDOUT[cfg.env][0]
    if done.exists():
        s = json.loads(done.read_text())
        if s["summary"].get(dataset, {}).get("episodes") == cfg.heldout:
            return s["summary"][dataset]
    args = [sys.executable, "-m", "benchmarks.eval", f"model={cfg.model}", f"datasets={dataset}", f"limit={cfg.heldout}",
            f"out={folder}", f"threads={cfg.threads}", f"seed={cfg.seed}", f"dtype={cfg.dtype}", *cfg.eval_extra.split()] + ([f"adapter={adapter}"] if adapter else [])
    folder.mkdir(parents=True, exist_ok=True)
    print(f"  held-out {label}: {cfg.heldout} questions", flush=True)
    run(args, out / "logs" / f"eval_{label}.log")
    return json.loads(done.read_text())["summary"][dataset]


def train_to(cfg: LearningConfig, out: Path, name: str, steps: int) -> None:
    run_dir = out / "runs" / name
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    if len(lines) >= steps and (run_dir / "final_adapter").exists() and json.loads(lines[-1])["step"] >= steps:
        return
    args = [sys.executable, "-m", "distill.run", f"env={cfg.env}", *METHODS[name], f"model={cfg.model}", f"steps={steps}",
            f"questions_per_step={cfg.questions_per_step}", f"group_size={cfg.group_size}", f"seed={cfg.seed}",
            f"threads={cfg.threads}", "eval.questions=0", "progress=false", "tensorboard=false", f"output_dir={run_dir}",
            "resume=true", f"rollout.dtype={cfg.dtype}", *([f"teacher.dtype={cfg.dtype}"] if name in LOCAL_TEACHER else []),
            *cfg.extra.split()]
    print(f"  {name}: training to step {steps}", flush=True)
    run(args, out / "logs" / f"train_{name}.log")


def code_versions(log: Path) -> list[str]:
    """The code versions (``git`` commit, ``+dirty`` if changed) a method's training ran with, in
    the order its log records them (a run resumed across commits lists each)."""
    import re

    seen: list[str] = []
    for v in re.findall(r"  # code (\S+)$", log.read_text(encoding="utf-8"), re.M) if log.exists() else []:
        if v not in seen:
            seen.append(v)
    return seen


def curve(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    return [{k: x[k] for k in ("step", *CURVE_KEYS) if k in x} for x in map(json.loads, p.read_text().splitlines())]


def report(cfg: LearningConfig, out: Path, names: list[str]) -> dict:
    from common.files import atomic_write_json, atomic_write_text

    dataset = HELDOUT[cfg.env][0]
    before = _summary(out / "heldout" / "before", cfg.heldout, dataset)
    res = {"methods": {}, "settings": {k: getattr(cfg, k) for k in LearningConfig.__dataclass_fields__}}
    for name in names:
        c = curve(out / "runs" / name)
        res["methods"][name] = {
            "overrides": METHODS[name], "steps": len(c), "curve": c, "code": code_versions(out / "logs" / f"train_{name}.log"),
            "heldout": {"before": before, "mid": _summary(out / "heldout" / f"{name}_mid", cfg.heldout, dataset),
                        "after": _summary(out / "heldout" / f"{name}_after", cfg.heldout, dataset)},
            "paired_after": paired(out / "heldout" / "before", out / "heldout" / f"{name}_after", dataset),
            "seconds_per_step": sum(x["seconds"] for x in c) / len(c) if c else None,
            "peak_anon_mb": max((x.get("peak_anon_mb", 0) for x in c), default=None),
        }
    atomic_write_json(out / "learning.json", res)
    table = markdown(res)
    cmd = f"methods={cfg.methods} steps={cfg.steps}" + ("" if cfg.env == "webqa" else f" env={cfg.env}")
    atomic_write_text(out / "README.md", f"# Learning benchmark\n\n`python -m benchmarks.learning {cmd}`\n\nHeld out: the first "
                      f"{cfg.heldout} questions of {HELDOUT[cfg.env][1]}.\n\n{table}\n\n"
                      "See learning.json for per-step curves, learning.png for the plot.\n")
    _plot(res, out / "learning.png", cfg.steps, HELDOUT[cfg.env][1])
    print(table)
    return res


def _summary(folder: Path, n: int, dataset: str) -> dict | None:
    p = folder / "summary.json"
    if not p.exists():
        return None
    s = json.loads(p.read_text())["summary"].get(dataset)
    return {"em": s["em"], "f1": s["f1"], "n": s["episodes"], "answered": s["answered"], "complete": s["episodes"] == n} if s else None


def _episodes(folder: Path, dataset: str) -> dict[str, dict]:
    from benchmarks.eval import read_done

    return {k: r for k, r in read_done(folder / f"{dataset}.jsonl").items() if "#" not in k}  # sample 0 of each question


def mcnemar_exact(up: int, down: int) -> float:
    """Two-sided exact McNemar test on the discordant pairs: P(a split at least this uneven of
    ``up + down`` fair coin flips)."""
    from math import comb

    n = up + down
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(min(up, down) + 1)) / 2 ** n)


def paired(before: Path, after: Path, dataset: str) -> dict | None:
    """The same held-out questions before and after, question by question: how many went from
    EM 0 to 1 (``up``) and from 1 to 0 (``down``), the exact McNemar p of that split, and the mean
    per-question F1 change with its standard error. None until both evaluations are complete."""
    a, b = _episodes(before, dataset), _episodes(after, dataset)
    if not a or a.keys() != b.keys():
        return None
    up = sum(a[q]["em"] < b[q]["em"] for q in a)
    down = sum(a[q]["em"] > b[q]["em"] for q in a)
    d = [b[q]["f1"] - a[q]["f1"] for q in a]
    mean = sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5 if len(d) > 1 else 0.0
    return {"n": len(d), "em_up": up, "em_down": down, "mcnemar_p": mcnemar_exact(up, down), "f1_gain": mean, "f1_gain_se": se,
            "f1_up": sum(x > 0 for x in d), "f1_down": sum(x < 0 for x in d)}


def markdown(res: dict) -> str:
    head = "| method | steps | EM before | EM mid | EM after | F1 before | F1 mid | F1 after | n | s/step | peak anon MB |\n|---|---|---|---|---|---|---|---|---|---|---|"
    f = lambda s, k: f"{s[k]:.3f}" if s else "-"  # noqa: E731
    rows = []
    for name, m in res["methods"].items():
        h = m["heldout"]
        n = next((s["n"] for s in (h["after"], h["mid"], h["before"]) if s), "-")
        rows.append(f"| {name} | {m['steps']} | {f(h['before'], 'em')} | {f(h['mid'], 'em')} | {f(h['after'], 'em')} | "
                    f"{f(h['before'], 'f1')} | {f(h['mid'], 'f1')} | {f(h['after'], 'f1')} | {n} | "
                    f"{m['seconds_per_step']:.0f} | {m['peak_anon_mb']:.0f} |" if m["steps"] else
                    f"| {name} | 0 | {f(h['before'], 'em')} | - | - | {f(h['before'], 'f1')} | - | - | {n} | - | - |")
    pairs = [(name, m["paired_after"]) for name, m in res["methods"].items() if m.get("paired_after")]
    if not pairs:
        return "\n".join([head, *rows])
    head2 = ("| method | questions | EM 0 -> 1 | EM 1 -> 0 | exact McNemar p | F1 gain (mean +- s.e.) | F1 up / down |\n"
             "|---|---|---|---|---|---|---|")
    rows2 = [f"| {name} | {d['n']} | {d['em_up']} | {d['em_down']} | {d['mcnemar_p']:.3f} | {d['f1_gain']:+.3f} +- {d['f1_gain_se']:.3f} | "
             f"{d['f1_up']} / {d['f1_down']} |" for name, d in pairs]
    return "\n".join([head, *rows, "", "After against before, question by question:", "", head2, *rows2])


def _plot(res: dict, path: Path, steps: int, heldout_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, m in res["methods"].items():
        pts = [(0, m["heldout"]["before"]), (steps // 2, m["heldout"]["mid"]), (steps, m["heldout"]["after"])]
        pts = [(x, s["em"]) for x, s in pts if s]
        if pts:
            a.plot(*zip(*pts), marker="o", label=name)
        if m["curve"]:
            b.plot([x["step"] for x in m["curve"]], [x["reward"] for x in m["curve"]], marker=".", label=name)
    a.set(title=f"held-out EM ({heldout_label})", xlabel="step")
    b.set(title="train reward", xlabel="step")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.eval import typed_config

    cfg = typed_config(sys.argv[1:] if argv is None else argv, LearningConfig)
    names = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; known: {sorted(METHODS)}")
    if cfg.env not in HELDOUT:
        raise SystemExit(f"error: unknown env {cfg.env!r}; known: {sorted(HELDOUT)}")
    out = Path(cfg.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if not cfg.report_only:
        t0 = time.perf_counter()
        heldout(cfg, out, "before")
        for name in names:
            for phase, steps in ((("mid", cfg.steps // 2),) if cfg.midpoint else ()) + (("after", cfg.steps),):
                train_to(cfg, out, name, steps)
                heldout(cfg, out, f"{name}_{phase}", str(out / "runs" / name / "final_adapter"))
            print(f"{name}: done ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    report(cfg, out, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
