"""Teacher feedback at inference (``python -m benchmarks.eval ... feedback=true``).

The OVD paper reports its web-QA numbers *with teacher feedback at inference*: the same
score-and-continue loop as in training runs at evaluation time. Per chunk of questions:

1. the student answers alone (greedy) - its record goes to ``<dataset>.jsonl`` as in a plain
   eval, so the student-alone numbers come from the very same episodes;
2. the teacher scores each turn prefix (``distill.verbal``); from the first turn scoring below
   ``threshold`` the teacher acts on (greedy) - the mixed record goes to
   ``<dataset>.feedback.jsonl`` with ``teacher_turns`` and ``replaced_from_turn``.

The summary reports both, and the share of all turns the teacher took, so that a with-feedback
number is never mistaken for the student's own. Questions with both records are skipped on a
rerun (a killed run resumes).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def build_teacher(spec: str, dtype: str = "float32"):
    """A teacher for ``teacher=``: an embedded/local model name, or an OpenAI-compatible URL
    (``http://host:port/v1`` or ``...#model``)."""
    from distill.teachers import HttpTeacherConfig, LocalTeacherConfig, make_teacher

    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        return make_teacher(HttpTeacherConfig(url=url, name=model))
    return make_teacher(LocalTeacherConfig(name=spec, dtype=dtype))


def run_feedback(policy, teacher, make_env, questions: list[dict], name: str, out: Path, sampling, cfg, bar=None) -> dict:
    """Student-alone and with-feedback episodes for ``questions``; returns the two summaries and
    the teacher's share of turns."""
    from agents.rollout import rollout
    from benchmarks.eval import episode_record, read_done, summarise
    from distill.methods.ovd import continue_with_teacher, score_prefixes
    from distill.teachers.act import teacher_actor
    from distill.verbal import GraderConfig

    grader = GraderConfig()
    alone_path, fb_path = out / f"{name}.jsonl", out / f"{name}.feedback.jsonl"
    alone, fb = read_done(alone_path), read_done(fb_path)
    todo = [] if cfg.summarise_only else [q for q in questions if q["id"] not in fb]

    def roll(pol, opts, g=1):
        return rollout(pol, make_env, opts, g, sampling, cfg.max_tokens_per_turn, cfg.max_total_tokens, with_privileged=True,
                       batch_size=cfg.batch_size, schedule="lockstep" if pol is not policy else cfg.schedule)

    step = max(1, cfg.batch_size)
    for a in range(0, len(todo), step):
        chunk = todo[a : a + step]
        trajs = roll(policy, [{"question_id": q["id"]} for q in chunk])
        _, cuts, dropped, _ = score_prefixes(trajs, teacher, grader, cfg.threshold, seed=cfg.seed)
        cut_at = {i: c for i, c in enumerate(cuts) if c is not None and i not in dropped}
        actor = teacher_actor(teacher, policy, getattr(policy, "tokenizer", None))
        mixed = continue_with_teacher(trajs, cut_at, actor, policy, roll, temperature=0.0)
        for i, t in enumerate(trajs):
            rec = episode_record(t, name)
            if t.question_id not in alone:
                _append(alone_path, rec)
                alone[t.question_id] = rec
            m = mixed.get(i, t)
            frec = episode_record(m, name)
            frec["replaced_from_turn"] = cut_at.get(i)
            frec["teacher_turns"] = len(m.actions) - cut_at[i] if i in cut_at else 0
            frec["grader_dropped"] = i in dropped
            _append(fb_path, frec)
            fb[t.question_id] = frec
            if bar is not None:
                bar.update(1)
    ids = [q["id"] for q in questions]
    a_recs, f_recs = [alone[i] for i in ids if i in alone], [fb[i] for i in ids if i in fb]
    turns = sum(r["turns"] for r in f_recs)
    return {"student_alone": summarise(a_recs), "with_feedback": summarise(f_recs),
            "teacher_turn_share": sum(r["teacher_turns"] for r in f_recs) / max(turns, 1),
            "replaced_episodes": sum(r["replaced_from_turn"] is not None for r in f_recs),
            "threshold": cfg.threshold, "teacher": cfg.teacher}


def _append(path: Path, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def table(fb: dict[str, dict]) -> str:
    head = ("| dataset | episodes | student EM | student F1 | with feedback EM | with feedback F1 | teacher's share of turns | episodes the teacher entered |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = [f"| {d} | {s['with_feedback']['episodes']} | {s['student_alone']['em']:.3f} | {s['student_alone']['f1']:.3f} | "
            f"{s['with_feedback']['em']:.3f} | {s['with_feedback']['f1']:.3f} | {s['teacher_turn_share']:.3f} | {s['replaced_episodes']} |"
            for d, s in fb.items() if s["with_feedback"].get("episodes")]
    return "\n".join([head, *rows])
