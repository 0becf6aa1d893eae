"""The learning benchmark end to end on the tiny random model: two phases per method, held-out
evaluations before / mid / after, a resumed call that finds everything done, the JSON of the
stated form and the PNG."""
import pytest
import json

from benchmarks.learning import main


@pytest.mark.slow
def test_learning_benchmark_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "learning"
    args = ["methods=grpo", "steps=2", "questions_per_step=1", "group_size=2", "heldout=2", "model=tiny", "threads=1",
            f"out={out}", "extra=max_tokens_per_turn=8 max_total_tokens=96 env.max_turns=2",
            "eval_extra=max_tokens_per_turn=8 max_turns=2"]
    assert main(args) == 0
    res = json.loads((out / "learning.json").read_text())
    m = res["methods"]["grpo"]
    assert m["steps"] == 2 and [x["step"] for x in m["curve"]] == [1, 2]
    for phase in ("before", "mid", "after"):
        assert m["heldout"][phase]["n"] == 2 and m["heldout"][phase]["complete"]
    assert {"reward", "answered", "invalid_action_rate", "seconds_rollout", "peak_anon_mb", "logprob_drift"} <= set(m["curve"][0])
    assert res["settings"]["steps"] == 2
    assert (out / "learning.png").stat().st_size > 0 and "grpo" in (out / "README.md").read_text()
    stamp = (out / "runs" / "grpo" / "metrics.jsonl").stat().st_mtime
    assert main(args) == 0  # everything done: nothing retrained
    assert (out / "runs" / "grpo" / "metrics.jsonl").stat().st_mtime == stamp


@pytest.mark.slow
def test_learning_benchmark_on_math_holds_out_gsm8k_test(tmp_path):
    out = tmp_path / "learning_math"
    args = ["env=math", "methods=grpo", "steps=1", "questions_per_step=1", "group_size=2", "heldout=2", "model=tiny",
            "threads=1", "midpoint=false", f"out={out}", "extra=env.max_tokens_per_turn=8 max_total_tokens=64",
            "eval_extra=max_tokens_per_turn=8"]
    assert main(args) == 0
    res = json.loads((out / "learning.json").read_text())
    m = res["methods"]["grpo"]
    assert m["steps"] == 1 and m["heldout"]["mid"] is None  # midpoint=false: no midpoint evaluation
    for phase in ("before", "after"):
        assert m["heldout"][phase]["n"] == 2 and m["heldout"][phase]["complete"]
    recs = [json.loads(x) for x in (out / "runs" / "grpo" / "trajectories" / "step_000001.jsonl").read_text().splitlines()]
    assert recs and all(r["question_id"].startswith("gsm8k_train_") for r in recs)  # trains on GSM8K train
    held = [json.loads(x) for x in (out / "heldout" / "before" / "gsm8k.jsonl").read_text().splitlines()]
    assert sorted(r["question_id"] for r in held) == ["gsm8k_test_0", "gsm8k_test_1"]  # held out: GSM8K test
    assert "GSM8K test" in (out / "README.md").read_text()


def test_learning_benchmark_names_an_unknown_env(tmp_path):
    with pytest.raises(SystemExit, match="unknown env 'maths'"):
        main(["env=maths", f"out={tmp_path}"])
