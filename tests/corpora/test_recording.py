"""Record/replay: an evaluation recorded against an index, replayed with that index deleted,
gives the same episode JSONL; a call the recording lacks is a clear, counted miss."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest

import envs  # noqa: F401
from benchmarks.eval import main as eval_main
from corpora.recording import ReplayMiss, ReplayRetriever, read_records

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def own_index(tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "mini"
    subprocess.run([sys.executable, "-m", "corpora.build", "--corpus", "bundled", "--out", str(out)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


@pytest.mark.parametrize("model", ["scripted", "oracle"])  # the oracle also reads gold passages (privileged)
def test_replay_with_the_index_deleted_gives_identical_episodes(tmp_path, own_index, model):
    index = tmp_path / "index"
    shutil.copytree(own_index, index)
    rec = tmp_path / "rec.jsonl"
    args = [f"model={model}", "datasets=hotpotqa", "limit=15", f"retriever={index}"]
    assert eval_main(args + [f"out={tmp_path / 'live'}", f"record={rec}"]) == 0
    ops = {r["op"] for r in read_records(rec).values()}
    assert "search" in ops and (model != "oracle" or "passages" in ops)
    shutil.rmtree(index)
    assert eval_main(args + [f"out={tmp_path / 'replayed'}", f"replay={rec}"]) == 0
    live = (tmp_path / "live" / "hotpotqa.jsonl").read_text()
    assert live and (tmp_path / "replayed" / "hotpotqa.jsonl").read_text() == live
    fp = json.loads((tmp_path / "replayed" / "summary.json").read_text())["fingerprint"]["hotpotqa"]
    assert fp["replay"] == str(rec) and len(fp["replay_sha256"]) == 16


def test_a_replay_miss_is_an_error_observation_and_counted(tmp_path):
    rec = tmp_path / "rec.jsonl"
    env = gym.make("WebQA-v0", record=str(rec))
    env.reset(seed=0)
    first = env.step("<search>Scott Derrickson</search>")[0]
    env.step("<browse>Scott Derrickson</browse>")
    replay = gym.make("WebQA-v0", replay=str(rec), retriever="/nonexistent/index")
    replay.reset(seed=0)
    assert replay.step("<search>Scott Derrickson</search>")[0] == first
    obs, *_, info = replay.step("<search>something never recorded</search>")
    assert "Error: replay miss" in obs and "something never recorded" in obs and info["replay_misses"] == 1
    obs, *_, info = replay.step("<browse>Ed Wood</browse>")
    assert "Error: replay miss" in obs and info["replay_misses"] == 2
    vec = gym.make_vec("WebQA-v0", num_envs=2, replay=str(rec))
    vec.reset(seed=0)
    obs, *_ = vec.step(["<search>Scott Derrickson</search>", "<search>never recorded either</search>"])
    assert obs[0] == first and "Error: replay miss" in obs[1]
    with pytest.raises(ReplayMiss, match="gold passages"):
        ReplayRetriever(rec).passages_by_title(["Ed Wood"])
    with pytest.raises(ValueError, match="exclude"):
        gym.make("WebQA-v0", record=str(rec), replay=str(rec))


def test_a_torn_last_line_is_ignored(tmp_path):
    rec = tmp_path / "rec.jsonl"
    rec.write_text(json.dumps({"op": "search", "query": "q", "k": 3, "hits": []}) + "\n" + '{"op": "search", "qu')
    assert list(read_records(rec)) == ['["search", "q", 3]']
