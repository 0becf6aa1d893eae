"""Data-parallel training under torchrun: 2 CPU ranks (gloo) end with the same LoRA weights as
1 process over the same global batch and seed, and write each metrics line once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distill.dist import merge_metrics, share

ROOT = Path(__file__).resolve().parents[2]
# greedy rollouts (the same tokens whatever the batch) and a token-level teacher signal (a gradient
# without any group variance): oprd with its opd term, so both opd's k1 and oprd's hidden-state
# term are summed across ranks (oprd's mean over selected positions once counted only this
# rank's, which weighted it by the number of ranks); 4 questions per step, 1 sample each
ARGS = ["model=tiny", "method=oprd", "method.opd_coef=1.0", "method.positions=4", "teacher=teacher",
        "teacher.name=tiny", "env.id=WebQA-HotpotQA-train-v0",
        "steps=2", "questions_per_step=4", "group_size=1", "temperature=0", "max_tokens_per_turn=8",
        "max_total_tokens=200", "micro_batch_size=1", "eval.questions=0", "progress=false", "tensorboard=false",
        "threads=1", "lr=1e-2"]


def run(out: Path, nproc: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "distill.run"]
    else:
        from common.subprocess_server import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "-m", "distill.run"]
    p = subprocess.run(cmd + ARGS + [f"output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def weights(out: Path) -> dict:
    return load_file(str(out / "checkpoints" / "step_000002" / "trainable.safetensors"))


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    run(tmp_path / "one", 1)
    run(tmp_path / "two", 2)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys() and any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    # float sums in another order (the teacher scores 2 sequences per batch instead of 4; gradients are
    # summed across ranks), then Adam, whose update m/sqrt(v) amplifies tiny differences of
    # near-zero gradients: equal to 1e-3 of the largest weight, far below one step's change (lr 1e-2)
    scale = max(float(v.abs().max()) for v in a.values())
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-3 * scale, (worst, scale)
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and all(x["ranks"] == 2 for x in lines)  # once each, by rank 0
    for x, y in zip(lines, one):
        assert x["trajectories"] == y["trajectories"] == 4 and x["agent_tokens"] == y["agent_tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
    traj = (tmp_path / "two" / "trajectories" / "step_000001.jsonl").read_text().splitlines()
    assert [json.loads(t)["question_id"] for t in traj] == [json.loads(t)["question_id"] for t in
                                                            (tmp_path / "one" / "trajectories" / "step_000001.jsonl").read_text().splitlines()]


def test_share_keeps_whole_questions_in_order():
    qs = list(range(7))
    parts = [share(qs, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]] and sum(parts, []) == qs


def test_merge_metrics_sums_counts_and_weights_means():
    m = merge_metrics([({"teacher_tokens": 3, "accept_rate": 1.0, "teacher_score_min": 2.0}, 1),
                       ({"teacher_tokens": 5, "accept_rate": 0.0, "teacher_score_min": 1.0}, 3)])
    assert m == {"teacher_tokens": 8, "accept_rate": 0.25, "teacher_score_min": 1.0}
