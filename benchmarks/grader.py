"""How well a verbal grader (``distill.verbal``) separates good search-agent trajectories from bad.

A teacher scores each recorded trajectory 0-9 (whole trajectory, final answer included); the
score is compared with the trajectory's outcome. The recorded set is built once from episode
records of ``benchmarks.eval`` (model runs such as ``python -m benchmarks.eval model=student
datasets=hotpotqa,nq out=results/grader/runs/student``; the scripted agents are run by ``build``
itself through the same code path into ``runs_dir/<agent>``):

    python -m benchmarks.grader build runs=results/grader/runs/student,results/grader/runs/teacher scripted=oracle,baseline datasets=hotpotqa,nq limit=100

The committed set (300 trajectories) was built with

    python -m benchmarks.eval model=student datasets=hotpotqa,nq limit=75 out=results/grader/runs/student threads=2
    python -m benchmarks.eval model=teacher datasets=hotpotqa,nq limit=15 out=results/grader/runs/teacher threads=2
    python -m benchmarks.grader build limit=30

It writes ``results/grader/recorded.jsonl.gz`` (sorted by source, dataset, question id; each
record keeps question, gold_answers, actions, observations, answer, source, dataset,
question_id, em, f1) and prints its composition. A source is a results folder; its name is the
folder's name. Only the ``datasets`` named are taken from any source.

    python -m benchmarks.grader                                   # every config, the embedded teacher
    python -m benchmarks.grader configs=default,rubric_digit teacher=student,tiny limit=50
    python -m benchmarks.grader teacher=http://host:8000/v1#Qwen2.5-7B-Instruct batch_size=16

``configs``: short names of ``CONFIGS``; ``teacher``: a comma list of local teacher names
(``teacher``, ``student``, ``tiny``) or OpenAI-compatible endpoints (``URL#model``); each
teacher is run with each config. ``limit=N`` takes N records in the order of their content hash
(a deterministic spread over sources and datasets). Per row:

* ``auroc``: of the score against EM == 1 (Mann-Whitney U with average ranks: a tie counts 1/2);
* ``spearman``: rank correlation of score and F1 (average ranks for ties);
* ``ties``: the share of *pairs* of scored trajectories whose scores are equal
  (sum_v c_v (c_v - 1) / (n (n - 1)), c_v = trajectories with score v): the pairs AUROC cannot order;
* ``n`` scored, ``dropped`` (no parseable score after retries: left out, never scored 0),
  ``sec_per_score`` (teacher wall time / scores asked), ``fallbacks`` (expected read-out fell back
  to the parsed digit), ``failed`` / ``unparseable`` replies, mean score by EM, and per source.

Scores are cached by (teacher, grader config and prompt text, trajectory content) in
``results/grader/scores/*.jsonl``, one line per teacher batch, appended as computed: a killed run
resumes where it stopped and a rerun loads no teacher when everything is cached. Writes
``results/grader/summary.json`` = ``{"default": row, "configs": [row, ...]}`` where ``default`` is
``GraderConfig()`` with the first teacher listed (null if ``configs`` leaves it out), plus the
set's path and size and the code version; prints a markdown table.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from agents.models import resolve_dtype
from benchmarks.eval import code_version, parse_config
from common.files import atomic_write_bytes, atomic_write_json
from distill.verbal import PROMPTS, SYSTEM, GraderConfig, grade, render

CONFIGS: dict[str, GraderConfig] = {
    "default": GraderConfig(),  # answer_match, expected digit, gold shown
    "answer_first": GraderConfig(prompt="answer_first", readout="expected"),  # the default before answer_match
    "rubric_digit": GraderConfig(prompt="rubric", readout="digit"),  # ovd's grader before this benchmark
    "answer_first_digit": GraderConfig(prompt="answer_first", readout="digit"),
    "rubric_expected": GraderConfig(prompt="rubric", readout="expected"),
    "answer_first_nogold": GraderConfig(prompt="answer_first", readout="expected", show_gold=False),
    "answer_match_digit": GraderConfig(prompt="answer_match", readout="digit"),
}
SCRIPTED = ("oracle", "baseline")
KEEP = ("question_id", "dataset", "question", "gold_answers", "actions", "observations", "answer", "em", "f1")


@dataclass
class BuildConfig:
    runs: str | None = "results/grader/runs/student,results/grader/runs/teacher"  # benchmarks.eval out= folders
    scripted: str | None = "oracle,baseline"  # agents run here, into runs_dir/<agent>
    datasets: str = "hotpotqa,nq"
    limit: int = 100  # questions per dataset for the scripted agents
    runs_dir: str = "results/grader/runs"
    out: str = "results/grader/recorded.jsonl.gz"
    min_records: int = 300


@dataclass
class MeasureConfig:
    configs: str = ",".join(CONFIGS)
    teacher: str = "teacher"
    limit: int | None = None
    batch_size: int = 4  # trajectories per teacher call (a local teacher's forward batch)
    dtype: str = "float32"
    seed: int = 0
    recorded: str = "results/grader/recorded.jsonl.gz"
    out: str = "results/grader"


# -- rank statistics ---------------------------------------------------------------------------
def average_ranks(xs: list[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """P(score of a positive > score of a negative) + P(tie) / 2; None without both classes."""
    pos = sum(labels)
    neg = len(labels) - pos
    if not pos or not neg:
        return None
    r = average_ranks(scores)
    return (sum(x for x, y in zip(r, labels) if y) - pos * (pos + 1) / 2) / (pos * neg)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation of the average ranks; None when either side is constant."""
    rx, ry = average_ranks(xs), average_ranks(ys)
    mx, my = sum(rx) / len(rx) if rx else 0, sum(ry) / len(ry) if ry else 0
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else None


def tie_share(scores: list[float]) -> float | None:
    """The fraction of pairs with equal scores; None below two scores."""
    n = len(scores)
    if n < 2:
        return None
    return sum(c * (c - 1) for c in Counter(scores).values()) / (n * (n - 1))


# -- files -------------------------------------------------------------------------------------
def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Whole lines up to the first torn one (a killed writer); ``repair`` cuts the file there."""
    out, good = [], 0
    if not path.exists():
        return out
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                break
            good += len(raw)
    if repair and good != path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return out


def load_recorded(path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _split(spec: str) -> list[str]:
    return [x.strip() for x in str(spec or "").split(",") if x.strip()]


# -- the recorded set --------------------------------------------------------------------------
def build(cfg: BuildConfig) -> list[dict]:
    from benchmarks.eval import main as eval_main

    datasets = _split(cfg.datasets)
    dirs = [Path(d) for d in _split(cfg.runs)]
    for agent in _split(cfg.scripted):
        out = Path(cfg.runs_dir) / agent
        if eval_main([f"model={agent}", f"datasets={','.join(datasets)}", f"limit={cfg.limit}", f"out={out}"]) != 0:
            raise SystemExit(f"error: the scripted {agent} eval failed")
        dirs.append(out)
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):
        raise SystemExit(f"error: two sources share a folder name: {names}")
    recs = []
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"error: no eval results in {d} (python -m benchmarks.eval ... out={d})")
        for ds in datasets:
            path = d / f"{ds}.jsonl"
            if not path.exists():
                print(f"note: {path} is missing; source {d.name} has no {ds}")
            recs += [{"source": d.name, **{k: r.get(k) for k in KEEP}} for r in read_jsonl(path)]
    recs.sort(key=lambda r: (r["source"], r["dataset"], str(r["question_id"])))
    if len(recs) < cfg.min_records:
        raise SystemExit(f"error: {len(recs)} trajectories, fewer than min_records={cfg.min_records}")
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in recs)
    atomic_write_bytes(Path(cfg.out), gzip.compress(text.encode("utf-8"), mtime=0))
    groups = defaultdict(list)
    for r in recs:
        groups[(r["source"], r["dataset"])].append(r)
    print("| source | dataset | n | EM | F1 |\n|---|---|---|---|---|")
    for (src, ds), g in [*groups.items(), (("all", "all"), recs)]:
        em, f1 = (sum(float(r[k] or 0) for r in g) / len(g) for k in ("em", "f1"))
        print(f"| {src} | {ds} | {len(g)} | {em:.3f} | {f1:.3f} |")
    print(f"\nwrote {cfg.out} ({len(recs)} trajectories)")
    return recs


# -- the measurement ---------------------------------------------------------------------------
def record_key(r: dict) -> str:
    """A hash of what any grader may see of a trajectory: equal content shares one score."""
    seen = [r["question"], r["gold_answers"], r["actions"], r["observations"], r["answer"]]
    return hashlib.sha1(json.dumps(seen, ensure_ascii=False).encode()).hexdigest()[:16]


def cache_path(out: Path, teacher: str, gc: GraderConfig, dtype: str = "float32") -> Path:
    """The score cache of one (teacher, grader config, dtype of a local teacher); float32 adds
    nothing to the hash, so the caches written before the dtype counted keep their names."""
    local_dtype = "" if teacher.startswith(("http://", "https://")) else resolve_dtype(dtype)
    key = [teacher, asdict(gc), SYSTEM, PROMPTS[gc.prompt]] + ([local_dtype] if local_dtype not in ("", "float32") else [])
    tag = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", teacher).strip("_")
    return out / "scores" / f"{slug}-{gc.prompt}-{'gold' if gc.show_gold else 'nogold'}-{gc.readout}-{tag}.jsonl"


def make_named_teacher(spec: str, cfg: MeasureConfig):
    from distill.teachers import HttpTeacherConfig, LocalTeacherConfig, make_teacher

    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        return make_teacher(HttpTeacherConfig(url=url, name=model))
    return make_teacher(LocalTeacherConfig(name=spec, dtype=cfg.dtype, batch_size=cfg.batch_size))


def score_all(records: list[dict], keys: list[str], teacher_spec: str, gc: GraderConfig, cfg: MeasureConfig, teachers: dict):
    """(score by key, cache lines) for ``records``; what the cache lacks is scored and appended."""
    from tqdm.auto import tqdm

    path = cache_path(Path(cfg.out), teacher_spec, gc, cfg.dtype)
    lines = read_jsonl(path, repair=True)
    scores = {k: s for line in lines for k, s in zip(line["keys"], line["scores"])}
    todo = list(dict.fromkeys(k for k in keys if k not in scores))
    if not todo:
        return scores, lines
    if teacher_spec not in teachers:
        teachers[teacher_spec] = make_named_teacher(teacher_spec, cfg)
    teacher = teachers[teacher_spec]
    by_key = dict(zip(keys, records))
    bs = getattr(teacher, "batch_size", cfg.batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh, tqdm(total=len(keys), initial=len(keys) - len(todo), unit="traj",
                                                        desc=f"{teacher_spec} {path.stem}") as bar:
        for i in range(0, len(todo), bs):
            chunk = todo[i : i + bs]
            msgs = [render(r["question"], r["gold_answers"], r["actions"], r["observations"], r["answer"], None, gc)
                    for r in (by_key[k] for k in chunk)]
            t0 = time.perf_counter()
            got, counts = grade(teacher, msgs, gc, seed=cfg.seed)
            line = {"keys": chunk, "scores": got, "seconds": round(time.perf_counter() - t0, 4), "counts": counts}
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            lines.append(line)
            scores.update(zip(chunk, got))
            bar.update(len(chunk))
    return scores, lines


def _r(x):
    return None if x is None else round(x, 4)


def metrics(records: list[dict], scores: list[float | None]) -> dict:
    kept = [(r, s) for r, s in zip(records, scores) if s is not None]
    s = [x for _, x in kept]
    em = [float(r["em"] or 0) >= 1 for r, _ in kept]
    f1 = [float(r["f1"] or 0) for r, _ in kept]
    mean = lambda xs: _r(sum(xs) / len(xs)) if xs else None  # noqa: E731
    return {"n": len(kept), "dropped": len(records) - len(kept), "auroc": _r(auroc(s, em)), "spearman": _r(spearman(s, f1)),
            "ties": _r(tie_share(s)), "em": mean([float(y) for y in em]),
            "mean_score_em1": mean([x for x, y in zip(s, em) if y]), "mean_score_em0": mean([x for x, y in zip(s, em) if not y])}


def measure(cfg: MeasureConfig) -> dict:
    names, teacher_specs = _split(cfg.configs), _split(cfg.teacher)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names or not teacher_specs:
        raise SystemExit(f"error: unknown or no configs {unknown or names}; choose from {list(CONFIGS)}; and name a teacher")
    records = load_recorded(cfg.recorded)
    if cfg.limit:
        records = sorted(records, key=record_key)[: cfg.limit]
    keys = [record_key(r) for r in records]
    wanted = set(keys)
    rows = []
    for spec in teacher_specs:
        teachers: dict = {}  # built on the first miss of the cache, dropped after this teacher's configs
        for name in names:
            gc = CONFIGS[name]
            by_key, lines = score_all(records, keys, spec, gc, cfg, teachers)
            used = [ln for ln in lines if wanted.intersection(ln["keys"])]  # the batches that scored this selection
            asked = sum(len(ln["keys"]) for ln in used)
            count = lambda c: sum(ln["counts"].get(c, 0) for ln in used)  # noqa: E731
            row = {"name": name, "teacher": spec, "prompt": gc.prompt, "show_gold": gc.show_gold, "readout": gc.readout,
                   **metrics(records, [by_key[k] for k in keys]),
                   "sec_per_score": _r(sum(ln["seconds"] for ln in used) / asked) if asked else None,
                   "fallbacks": count("score_fallback"), "failed": count("teacher_failed"), "unparseable": count("teacher_unparseable")}
            # the models' own trajectories only: the scripted oracle (always right) against the
            # scripted baseline (almost always wrong) is an easy split that flatters the whole-set AUROC
            models = [i for i, r in enumerate(records) if r["source"] not in SCRIPTED]
            row["models_only"] = metrics([records[i] for i in models], [by_key[keys[i]] for i in models])
            row["by_source"] = {}
            for src in sorted({r["source"] for r in records}):
                mine = [i for i, r in enumerate(records) if r["source"] == src]
                row["by_source"][src] = metrics([records[i] for i in mine], [by_key[keys[i]] for i in mine])
            rows.append(row)
    default = next((r for r in rows if r["name"] == "default" and r["teacher"] == teacher_specs[0]), None)
    summary = {"default": default, "configs": rows, "recorded": str(cfg.recorded), "records": len(records),
               "code_version": code_version()}
    atomic_write_json(Path(cfg.out) / "summary.json", summary)
    fmt = lambda x: "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)  # noqa: E731
    print("\n| config | teacher | prompt | gold | readout | n | AUROC | Spearman | ties | AUROC, models only (n) | s/score | fallback | dropped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cols = ("name", "teacher", "prompt", "show_gold", "readout", "n", "auroc", "spearman", "ties")
        mo = f"{fmt(r['models_only']['auroc'])} ({r['models_only']['n']})"
        print("| " + " | ".join(fmt(r[c]) for c in cols) + f" | {mo} | " + " | ".join(fmt(r[c]) for c in ("sec_per_score", "fallbacks", "dropped")) + " |")
    print(f"\nwrote {Path(cfg.out) / 'summary.json'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["build"]:
        build(parse_config(argv[1:], BuildConfig))
    else:
        measure(parse_config(argv, MeasureConfig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
