"""Resume survives a corrupt latest checkpoint.

Each file of the latest checkpoint of a finished 3-step run (tiny model, toy env) is truncated or
has one bit flipped, in turn; ``resume=true`` must name that checkpoint in one printed line, fall
back to the newest intact one (step 2), truncate metrics.jsonl to it, and redo step 3 exactly as
the uninterrupted run did. Checkpoints written before manifests existed are accepted as legacy
(with a note) when they load, and skipped like corrupt ones when they do not.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill import checkpoint as ckpt
from distill.run import main

pytestmark = pytest.mark.slow  # every test here starts from a module fixture's real training run

ARGS = ["model=tiny", "method=opd", "teacher=teacher", "teacher.name=tiny", "env.id=ToyVowel-v0",
        "env.eval_id=ToyVowel-eval-v0", "steps=3", "questions_per_step=1", "group_size=2", "max_tokens_per_turn=8",
        "max_total_tokens=64", "eval.questions=1", "progress=false", "tensorboard=false", "threads=1", "lr=1e-2",
        "keep_checkpoints=3"]
VOLATILE = ("seconds", "peak_rss_mb", "peak_gpu_mb", "peak_anon_mb")
FILES = (ckpt.WEIGHTS, ckpt.STATE, ckpt.MANIFEST)


def stable(path: Path) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in x.items() if not k.startswith(VOLATILE) and not k.endswith("_total")} for x in lines]


def weights(run: Path, step: int = 3) -> dict:
    return load_file(str(ckpt.step_dir(run, step) / ckpt.WEIGHTS))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(ARGS + [f"output_dir={out}"]) == 0
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_000001", "step_000002", "step_000003"]
    return out


def copy_run(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one bit in the middle of the file
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def resume(out: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    """Exit code and the printed ``resume:`` lines."""
    capsys.readouterr()
    rc = main(ARGS + [f"output_dir={out}", "resume=true", *extra])
    cap = capsys.readouterr()
    return rc, [x for x in (cap.out + cap.err).splitlines() if x.startswith("resume:")]


def corrupt(lines: list[str]) -> list[str]:
    return [x for x in lines if " is corrupt (" in x]


def check_same(out: Path, ref: Path) -> None:
    got, want = stable(out / "metrics.jsonl"), stable(ref / "metrics.jsonl")
    assert [x["step"] for x in got] == [1, 2, 3]  # none lost, none repeated
    assert got == want
    a, b = weights(out), weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_checkpoint_has_a_manifest_that_verifies(reference):
    for step in (1, 2, 3):
        d = ckpt.step_dir(reference, step)
        assert ckpt.verify(d) is None
        m = json.loads((d / ckpt.MANIFEST).read_text())
        assert m["step"] == step and set(m["files"]) == {ckpt.WEIGHTS, ckpt.STATE}
        for name, meta in m["files"].items():
            assert meta["bytes"] == (d / name).stat().st_size and len(meta["sha256"]) == 64
    assert ckpt.latest_checkpoint(reference) == ckpt.step_dir(reference, 3)


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
@pytest.mark.parametrize("name", FILES)
def test_corrupt_latest_checkpoint_falls_back_and_matches(reference, tmp_path, capsys, name, how):
    out = copy_run(reference, tmp_path)
    bad = ckpt.step_dir(out, 3)
    damage(bad / name, how)
    assert ckpt.verify(bad) is not None
    rc, lines = resume(out, capsys)
    assert rc == 0, lines
    assert len(lines) == 1 and corrupt(lines) == lines, lines  # one line, naming the checkpoint and the fallback
    assert f"checkpoint {bad} is corrupt" in lines[0] and f"falling back to {ckpt.step_dir(out, 2)}" in lines[0]
    check_same(out, reference)
    assert ckpt.verify(bad) is None  # step 3 written again, whole


def test_two_corrupt_checkpoints_fall_back_two_steps(reference, tmp_path, capsys):
    out = copy_run(reference, tmp_path)
    damage(ckpt.step_dir(out, 3) / ckpt.STATE, "truncate")
    damage(ckpt.step_dir(out, 2) / ckpt.WEIGHTS, "bitflip")
    rc, lines = resume(out, capsys)
    assert rc == 0, lines
    assert len(corrupt(lines)) == 2 and all(str(ckpt.step_dir(out, 1)) in x for x in lines), lines
    check_same(out, reference)


def test_legacy_checkpoint_without_manifest_is_accepted_with_a_note(reference, tmp_path, capsys):
    out = copy_run(reference, tmp_path)
    for step in (1, 2, 3):
        (ckpt.step_dir(out, step) / ckpt.MANIFEST).unlink()
    rc, lines = resume(out, capsys)  # steps=3: nothing left to train
    assert rc == 0, lines
    assert len(lines) == 1 and str(ckpt.step_dir(out, 3)) in lines[0] and "no manifest" in lines[0], lines
    assert not corrupt(lines)
    assert stable(out / "metrics.jsonl") == stable(reference / "metrics.jsonl")


def test_legacy_checkpoint_that_does_not_load_falls_back(reference, tmp_path, capsys):
    out = copy_run(reference, tmp_path)
    for step in (1, 2, 3):
        (ckpt.step_dir(out, step) / ckpt.MANIFEST).unlink()
    damage(ckpt.step_dir(out, 3) / ckpt.STATE, "truncate")
    rc, lines = resume(out, capsys)
    assert rc == 0, lines
    assert len(corrupt(lines)) == 1 and f"checkpoint {ckpt.step_dir(out, 3)} is corrupt" in lines[0], lines
    assert "no manifest" in lines[1] and str(ckpt.step_dir(out, 2)) in lines[1], lines  # the legacy note
    check_same(out, reference)


def test_no_intact_checkpoint_starts_afresh(reference, tmp_path, capsys):
    out = copy_run(reference, tmp_path)
    for step in (1, 2, 3):
        damage(ckpt.step_dir(out, step) / ckpt.STATE, "truncate")
    rc, lines = resume(out, capsys)
    assert rc == 0, lines
    assert len(corrupt(lines)) == 3 and all("starting afresh" in x for x in lines), lines
    check_same(out, reference)
