"""The rollout-speed benchmark runs end to end and its JSON holds what it claims."""
import json

import gymnasium as gym
import pytest

import envs  # noqa: F401
from agents.hf_policy import TransformersPolicy
from agents.models import tiny_random_model
from agents.policy import SamplingParams
from agents.rollout import rollout


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model("bytes", seed=0)


@pytest.mark.slow
def test_benchmark_script_runs(tiny, tmp_path):
    from benchmarks.rollout_speed import main

    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "speed.json"
    assert main([f"model={tmp_path / 'm'}", "batch_size=2", "episodes=3", "max_tokens_per_turn=8", "max_turns=2", "threads=0",
                 "schedules=continuous,continuous/unpacked,lockstep", "repeats=2", f"out={out}"]) == 0
    rep = json.loads(out.read_text())
    assert rep["batch"] == 2 and rep["generate"]["tokens"] == 3 * rep["T"] == rep["policy_generate"]["tokens"]
    assert set(rep["rollouts"]) == {"continuous", "continuous/unpacked", "lockstep"}
    for r in rep["rollouts"].values():
        assert r["tokens"] == sum(r["episode_agent_tokens"]) > 0 and len(r["turns"]) == 3
        assert len(r["round_seconds"]) == 2 and r["seconds"] == min(r["round_seconds"])
    packed, unpacked = rep["rollouts"]["continuous"], rep["rollouts"]["continuous/unpacked"]
    assert packed["episode_agent_tokens"] == unpacked["episode_agent_tokens"]  # greedy: the same episodes
    assert packed["packed_calls"] > 0 and unpacked["packed_calls"] == 0
    assert packed["prefill_calls"] < unpacked["prefill_calls"]
    assert rep["ratio_rollout_over_generate"] == rep["ratios_rollout_over_generate"]["continuous"] > 0
    assert len(rep["ratios_by_round"]["continuous"]) == 2
    # round 2: generate's batches ran inside the continuous rollout, each counted on its own side
    assert rep["rounds_interleaved"] == [False, True] and rep["ratio_interleaved_rounds"] > 0
    g = rep["generate"]
    assert len(g["round_seconds"]) == 2 and g["prefill_calls"] == 2 and g["packed_calls"] == 0
    assert g["decode_steps"] == 2 * (rep["T"] - 1) and g["decode_slots"] == 3 * (rep["T"] - 1)
    assert rep["rollouts"]["continuous"]["round_tokens"] == [rep["rollouts"]["continuous"]["tokens"]] * 2
    for sch in ("continuous", "continuous/unpacked"):  # 3 episodes, 2 places: the third starts when one ends
        r, eat = rep["rollouts"][sch], rep["rollouts"][sch]["episode_agent_tokens"]
        assert min(eat[:2]) <= r["queue_empty_tokens"] <= r["tokens"] - eat[2]
        assert r["drain_tokens"] == r["tokens"] - r["queue_empty_tokens"]
        assert 0 < r["queue_empty_seconds"] < r["seconds"] and r["drain_seconds"] > 0
        assert r["longest_episode_tokens"] == max(eat) and len(rep["steady_ratios_by_round"][sch]) == 2
    assert "queue_empty_tokens" not in rep["rollouts"]["lockstep"] and "lockstep" not in rep["steady_ratios_by_round"]
    with pytest.raises(ValueError, match="continuous/unpacked"):
        main([f"model={tmp_path / 'm'}", "batch_size=2", "episodes=2", "max_tokens_per_turn=4", "threads=0",
              "schedules=continuous/fast", f"out={out}"])
