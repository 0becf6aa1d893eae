"""The rollout-speed benchmark runs end to end, and the KV cache the policy keeps between turns
changes nothing but the time."""
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


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=7)])
def test_reused_cache_gives_the_same_rollout(tiny, sampling):
    model, tok = tiny
    runs = {}
    for reuse in (True, False):
        pol = TransformersPolicy(model, tok, reuse_cache=reuse)
        runs[reuse] = rollout(pol, lambda: gym.make("WebQA-v0", max_turns=3), [{"index": i} for i in range(3)],
                              group_size=2, sampling=sampling, max_tokens_per_turn=12, max_total_tokens=3000,
                              schedule="lockstep")  # the kept cache serves generate(); continuous keeps its own
        assert pol._cache == []  # the rollout drops the kept cache when it ends
    for a, b in zip(runs[True], runs[False]):
        assert len(a.actions) > 1
        assert a.completion_ids == b.completion_ids and a.loss_mask == b.loss_mask
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_cache_entries_cover_prompt_and_fed_tokens(tiny):
    model, tok = tiny
    pol = TransformersPolicy(model, tok)
    prompts = [pol.prompt_ids("short"), pol.prompt_ids("a much longer prompt " * 4)]
    outs = pol.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=6, stop=()))
    assert sorted(len(e.ids) for e in pol._cache) == sorted(len(p) + len(o.token_ids) - 1 for p, o in zip(prompts, outs))
    # a continuation of row 0 reuses its entry and decodes exactly like a fresh policy
    nxt = prompts[0] + outs[0].token_ids + pol.encode(" more text")
    assert pol._lookup(nxt)[1] == len(prompts[0]) + len(outs[0].token_ids) - 1
    sp = SamplingParams(temperature=0.0, max_new_tokens=8, stop=())
    warm = pol.generate([nxt], sp)[0]
    cold = TransformersPolicy(model, tok, reuse_cache=False).generate([nxt], sp)[0]
    assert warm.token_ids == cold.token_ids
    assert warm.logprobs == pytest.approx(cold.logprobs, abs=1e-4)


def test_benchmark_script_runs(tiny, tmp_path, capsys):
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
    printed = capsys.readouterr().out
    assert "ratio rollout/generate (best of each): continuous" in printed and "(b) rollout lockstep" in printed
    assert "rollout continuous: until the queue empties" in printed
    assert "over the interleaved rounds together: continuous" in printed
    with pytest.raises(ValueError, match="continuous/unpacked"):
        main([f"model={tmp_path / 'm'}", "batch_size=2", "episodes=2", "max_tokens_per_turn=4", "threads=0",
              "schedules=continuous/fast", f"out={out}"])


def test_cache_is_dropped_when_the_weights_change():
    import torch

    model, tok = tiny_random_model("bytes", seed=1)
    pol = TransformersPolicy(model, tok)
    sp = SamplingParams(temperature=0.0, max_new_tokens=6, stop=())
    p = pol.prompt_ids("a question")
    out = pol.generate([p], sp)[0]
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(1.5)  # an in-place update, as an optimizer step does
    nxt = p + out.token_ids + pol.encode(" an observation")
    warm = pol.generate([nxt], sp)[0]
    cold = TransformersPolicy(model, tok, reuse_cache=False).generate([nxt], sp)[0]
    assert warm.logprobs == pytest.approx(cold.logprobs, abs=1e-5)
