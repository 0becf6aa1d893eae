"""The results page is generated from results files: each benchmark's section, with its plot,
and a plain note where a results file is missing."""
import json
import shutil
from pathlib import Path

from benchmarks.report import main

ROOT = Path(__file__).resolve().parents[2]


def test_report_writes_every_section_from_the_results(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs"
    shutil.copytree(ROOT / "results" / "eval_student", results / "eval_student")
    shutil.copy(ROOT / "results" / "rollout_speed_student_s8.json", results / "rollout_speed_student_s8.json")
    shutil.copy(ROOT / "results" / "retrieval.json", results / "retrieval.json")
    retrieval = json.loads((results / "retrieval.json").read_text())["results"][0]
    (results / "grader").mkdir()
    row = {"name": "default", "teacher": "teacher", "prompt": "answer_first", "show_gold": True, "readout": "expected",
           "n": 10, "auroc": 0.8, "spearman": 0.5, "ties": 0.01, "sec_per_score": 1.0, "models_only": {"auroc": 0.7, "n": 6}}
    (results / "grader" / "summary.json").write_text(json.dumps({"recorded": "x", "records": 10, "default": row, "configs": [row]}))
    assert main([], results, docs) == 0
    page = (docs / "results.md").read_text()
    assert "| 0.080 | 0.123 |" in page  # the student's HotpotQA EM / F1 from its summary.json
    assert "| default | teacher | answer_first | True | expected | 10 | 0.800 |" in page
    assert "No `results/learning/learning.json` yet." in page
    shutil.copytree(ROOT / "results" / "learning_float32", results / "learning_float32",
                    ignore=shutil.ignore_patterns("runs", "heldout", "logs"))
    assert main([], results, docs) == 0
    page = (docs / "results.md").read_text()
    assert "### `results/learning_float32` (webqa, dtype float32)" in page
    assert "| opd | 12 | 0.080 | 0.140 | 0.160 | 0.123 | 0.220 | 0.231 | 100 |" in page  # the finished method's row
    assert "![learning curves](../results/learning_float32/learning.png)" in page
    for backend in ("bm25", "dense", "hybrid"):  # one recall row each, with the file's numbers
        rec = retrieval["backends"][backend]["title_recall"]
        assert f"| {retrieval['corpus']} | {backend} | {rec['recall@1']:.3f} | {rec['recall@3']:.3f} | {rec['recall@10']:.3f} |" in page
    assert (docs / "img" / "retrieval_recall.png").stat().st_size > 0
    assert (docs / "img" / "grader_auroc.png").stat().st_size > 0 and (docs / "img" / "rollout_speed.png").stat().st_size > 0
