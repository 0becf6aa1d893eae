"""A training run killed with SIGKILL (a real subprocess) resumes to the same result.

Kill points: inside step 2's work (after its rollout), in the window between step 2's
checkpoint rename and its metrics line (the hardest case for "no line lost or repeated"), and
an external ``kill -9`` at whatever moment the run is in once step 1's line exists.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["model=tiny", "method=opd", "teacher=teacher", "teacher.name=tiny", "steps=3", "questions_per_step=1",
        "group_size=2", "max_tokens_per_turn=8", "max_total_tokens=96", "env.max_turns=2", "eval.questions=1",
        "progress=false", "threads=1", "lr=1e-2"]
VOLATILE = ("seconds", "peak_rss_mb", "peak_gpu_mb", "peak_anon_mb")


def start(out: Path, *extra: str, crash: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DISTILL_CRASH_AT", None)
    if crash:
        env["DISTILL_CRASH_AT"] = crash
    return subprocess.Popen([sys.executable, "-m", "distill.run", *ARGS, f"output_dir={out}", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p: subprocess.Popen, timeout=300) -> tuple[int, str]:
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def stable(path: Path) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in x.items() if not k.startswith(VOLATILE) and not k.endswith("_total")} for x in lines]


def weights(out: Path) -> dict:
    return load_file(str(out / "checkpoints" / "step_000003" / "trainable.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    rc, log = finish(start(out))
    assert rc == 0, log
    return out


def check_same(out: Path, ref: Path):
    got, want = stable(out / "metrics.jsonl"), stable(ref / "metrics.jsonl")
    assert [x["step"] for x in got] == [1, 2, 3]  # none lost, none repeated
    assert got == want
    a, b = weights(out), weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "eval_after.json").exists() and (out / "plot.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["2:rollout", "2:checkpoint"])
def test_sigkill_at_a_point_then_resume(tmp_path, reference, point):
    out = tmp_path / "run"
    rc, log = finish(start(out, crash=point))
    assert rc == -signal.SIGKILL, log
    n_lines = len((out / "metrics.jsonl").read_text().splitlines())
    assert n_lines == 1  # step 2's line was never written (at "checkpoint" its checkpoint already was)
    assert (out / "checkpoints" / "step_000002").exists() == (point == "2:checkpoint")
    rc, log = finish(start(out, "resume=true"))
    assert rc == 0, log
    check_same(out, reference)


@pytest.mark.slow
def test_external_sigkill_mid_run_then_resume(tmp_path, reference):
    out = tmp_path / "run"
    p = start(out)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        m = out / "metrics.jsonl"
        if m.exists() and m.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    rc, log = finish(start(out, "resume=true"))
    assert rc == 0, log
    check_same(out, reference)


@pytest.mark.slow
def test_existing_run_is_not_overwritten_by_accident(tmp_path, reference):
    rc, log = finish(start(reference))
    assert rc == 2 and "resume=true" in log
