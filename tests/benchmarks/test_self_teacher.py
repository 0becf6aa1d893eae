"""The self-teacher diagnostic on a tiny random model: per trajectory, the student's and the
privileged self-teacher's entropies on the same answer tokens, their JSD and the argmax match."""
import math

import gymnasium as gym
import pytest

import envs  # noqa: F401
from agents.hf_policy import TransformersPolicy
from agents.models import tiny_random_model
from benchmarks.self_teacher import main, measure


def test_measure_compares_plain_and_privileged_prompts_on_the_same_tokens():
    model, tok = tiny_random_model("small", seed=0)
    env = gym.make("Math-GSM8K-train-v0").unwrapped
    recs = [{"question_id": "gsm8k_train_0", "actions": ["She sold 48 / 2 = 24 in May, so 48 + 24 = \\boxed{72}."]}]
    res = measure(model.eval(), TransformersPolicy(model, tok), env, recs, beta=0.5, max_tokens=12)
    row = res["trajectories"][0]
    assert row["tokens"] == 12  # max_tokens cuts the answer
    assert row["entropy_student"] > 0 and row["entropy_privileged"] > 0
    assert row["entropy_student"] != row["entropy_privileged"]  # the privileged prompt changes the distribution
    assert row["jsd"] > 0 and 0.0 <= row["privileged_argmax_is_sampled"] <= 1.0
    assert res["mean"]["jsd"] == pytest.approx(row["jsd"]) and all(math.isfinite(v) for v in res["mean"].values())


def test_a_step_that_was_not_logged_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("model: {name: tiny}\nenv: {id: Math-v0}\n")
    with pytest.raises(SystemExit, match="step_000009.jsonl does not exist"):
        main([f"run={tmp_path}", "step=9"])
