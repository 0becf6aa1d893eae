"""An OVD run (``mode=reward``: scores only) against an HTTP teacher on 127.0.0.1 that times out, answers 500 and says
unparseable things: the run goes on, failures are counted, and no trajectory gets a score the
teacher did not give."""
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distill.config import resolve
from distill.train import step_questions, train

EXPECTED = {3: 7, 4: 3, 5: 8}  # question number -> the score the teacher gives
FAILING = {0, 1, 2}  # always 500 / always too slow / always unparseable


class FaultyTeacher(BaseHTTPRequestHandler):
    attempts: Counter = Counter()

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        q = int(re.search(r"many vowels \((\d+)\)", text).group(1))
        FaultyTeacher.attempts[text] += 1
        if q == 0 or (q == 3 and FaultyTeacher.attempts[text] == 1):
            return self._send(500, {"error": "boom"})
        if q == 1:
            time.sleep(1.0)  # longer than the client's timeout
        reply = {2: "I cannot judge this trajectory.", 3: "Score: 7", 4: "The agent tried. Score: 3", 5: "**Score:** 8"}.get(q, "Score: 1")
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left


@pytest.fixture
def teacher_url():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FaultyTeacher)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


@pytest.mark.slow
def test_faulty_http_teacher_never_invents_scores(tmp_path, teacher_url):
    cfg, mcfg = resolve(["model=tiny", "method=ovd", "teacher=http", f"teacher.url={teacher_url}", "teacher.timeout=0.3",
                         "teacher.retries=1", "method.mode=reward", "method.grader.readout=digit", "method.grader.retries=1", "env.id=ToyVowel-v0", "env.eval_id=ToyVowel-eval-v0",
                         "steps=3", "questions_per_step=2", "group_size=2", "max_tokens_per_turn=6", "max_total_tokens=32",
                         "eval.questions=1", "progress=false", "threads=1"])
    train(cfg, mcfg, tmp_path / "run", resume=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    ids = [f"train-{i}" for i in range(6)]
    for step, line in enumerate(lines):
        qs = [int(q.split("-")[1]) for q in step_questions(ids, step, 2, 0)]
        kept = [EXPECTED[q] for q in qs if q not in FAILING for _ in range(2)]
        assert line["dropped"] == 2 * sum(q in FAILING for q in qs)
        assert line["trained_samples"] == len(kept)
        if kept:
            assert line["teacher_score_mean"] == pytest.approx(sum(kept) / len(kept))
        traj = [json.loads(x) for x in (tmp_path / "run" / "trajectories" / f"step_{step + 1:06d}.jsonl").read_text().splitlines()]
        assert len(traj) == 4  # dropped trajectories are still logged, just not trained on
    assert sum(x["teacher_failed"] for x in lines) > 0 and sum(x["teacher_unparseable"] for x in lines) > 0
    last = lines[-1]
    assert last["teacher_timeouts_total"] > 0 and last["teacher_http_5xx_total"] > 0 and last["teacher_retries_total"] > 0


def test_unreachable_teacher_is_a_one_line_error(tmp_path, capsys):
    from distill.run import main

    code = main(["model=tiny", "method=ovd", "teacher=http", "teacher.url=http://127.0.0.1:1/v1", "steps=1",
                 "eval.questions=0", "progress=false", "env.id=ToyVowel-v0", "env.eval_id=ToyVowel-eval-v0",
                 f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot be reached" in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class AlwaysFailing(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):  # /v1/models answers: the teacher is up
        self._send(200, {"data": [{"id": "t"}]})

    def do_POST(self):
        self._send(500, {"error": "boom"})

    _send = FaultyTeacher._send


def test_steps_that_drop_everything_stop_the_run(tmp_path, capsys):
    from distill.run import main

    srv = ThreadingHTTPServer(("127.0.0.1", 0), AlwaysFailing)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        code = main(["model=tiny", "method=ovd", "method.mode=reward", "teacher=http", "teacher.retries=0",
                     f"teacher.url=http://127.0.0.1:{srv.server_address[1]}/v1", "steps=5", "max_empty_steps=2",
                     "questions_per_step=1", "group_size=2", "max_tokens_per_turn=4", "eval.questions=0", "progress=false",
                     "env.id=ToyVowel-v0", "env.eval_id=ToyVowel-eval-v0", "threads=1", f"output_dir={tmp_path / 'run'}"])
    finally:
        srv.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "2 steps in a row dropped every trajectory" in err[-1]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["dropped"] == 2 for x in lines)
