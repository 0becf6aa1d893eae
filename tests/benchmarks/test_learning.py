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
    from benchmarks.eval import code_version

    assert m["code"] == [code_version()]  # the code each training call ran with, from its log
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


def test_paired_counts_flips_and_the_exact_mcnemar_p(tmp_path):
    from benchmarks.learning import mcnemar_exact, paired

    assert mcnemar_exact(9, 1) == pytest.approx(2 * (1 + 10) / 2 ** 10)  # P(<= 1 of 10 fair flips), both tails
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 20) < 1e-5
    rows = {"before": [(1, 1.0), (0, 0.0), (0, 0.5), (0, 0.0)], "after": [(0, 0.5), (1, 1.0), (1, 1.0), (0, 0.0)]}
    for label, recs in rows.items():
        (tmp_path / label).mkdir()
        lines = [json.dumps({"question_id": f"q{i}", "sample": 0, "em": em, "f1": f1}) for i, (em, f1) in enumerate(recs)]
        (tmp_path / label / "hotpotqa.jsonl").write_text("\n".join(lines) + "\n")
    d = paired(tmp_path / "before", tmp_path / "after", "hotpotqa")
    assert (d["n"], d["em_up"], d["em_down"], d["f1_up"], d["f1_down"]) == (4, 2, 1, 2, 1)
    assert d["f1_gain"] == pytest.approx((-0.5 + 1.0 + 0.5 + 0.0) / 4)
    (tmp_path / "after" / "hotpotqa.jsonl").write_text("\n".join(lines[:2]) + "\n")  # an unfinished evaluation: no pairing
    assert paired(tmp_path / "before", tmp_path / "after", "hotpotqa") is None
