"""ovd's teacher continuations on a lockstep and on a continuous decode batch, in one run.

    python -m benchmarks.continuation_speed run=results/learning/runs/ovd step=3

ovd (``method.mode=replace``) keeps a student's turns up to the first one its teacher scores
below the threshold; from there the teacher acts in the env until the episode ends. This reads
the trajectories a run logged at ``step`` and, for each one ovd replaced (``replaced_from_turn``),
replays the student's kept turns (its logged actions, tokenised again) and lets the run's teacher
act on from there, exactly as ``distill.methods.ovd.continue_with_teacher`` does, once per
schedule:

* ``lockstep``: one batched ``generate`` per turn, so every teacher turn lasts as long as its
  longest row (how continuations ran before the exact-ids actor had a continuous scheduler);
* ``continuous``: the teacher's continuous scheduler (``agents.schedulers``): a row whose turn
  ends leaves the decode batch and rejoins, observation prefilled, while the others decode.

The two alternate ``repeats`` times with the same seed. Prints a table and writes
``OUT/continuation_speed.json``: seconds, teacher tokens, tokens per second per schedule, and
the ratio measured in the same run. It measures; it asserts nothing. Teacher turns are sampled
(the run's ``teacher_temperature``), so the two schedules write different tokens; tokens per
second is the comparison.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace


@dataclass
class ContinuationSpeedConfig:
    run: str = "results/learning/runs/ovd"
    step: int = 3
    limit: int = 0  # the first `limit` replaced trajectories of the step (0: all)
    repeats: int = 1
    seed: int = 0
    threads: int = 2
    out: str = "results/continuation_speed"


def replayed_turns(student, recs: list[dict]):
    """Per replaced record: its question, the turn ovd cut at, and its kept turns as Completions
    (the logged actions tokenised with the student's tokenizer)."""
    from agents.policy import Completion

    rows = []
    for r in recs:
        cut = int(r["replaced_from_turn"])
        forced = []
        for action in r["actions"][:cut]:
            ids = student.encode(action)
            forced.append(Completion(ids, [0.0] * len(ids), student.decode(ids), "stop"))
        rows.append({"question_id": r["question_id"], "cut": cut, "forced": forced})
    return rows


def continue_once(rows, actor, student, make_env, conf: dict, schedule: str, seed: int) -> dict:
    from agents.policy import SamplingParams
    from agents.rollout import SOURCE_TEACHER, rollout
    from distill.teachers.act import PrefixPolicy

    policy = PrefixPolicy(student, actor, {e: r["forced"] for e, r in enumerate(rows)},
                          temperature=conf["method"].get("teacher_temperature", 0.7))
    per_turn = conf["env"].get("max_tokens_per_turn") or conf["max_tokens_per_turn"]  # as distill.train reads it
    t0 = time.perf_counter()
    trajs = rollout(policy, make_env, [{"question_id": r["question_id"]} for r in rows], 1, SamplingParams(seed=seed),
                    per_turn, conf["max_total_tokens"], seed=seed, schedule=schedule)
    seconds = time.perf_counter() - t0
    tokens = sum(t.sources.count(SOURCE_TEACHER) for t in trajs)
    turns = sum(len(t.actions) - r["cut"] for t, r in zip(trajs, rows))
    return {"schedule": schedule, "seconds": round(seconds, 2), "teacher_tokens": tokens, "teacher_turns": turns,
            "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0}


def main(argv: list[str] | None = None) -> int:
    import torch
    import yaml

    import envs  # noqa: F401
    from agents.models import load_named_tokenizer
    from agents.policy import TokenizerPolicy
    from benchmarks.eval import code_version, typed_config
    from common.files import atomic_write_json
    from distill.teachers import BACKENDS, make_teacher
    from distill.teachers.act import teacher_actor
    from distill.train import make_env_factory

    cfg = typed_config(sys.argv[1:] if argv is None else argv, ContinuationSpeedConfig)
    run = Path(cfg.run)
    traj = run / "trajectories" / f"step_{cfg.step:06d}.jsonl"
    if not traj.exists():
        raise SystemExit(f"error: {traj} does not exist (run= names a run folder, step= a logged step)")
    conf = yaml.safe_load((run / "config.yaml").read_text())
    if conf["method"]["name"] != "ovd" or conf["method"].get("mode") != "replace":
        raise SystemExit(f"error: {run} is not an ovd mode=replace run")
    if conf["teacher"].get("kind") != "local":
        raise SystemExit(f"error: {run}'s teacher is {conf['teacher'].get('kind')!r}; this measures a local teacher")
    recs = [r for r in map(json.loads, traj.read_text().splitlines()) if r.get("replaced_from_turn") is not None]
    recs = recs[: cfg.limit] if cfg.limit else recs
    if not recs:
        raise SystemExit(f"error: no trajectory of step {cfg.step} was replaced")
    torch.set_num_threads(cfg.threads)
    student = TokenizerPolicy()
    name = conf["model"]["name"]
    student.tokenizer = load_named_tokenizer("small" if name == "tiny" else name)  # tiny: small's vocabulary (load_student)
    teacher = make_teacher(BACKENDS["local"].config(**conf["teacher"]))  # the run's teacher, as the trainer builds it
    actor = teacher_actor(teacher, student, student.tokenizer)
    make_env = make_env_factory(SimpleNamespace(**conf["env"]), conf["env"]["id"])
    rows = replayed_turns(student, recs)
    rounds = {"lockstep": [], "continuous": []}
    for _ in range(cfg.repeats):
        for schedule in rounds:
            teacher.policy().clear_cache()
            rounds[schedule].append(continue_once(rows, actor, student, make_env, conf, schedule, cfg.seed))
            print(json.dumps(rounds[schedule][-1]), flush=True)
    tps = {s: sum(x["teacher_tokens"] for x in rs) / sum(x["seconds"] for x in rs) for s, rs in rounds.items()}
    res = {"run": str(run), "step": cfg.step, "trajectories": len(rows), "cuts": [r["cut"] for r in rows],
           "teacher": conf["teacher"]["name"], "teacher_dtype": conf["teacher"]["dtype"], "threads": cfg.threads,
           "code": code_version(), "rounds": rounds, "tokens_per_s": {s: round(v, 2) for s, v in tps.items()},
           "ratio_continuous_over_lockstep": round(tps["continuous"] / tps["lockstep"], 3)}
    print("| schedule | seconds | teacher tokens | teacher turns | tokens/s |\n|---|---|---|---|---|")
    for s, rs in rounds.items():
        for x in rs:
            print(f"| {s} | {x['seconds']:.1f} | {x['teacher_tokens']} | {x['teacher_turns']} | {x['tokens_per_s']:.2f} |")
    print(f"continuous / lockstep tokens per second: {res['ratio_continuous_over_lockstep']:.2f}x "
          f"({len(rows)} continuations of step {cfg.step}, cut at turns {res['cuts']})")
    atomic_write_json(Path(cfg.out) / "continuation_speed.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
