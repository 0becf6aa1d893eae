import gymnasium as gym
import pytest

import envs  # noqa: F401
from agents.models import byte_tokenizer
from agents.rollout import rollout
from agents.scripted import BaselineAgent, OracleAgent, evaluate, heuristic_answer
from agents.scripted_policy import ScriptedPolicy


def test_oracle_em_is_one_on_all_500_hotpotqa_questions():
    res = evaluate("oracle", "WebQA-v0", show_progress=False)
    assert res["episodes"] == 500 and res["em"] == 1.0 and res["f1"] == 1.0
    assert res["supporting_title_recall"] > 0.9  # searching a gold title finds it almost always


def test_baseline_is_non_privileged_and_scores_something():
    res = evaluate("baseline", "WebQA-v0", limit=100, show_progress=False)
    assert 0.05 < res["em"] < 0.6 and res["avg_turns"] == 2.0


def test_heuristic_rules():
    obs = "<information>Doc 1 (Title: Ed Wood (film)) Ed Wood is a 1994 film directed by Tim Burton.</information>"
    assert heuristic_answer("Is Ed Wood a film?", obs) == "yes"
    assert heuristic_answer("When was Ed Wood released?", obs) == "1994"
    assert heuristic_answer("Who made the film Ed Wood?", obs) == "Tim Burton"
    assert heuristic_answer("Which is older, Ed Wood or Tim Burton?", obs) in {"Ed Wood", "Tim Burton"}


def test_scripted_agents_act_through_the_rollout():
    make = lambda: gym.make("WebQA-v0")  # noqa: E731
    base = rollout(ScriptedPolicy(BaselineAgent, byte_tokenizer()), make, [{"index": 0}])[0]
    assert [a.split(">")[0] + ">" for a in base.actions] == ["<search>", "<answer>"]
    oracle = rollout(ScriptedPolicy(OracleAgent, byte_tokenizer()), make, [{"index": 0}], with_privileged=True)[0]
    assert oracle.em == 1.0 and oracle.reward == 1.0


@pytest.mark.parametrize("max_turns", [1, 2, 3])
def test_oracle_answers_within_the_envs_turn_limit(max_turns):
    # the first five questions of the default set (not chosen for results), through the same
    # rollout loop as an LLM: the oracle learns the limit from the env's reset info
    opts = [{"index": i} for i in range(5)]
    ref = rollout(ScriptedPolicy(OracleAgent, byte_tokenizer()), lambda: gym.make("WebQA-v0"), opts, with_privileged=True)
    assert [t.em for t in ref] == [1.0] * 5
    got = rollout(ScriptedPolicy(OracleAgent, byte_tokenizer()), lambda: gym.make("WebQA-v0", max_turns=max_turns), opts,
                  with_privileged=True)
    assert [t.em for t in got] == [1.0] * 5
    assert all(len(t.actions) <= max_turns and t.actions[-1].startswith("<answer>") for t in got)


def test_oracle_reads_the_turn_limit_from_reset_info():
    env = gym.make("WebQA-v0", max_turns=2)
    prompt, info = env.reset(options={"index": 0})
    agent = OracleAgent()
    agent.reset(prompt, info, env.unwrapped.privileged())  # no max_turns argument: the env's info says 2
    assert len(agent.plan) == 2 and agent.plan[-1].startswith("<answer>")
