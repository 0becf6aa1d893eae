"""benchmarks.continuation_speed on a logged step of a tiny ovd run: both schedules replay the
same cuts and write teacher tokens, the JSON's ratio is the same run's tokens per second, and
runs it cannot measure are refused by name."""
import json

import pytest

from benchmarks.continuation_speed import main

TRAIN = ["model=tiny", "method=ovd", "method.threshold=10", "teacher=teacher", "teacher.name=tiny",
         "env.id=WebQA-HotpotQA-train-v0", "steps=1", "questions_per_step=2", "group_size=2", "max_tokens_per_turn=8",
         "max_total_tokens=300", "eval.questions=0", "progress=false", "tensorboard=false", "threads=1"]


@pytest.fixture(scope="module")
def ovd_run(tmp_path_factory):
    from distill.run import main as train

    run = tmp_path_factory.mktemp("ovd") / "run"
    assert train([*TRAIN, f"output_dir={run}"]) == 0  # threshold 10: every first turn is rejected
    return run


def test_both_schedules_continue_the_replaced_trajectories(ovd_run, tmp_path, capsys):
    assert main([f"run={ovd_run}", "step=1", "threads=1", f"out={tmp_path}"]) == 0
    res = json.loads((tmp_path / "continuation_speed.json").read_text())
    assert res["trajectories"] == 4 and res["cuts"] == [0, 0, 0, 0]
    for schedule in ("lockstep", "continuous"):
        (x,) = res["rounds"][schedule]
        assert x["teacher_tokens"] > 0 and x["teacher_turns"] >= 4
        assert x["tokens_per_s"] == pytest.approx(x["teacher_tokens"] / x["seconds"], rel=2e-2)
    tps = res["tokens_per_s"]
    assert res["ratio_continuous_over_lockstep"] == pytest.approx(tps["continuous"] / tps["lockstep"], abs=2e-3)
    assert "continuous / lockstep tokens per second" in capsys.readouterr().out


def test_refuses_a_missing_step_and_a_run_that_is_not_ovd_replace(ovd_run, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main([f"run={ovd_run}", "step=7", f"out={tmp_path}"])
    other = tmp_path / "reward"
    other.mkdir()
    (other / "trajectories").mkdir()
    (other / "trajectories" / "step_000001.jsonl").write_text((ovd_run / "trajectories" / "step_000001.jsonl").read_text())
    (other / "config.yaml").write_text((ovd_run / "config.yaml").read_text().replace("mode: replace", "mode: reward"))
    with pytest.raises(SystemExit, match="not an ovd mode=replace run"):
        main([f"run={other}", "step=1", f"out={tmp_path}"])
