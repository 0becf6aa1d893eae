import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.eval import main as eval_main
from benchmarks.eval import parse_config, read_done
from benchmarks.viewer import main as viewer_main

ROOT = Path(__file__).resolve().parents[2]


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    args = ["model=scripted", "datasets=hotpotqa", "limit=60", "batch_size=1"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.eval", *args, f"out={out}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    f = out / "hotpotqa.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not f.exists() or len(f.read_text().splitlines()) < 15):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(f.read_text().splitlines())
    assert 15 <= n_before < 60, "the run should have been killed halfway"
    assert eval_main([*args, f"out={out}"]) == 0
    resumed = _lines(f)
    assert len(resumed) == 60 and len({r["question_id"] for r in resumed}) == 60
    assert eval_main([*args, f"out={tmp_path / 'whole'}"]) == 0
    whole = {r["question_id"]: r for r in _lines(tmp_path / "whole" / "hotpotqa.jsonl")}
    assert {r["question_id"]: r for r in resumed} == whole
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["hotpotqa"]["episodes"] == 60
    assert summary["fingerprint"]["hotpotqa"]["corpus_passages"] == 22980


def test_torn_last_line_is_cut(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"question_id": "a"}) + "\n" + '{"question_id": "b", "em"')
    assert list(read_done(f)) == ["a"]
    assert f.read_text() == json.dumps({"question_id": "a"}) + "\n"


def test_config_errors_name_the_key():
    with pytest.raises(SystemExit, match="unknown config key 'lmit'"):
        parse_config(["lmit=3"])
    with pytest.raises(SystemExit, match="limit"):
        parse_config(["limit=many"])
    with pytest.raises(SystemExit, match="key=value"):
        parse_config(["limit"])
    assert parse_config(["limit=3", "env_kwargs.reward=f1"]).env_kwargs == {"reward": "f1"}


def test_oracle_eval_and_viewer(tmp_path):
    assert eval_main(["model=oracle", "datasets=hotpotqa,WebQA-HotpotQA-train-v0", "limit=20", f"out={tmp_path}"]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert s["hotpotqa"]["em"] == 1.0 and s["WebQA-HotpotQA-train-v0"]["em"] == 1.0
    assert "| hotpotqa | 20 | 1.000 |" in (tmp_path / "summary.md").read_text()
    assert viewer_main([str(tmp_path / "hotpotqa.jsonl"), "-o", str(tmp_path / "v.html")]) == 0
    page = (tmp_path / "v.html").read_text()
    assert page.count("<details>") == 20 and "&lt;search&gt;" in page and "EM 1.000" in page


def test_summarise_only_tables_a_stopped_run(tmp_path):
    assert eval_main(["model=oracle", "datasets=hotpotqa", "limit=4", f"out={tmp_path}"]) == 0
    assert eval_main(["model=oracle", "datasets=hotpotqa", "limit=10", "summarise_only=true", f"out={tmp_path}"]) == 0
    assert len(_lines(tmp_path / "hotpotqa.jsonl")) == 4  # nothing new was run
    assert "| hotpotqa | 4 | 1.000 |" in (tmp_path / "summary.md").read_text()


def test_pass_at_k_is_the_unbiased_estimator():
    from math import comb

    from agents.evaluation import pass_at_k, sampled_summary

    for n, c, k in [(8, 3, 1), (8, 3, 4), (8, 0, 2), (8, 8, 8), (5, 2, 3), (16, 1, 8)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    recs = [{"question_id": q, "em": e} for q, es in (("a", [1, 0, 0, 0]), ("b", [0, 0, 0, 0])) for e in es]
    s = sampled_summary(recs)
    assert s == {"questions": 2, "samples_per_question": 4, "pass@1": 0.125, "pass@2": pytest.approx(0.25), "pass@4": 0.5}


def test_math_eval_with_n_samples_resumes_whole_questions(tmp_path):
    """datasets=gsm8k n=3: records per (question, sample); a question cut short by a kill is rolled
    out again whole, nothing is duplicated, and the table has mean@n, pass@k and extraction failures."""
    args = ["model=oracle", "datasets=gsm8k,math500", "limit=4", "n=3", f"out={tmp_path}"]
    assert eval_main(args) == 0
    f = tmp_path / "gsm8k.jsonl"
    full = _lines(f)
    assert len(full) == 12 and {(r["question_id"], r["sample"]) for r in full} == {(r["question_id"], s) for r in full for s in range(3)}
    qids = list(dict.fromkeys(r["question_id"] for r in full))
    kept = [r for r in full if r["question_id"] in qids[:2]] + [next(r for r in full if r["question_id"] == qids[2])]
    f.write_text("".join(json.dumps(r) + "\n" for r in kept))  # as a kill leaves it: question 3 has 1 of its 3 samples
    assert eval_main(args) == 0
    again = read_done(f)
    assert len(again) == 12 and len(_lines(f)) == 7 + 3 + 3  # question 3 again whole, question 4
    s = json.loads((tmp_path / "summary.json").read_text())
    g = s["summary"]["gsm8k"]
    assert g["episodes"] == 12 and g["questions"] == 4 and g["samples_per_question"] == 3
    assert g["em"] == g["pass@1"] == g["pass@2"] == 1.0 and g["extraction_failures"] == 0.0 and g["grader_fallback"] == 0
    assert s["fingerprint"]["math500"]["samples_per_question"] == 3 and "corpus" not in s["fingerprint"]["math500"]
    table = (tmp_path / "summary.md").read_text()
    assert "| gsm8k | 4 | 3 | 1.000 | 1.000 | 1.000 | 0.000 | 0 |" in table and "pass@2" in table
    with pytest.raises(SystemExit, match="greedy"):
        eval_main(args + ["greedy=true"])
