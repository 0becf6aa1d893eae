"""Teacher feedback at inference: the student's own episodes and the with-feedback ones are
reported apart, with the share of turns the teacher took; a rerun resumes."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.eval import main as eval_main


class Teacher(BaseHTTPRequestHandler):
    """Grades every turn 2 (no log-probs: the parsed digit) and, acting, answers ``yes``."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        grading = body["messages"][0]["role"] == "system"
        text = "Score: 2" if grading else "<answer> yes </answer>"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def teacher_url():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_feedback_reports_student_alone_and_teacher_share(tmp_path, teacher_url):
    out = tmp_path / "fb"
    args = ["model=baseline", "datasets=hotpotqa", "limit=6", "batch_size=4", f"teacher={teacher_url}", "feedback=true", f"out={out}"]
    assert eval_main(args) == 0
    rep = json.loads((out / "summary.json").read_text())
    fb = rep["feedback"]["hotpotqa"]
    plain = tmp_path / "plain"
    assert eval_main(["model=baseline", "datasets=hotpotqa", "limit=6", f"out={plain}"]) == 0
    alone = json.loads((plain / "summary.json").read_text())["summary"]["hotpotqa"]
    assert fb["student_alone"]["em"] == alone["em"] and fb["student_alone"]["episodes"] == 6
    recs = [json.loads(x) for x in (out / "hotpotqa.feedback.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and all(r["replaced_from_turn"] == 0 and r["teacher_turns"] == 1 for r in recs)
    assert all(r["answer"].strip() == "yes" for r in recs)
    assert fb["teacher_turn_share"] == 1.0 and fb["replaced_episodes"] == 6
    assert "With teacher feedback" in (out / "summary.md").read_text()
    # a rerun finds every question done and writes nothing new
    assert eval_main(args) == 0
    assert len((out / "hotpotqa.feedback.jsonl").read_text().splitlines()) == 6
    assert len((out / "hotpotqa.jsonl").read_text().splitlines()) == 6
    # a stopped run's table, without a teacher: summarise_only reads what the files hold
    assert eval_main([*args[:4], "teacher=http://127.0.0.1:1/v1", "feedback=true", f"out={out}", "summarise_only=true"]) == 0
    assert json.loads((out / "summary.json").read_text())["feedback"]["hotpotqa"]["with_feedback"]["episodes"] == 6
