import gzip
import json
import math

import pytest

from benchmarks import grader
from benchmarks.grader import KEEP, auroc, average_ranks, load_recorded, main, read_jsonl, spearman, tie_share


def test_average_ranks_share_ties():
    assert average_ranks([3, 1, 3, 2]) == [3.5, 1, 3.5, 2]
    assert average_ranks([]) == []


def test_auroc_by_hand():
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0  # perfect
    assert auroc([4, 3, 2, 1], [False, False, True, True]) == 0.0  # inverted
    assert auroc([5, 5, 5, 5], [False, True, False, True]) == 0.5  # all tied
    # pairs (pos, neg): 2>1, 2=2 (half), 3>1, 3>2 -> 3.5 / 4
    assert auroc([1, 2, 2, 3], [False, False, True, True]) == 0.875
    assert auroc([1, 2], [True, True]) is None


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = 1, 2.5, 2.5, 4; y = 1..4: cov 4.5, var 4.5 and 5 -> 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([7, 7, 7], [1, 2, 3]) is None


def test_tie_share_is_the_share_of_equal_pairs():
    assert tie_share([1, 2, 2, 3]) == pytest.approx(1 / 6)
    assert tie_share([1, 1, 2, 2]) == pytest.approx(2 / 6)
    assert tie_share([5, 5, 5]) == 1.0
    assert tie_share([1.0, 2.5, 3.0]) == 0.0
    assert tie_share([4]) is None


def test_torn_cache_line_is_cut(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"a": 1}\n{"a": 2')
    assert read_jsonl(f) == [{"a": 1}] and f.read_text().endswith("2")  # read only: untouched
    assert read_jsonl(f, repair=True) == [{"a": 1}] and f.read_text() == '{"a": 1}\n'


def _eval_record(qid, em):
    return {"question_id": qid, "dataset": "hotpotqa", "question": f"q {qid}?", "gold_answers": ["x"],
            "actions": ["<search>q</search>", f"<answer>{'x' if em else 'y'}</answer>"],
            "observations": ["<information>Doc 1 (Title: X) x is here</information>", ""],
            "answer": "x" if em else "y", "em": float(em), "f1": float(em), "reward": float(em), "turns": 2}


def test_build_from_runs_and_scripted_agents(tmp_path):
    student = tmp_path / "runs" / "student"
    student.mkdir(parents=True)
    (student / "hotpotqa.jsonl").write_text("".join(json.dumps(_eval_record(q, em)) + "\n" for q, em in [("b", 0), ("a", 1)]))
    out = tmp_path / "rec.jsonl.gz"
    args = ["build", f"runs={student}", "scripted=oracle,baseline", "datasets=hotpotqa,nq", "limit=3",
            f"runs_dir={tmp_path / 'runs'}", f"out={out}", "min_records=10"]
    assert main(args) == 0
    recs = load_recorded(out)
    assert len(recs) == 2 + 2 * 2 * 3
    assert all(set(r) == {*KEEP, "source"} for r in recs)
    order = [(r["source"], r["dataset"], r["question_id"]) for r in recs]
    assert order == sorted(order) and order[-2:] == [("student", "hotpotqa", "a"), ("student", "hotpotqa", "b")]
    assert all(r["em"] == 1.0 for r in recs if r["source"] == "oracle")
    assert {(r["source"], r["dataset"]) for r in recs} >= {("oracle", "nq"), ("baseline", "hotpotqa")}
    first = out.read_bytes()
    assert main(args) == 0 and out.read_bytes() == first  # deterministic, and the scripted runs resume
    with pytest.raises(SystemExit, match="min_records"):
        main([*args[:-1], "min_records=1000"])
    with pytest.raises(SystemExit, match="no eval results"):
        main(["build", f"runs={tmp_path / 'nowhere'}", "scripted=", f"out={out}"])


def _write_recorded(path, n=6):
    recs = [{"source": "s1" if i % 2 else "s2", **{k: v for k, v in _eval_record(f"q{i}", i < n // 2).items() if k in KEEP}}
            for i in range(n)]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in recs)


class CountingTeacher:
    """Replies ``Score: 5`` and counts what it was asked."""

    capabilities = frozenset({"score"})
    batch_size = 2

    def __init__(self):
        self.asked = 0

    def score(self, messages, sample=False, seed=0):
        self.asked += len(messages)
        return ["Score: 5"] * len(messages)


def test_measure_end_to_end_with_tiny_teacher_and_resume(tmp_path, monkeypatch):
    rec = tmp_path / "rec.jsonl.gz"
    _write_recorded(rec)
    args = ["configs=default,rubric_digit", "teacher=tiny", f"recorded={rec}", f"out={tmp_path}"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["default"]["name"] == "default" and summary["default"]["teacher"] == "tiny"
    assert [r["name"] for r in summary["configs"]] == ["default", "rubric_digit"]
    for row in summary["configs"]:
        assert row["n"] == 6 and row["dropped"] == 0 and row["failed"] == 0
        assert 0 <= row["auroc"] <= 1 and 0 <= row["ties"] <= 1 and math.isfinite(row["sec_per_score"])
        assert row["spearman"] is None or -1 <= row["spearman"] <= 1
        assert set(row["by_source"]) == {"s1", "s2"}
    d = summary["default"]
    assert d["readout"] == "expected" and math.isfinite(d["spearman"]) and d["fallbacks"] == 0

    # everything cached: a rerun builds no teacher and writes the same rows
    monkeypatch.setattr(grader, "make_named_teacher", lambda *a: pytest.fail("a cached run built a teacher"))
    assert main(args) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["configs"] == summary["configs"]

    # a run killed mid-batch: the last batch line is torn; only its trajectories are scored again
    cache = grader.cache_path(tmp_path, "tiny", grader.CONFIGS["default"])
    lines = cache.read_text().splitlines(keepends=True)
    torn = json.loads(lines[-1])["keys"]
    cache.write_text("".join(lines[:-1]) + lines[-1][:20])
    fake = CountingTeacher()
    monkeypatch.setattr(grader, "make_named_teacher", lambda *a: fake)
    assert main(["configs=default", "teacher=tiny", f"recorded={rec}", f"out={tmp_path}", "limit=6"]) == 0
    assert fake.asked == len(torn)
    assert len(read_jsonl(cache)) == len(lines)


def test_unknown_config_name_fails(tmp_path):
    rec = tmp_path / "rec.jsonl.gz"
    _write_recorded(rec, 2)
    with pytest.raises(SystemExit, match="unknown or no configs"):
        main(["configs=default,nope", f"recorded={rec}", f"out={tmp_path}"])


def test_each_teacher_dtype_has_its_own_score_cache(tmp_path):
    gc = grader.CONFIGS["default"]
    fp32 = grader.cache_path(tmp_path, "teacher", gc)
    assert grader.cache_path(tmp_path, "teacher", gc, "fp32") == fp32  # the name written before dtypes counted
    bf16 = grader.cache_path(tmp_path, "teacher", gc, "bfloat16")
    assert bf16 != fp32 and grader.cache_path(tmp_path, "teacher", gc, "bf16") == bf16
    url = "http://127.0.0.1:8001/v1"
    assert grader.cache_path(tmp_path, url, gc, "bfloat16") == grader.cache_path(tmp_path, url, gc)  # a server's own dtype
