"""``distill.run env=math method=M`` for every method in the table: two steps on a tiny random
model trains on GSM8K train problems, evaluates on GSM8K test, and logs finite metrics; opsd's
teacher sees the reference solution; ovd's grader sees the reference answer."""
import json
import math

import pytest

from distill.config import resolve
from distill.methods import METHODS
from distill.train import train

BASE = ["env=math", "model=tiny", "steps=2", "questions_per_step=1", "group_size=2", "env.max_tokens_per_turn=8",
        "max_total_tokens=64", "eval.questions=2", "progress=false", "threads=1", "teacher=teacher", "teacher.name=tiny"]
TEACHER = {"grpo": ["teacher=none"], "opsd": ["teacher=self"], "oprd": ["teacher.name=tiny:96x3"]}


def test_math_config_resolves_to_math_v0():
    cfg, _ = resolve(["env=math", "method=grpo"])
    assert (cfg.env.id, cfg.env.eval_id, cfg.env.max_tokens_per_turn) == ("Math-GSM8K-train-v0", "Math-v0", 400)


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m == "grpo" else pytest.mark.slow) for m in METHODS])
def test_one_math_step_per_method(tmp_path, method):
    cfg, mcfg = resolve(BASE + [f"method={method}"] + TEACHER.get(method, []))
    out = tmp_path / "run"
    train(cfg, mcfg, out, resume=False)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for line in lines:
        bad = {k: v for k, v in line.items() if isinstance(v, float) and not math.isfinite(v) and not k.startswith("teacher_score")}
        assert not bad, bad
    recs = [json.loads(x) for x in (out / "trajectories" / "step_000001.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["question_id"].startswith("gsm8k_train_") for r in recs)
    assert all(r["em"] in (0.0, 1.0) and len(r["actions"]) == 1 for r in recs)  # one answer per episode
    before = json.loads((out / "eval_before.json").read_text())
    assert before["episodes"] == 2


def test_opsd_teacher_prompt_holds_the_reference_solution():
    import gymnasium as gym

    from distill.methods.opsd import privileged_text

    env = gym.make("Math-GSM8K-train-v0").unwrapped
    prompt, _ = env.reset(options={"index": 0})
    text = privileged_text(prompt, env.privileged(), 2000)
    assert "The correct answer is: 72" in text and "Reference solution:\nNatalia sold 48/2" in text and text.endswith(prompt)


def test_ovd_grader_sees_the_reference_answer():
    from types import SimpleNamespace

    from distill.verbal import GraderConfig, render_trajectory

    tr = SimpleNamespace(question="What is 6*7?", info={"privileged": {"answers": ["42"]}}, actions=["6*7 = \\boxed{42}"],
                         observations=[""], answer="42")
    msgs = render_trajectory(tr, None, GraderConfig())
    assert "Gold answer(s): 42" in msgs[-1]["content"] and "final answer: 42" in msgs[-1]["content"]
