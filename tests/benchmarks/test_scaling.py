"""The scaling benchmark end to end on the tiny model (the transformers and 2-rank cases; the vLLM
case needs vLLM's venv): real runs, the table, JSON and PNG, and a second call that resumes
instead of rerunning."""
import json

import pytest

from benchmarks.scaling import main, summarize

pytestmark = pytest.mark.slow


def test_scaling_cases_run_and_report(tmp_path, capsys):
    out = tmp_path / "scaling"
    args = ["cases=transformers,ranks2,bf16", "model=tiny", "steps=2", "questions_per_step=2", "group_size=2", f"out={out}",
            "extra=max_tokens_per_turn=8 max_total_tokens=160 env.max_turns=2"]
    assert main(args) == 0
    res = json.loads((out / "scaling.json").read_text())
    for case in ("transformers", "ranks2", "bf16"):
        s = res["cases"][case]["summary"]
        assert s["steps"] == 2 and s["steps_averaged"] == 1
        assert s["s_per_step"] > 0 and s["rollout_tokens_per_s"] > 0
        assert res["cases"][case]["lines"][0].get("ranks", 1) == (2 if case == "ranks2" else 1)
    assert (out / "scaling.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "| ranks2 | 1 |" in table and "1.00" in table  # transformers against itself
    assert res["cases"]["transformers"]["summary"]["logprob_drift"] < 1e-5  # the trained module samples
    assert res["cases"]["bf16"]["summary"]["logprob_drift"] > 1e-4  # a bfloat16 copy samples
    assert [x["rollout_adapter_step"] for x in res["cases"]["bf16"]["lines"]] == [0, 1]
    before = (out / "runs" / "ranks2" / "metrics.jsonl").read_text()
    assert main(args) == 0  # finished cases are read back, not rerun
    assert (out / "runs" / "ranks2" / "metrics.jsonl").read_text() == before


def test_summary_skips_the_first_step():
    lines = [{"seconds": 100.0, "seconds_rollout": 60.0, "seconds_update": 30.0, "agent_tokens": 600},
             {"seconds": 10.0, "seconds_rollout": 6.0, "seconds_update": 3.0, "agent_tokens": 300},
             {"seconds": 20.0, "seconds_rollout": 4.0, "seconds_update": 12.0, "agent_tokens": 200}]
    s = summarize(lines)
    assert s["s_per_step"] == 15.0 and s["rollout_tokens_per_s"] == 50.0 and s["first_step_s"] == 100.0
