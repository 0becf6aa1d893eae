import gymnasium as gym
import pytest

import envs  # noqa: F401
from agents.scripted import BaselineAgent, OracleAgent, evaluate, heuristic_answer, run_episode


def test_oracle_em_is_one_on_all_500_hotpotqa_questions():
    res = evaluate("oracle", "WebQA-v0", show_progress=False)
    assert res["episodes"] == 500 and res["em"] == 1.0 and res["f1"] == 1.0
    assert res["supporting_title_recall"] > 0.9  # searching a gold title finds it almost always


def test_baseline_is_non_privileged_and_scores_something():
    res = evaluate("baseline", "WebQA-v0", limit=100, show_progress=False)
    assert 0.05 < res["em"] < 0.6 and res["turns"] == 2.0


def test_heuristic_rules():
    obs = "<information>Doc 1 (Title: Ed Wood (film)) Ed Wood is a 1994 film directed by Tim Burton.</information>"
    assert heuristic_answer("Is Ed Wood a film?", obs) == "yes"
    assert heuristic_answer("When was Ed Wood released?", obs) == "1994"
    assert heuristic_answer("Who made the film Ed Wood?", obs) == "Tim Burton"
    assert heuristic_answer("Which is older, Ed Wood or Tim Burton?", obs) in {"Ed Wood", "Tim Burton"}


def test_run_episode_records_steps():
    env = gym.make("WebQA-v0")
    out = run_episode(env, BaselineAgent(), {"index": 0})
    assert [s["action"].startswith(p) for s, p in zip(out["steps"], ["<search>", "<answer>"])] == [True, True]
    out = run_episode(env, OracleAgent(), {"index": 0})
    assert out["em"] == 1.0 and out["reward"] == 1.0


@pytest.mark.parametrize("max_turns", [1, 2, 3])
def test_oracle_answers_within_the_envs_turn_limit(max_turns):
    # the first five questions of the default set (not chosen for results), through the same
    # rollout loop as an LLM: the oracle learns the limit from the env's reset info
    from agents.models import byte_tokenizer
    from agents.rollout import rollout
    from agents.scripted_policy import ScriptedPolicy

    opts = [{"index": i} for i in range(5)]
    ref = rollout(ScriptedPolicy(OracleAgent, byte_tokenizer()), lambda: gym.make("WebQA-v0"), opts, with_privileged=True)
    assert [t.em for t in ref] == [1.0] * 5
    got = rollout(ScriptedPolicy(OracleAgent, byte_tokenizer()), lambda: gym.make("WebQA-v0", max_turns=max_turns), opts,
                  with_privileged=True)
    assert [t.em for t in got] == [1.0] * 5
    assert all(len(t.actions) <= max_turns and t.actions[-1].startswith("<answer>") for t in got)
    for i in range(5):  # and the plain text loop agrees
        assert run_episode(gym.make("WebQA-v0", max_turns=max_turns), OracleAgent(), {"index": i})["em"] == 1.0


def test_oracle_reads_the_turn_limit_from_reset_info():
    env = gym.make("WebQA-v0", max_turns=2)
    prompt, info = env.reset(options={"index": 0})
    agent = OracleAgent()
    agent.reset(prompt, info, env.unwrapped.privileged())  # no max_turns argument: the env's info says 2
    assert len(agent.plan) == 2 and agent.plan[-1].startswith("<answer>")
