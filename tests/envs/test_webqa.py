import pickle
import string

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import envs
from envs.grading import normalize_answer
from envs.render import TAGS_PROMPT

ALL_IDS = sorted(envs.REGISTRY)


@pytest.mark.parametrize("env_id", ALL_IDS)
def test_check_env_every_registered_id(env_id):
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)
    prompt, info = env.reset(seed=1)
    assert env.observation_space.contains(prompt) and info["question"].strip() in prompt
    assert "answers" not in info and "supporting_titles" not in info
    assert info["max_turns"] == env.unwrapped.max_turns  # the env owns its turn limit; agents read it here


@pytest.mark.parametrize("max_turns", [1, 2, 7])
def test_reset_info_carries_the_turn_limit(max_turns):
    env = gym.make("WebQA-v0", max_turns=max_turns)
    assert env.reset(seed=0)[1]["max_turns"] == max_turns
    assert gym.make("WebQA-v0").reset(seed=0)[1]["max_turns"] == 4  # the env's default


def _play(env, seed, actions):
    out = [env.reset(seed=seed)]
    for a in actions:
        out.append(env.step(a))
        if out[-1][2] or out[-1][3]:
            break
    return out


ACTIONS = ["<search>American film director</search>", "<browse>Ed Wood</browse>", "<answer>Tim Burton</answer>"]


def test_same_seed_same_episode_and_render():
    env = gym.make("WebQA-v0", render_mode="ansi")
    a, b = _play(env, 7, ACTIONS), _play(env, 7, ACTIONS)
    assert a == b
    other = gym.make("WebQA-v0")
    assert len({_play(other, s, [])[0][0] for s in range(8)}) > 1  # other seeds draw other questions (prompts)
    text = env.render()
    assert "American film director" in text and "Doc 1" in text


def test_prompt_is_exactly_the_template_and_gold_never_shown():
    env = gym.make("WebQA-v0").unwrapped
    for i in range(len(env.questions)):
        prompt, info = env.reset(options={"index": i})
        priv = env.privileged()
        assert prompt == TAGS_PROMPT.format(question=priv["question"].strip(), max_turns=4)
        assert not (set(info) & {"answers", "gold_answers", "supporting_titles"})
    # error observations never echo gold answers
    env.reset(options={"index": 0})
    gold = env.privileged()["answers"]
    obs = env.step("<search></search>")[0]
    assert all(normalize_answer(g) not in normalize_answer(obs) for g in gold)


def test_privileged_has_gold_and_passages():
    env = gym.make("WebQA-v0").unwrapped
    env.reset(options={"question_id": "5a8b57f25542995d1e6f1371"})
    p = env.privileged()
    assert p["answers"] == ["yes"] and p["supporting_titles"] == ["Scott Derrickson", "Ed Wood"]
    assert any("Derrickson" in t for t in p["supporting_passages"])


def test_pickle_roundtrip_gives_same_episode():
    env = gym.make("WebQA-v0").unwrapped
    env2 = pickle.loads(pickle.dumps(env))
    assert len(pickle.dumps(env)) < 10_000  # holds specs, not the index or the QA set
    assert _play(env, 3, ACTIONS) == _play(env2, 3, ACTIONS)


def test_vector_env_equals_single_envs():
    n = 4
    venv = gym.make_vec("WebQA-v0", num_envs=n)
    singles = [gym.make("WebQA-v0") for _ in range(n)]
    obs, _ = venv.reset(seed=10)
    assert list(obs) == [s.reset(seed=10 + i)[0] for i, s in enumerate(singles)]
    turns = [
        ["<search>Scott Derrickson</search>", "<browse>Ed Wood</browse>", "bad action", "<search>Tyler Bates</search>"],
        ["<answer>yes</answer>", "<search>Lilys band</search>", "<search>Ratatat</search>", "<answer>no</answer>"],
    ]
    calls = []
    retr = venv.unwrapped.envs[0].retriever
    orig = retr.search
    retr.search = lambda qs, k=3: (calls.append(list(qs)), orig(qs, k))[1]
    try:
        vo, vr, vte, vtr, vinfo = venv.step(turns[0])
    finally:
        retr.search = orig
    assert calls == [["Scott Derrickson", "Tyler Bates"]]  # one batched call for both searches
    for i, s in enumerate(singles):
        o, r, te, tr, _ = s.step(turns[0][i])
        assert (o, r, te, tr) == (vo[i], vr[i], vte[i], vtr[i])
    assert vinfo["invalid_actions"][2] == 1
    vo, vr, vte, vtr, vinfo = venv.step(turns[1])
    for i, s in enumerate(singles):
        o, r, te, tr, info = s.step(turns[1][i])
        assert (o, r, te, tr) == (vo[i], vr[i], vte[i], vtr[i])
        assert vinfo["em"][i] == info.get("em", 0) if vte[i] or vtr[i] else True
    assert bool(vte[0]) and bool(vte[3])
    # next step autoresets the finished sub-envs (Gymnasium NEXT_STEP mode)
    vo, *_ = venv.step(["<search>x</search>"] * n)
    assert vo[0].startswith("Answer the question below")


def test_rewards_metrics_and_penalty():
    ex = {"question": "Who directed Ed Wood?", "answers": ["Tim Burton"]}
    for metric, expected in [("em", 0.0), ("f1", 0.8), ("cover_em", 1.0)]:
        env = gym.make("WebQA-v0", reward=metric).unwrapped
        env.reset(options={"example": ex})
        _, r, term, trunc, info = env.step("<answer>Tim Burton film</answer>")
        assert term and not trunc and r == pytest.approx(expected)
        assert info["gold_answers"] == ["Tim Burton"] and info["answer"] == "Tim Burton film"
    env = gym.make("WebQA-v0", format_penalty=0.1).unwrapped
    env.reset(options={"example": ex})
    env.step("<search>oops")
    _, r, *_ = env.step("<answer>Tim Burton</answer>")
    assert r == pytest.approx(0.9)


def test_max_turns_truncates_with_warning():
    env = gym.make("WebQA-v0", max_turns=3).unwrapped
    env.reset(seed=0)
    o1, *_ = env.step("<search>a film</search>")
    o2, r2, te2, tr2, _ = env.step("<search>another film</search>")
    assert "last turn" in o2 and not (te2 or tr2)
    o3, r3, te3, tr3, info = env.step("<search>third</search>")
    assert tr3 and not te3 and r3 == 0.0 and "Turn limit of 3" in o3
    assert info["end_reason"] == "max_turns" and info["answer"] is None and info["n_searches"] == 3
    with pytest.raises(RuntimeError, match="reset"):
        env.step("<answer>x</answer>")


def test_browse_windows_read_on_and_suggestions():
    env = gym.make("WebQA-v0", browse_words=50, max_turns=10).unwrapped
    env.reset(seed=0)
    o, *_ = env.step("<browse>https://en.wikipedia.org/wiki/Ed_Wood</browse>")
    assert "Page: Ed Wood (part 1 of" in o and "<browse>Ed Wood#2</browse>" in o
    o2, *_ = env.step("<browse>ed wood#2</browse>")
    assert "(part 2 of" in o2 and o2 != o
    o3, *_ = env.step("<browse>Scott Derrickson horror director</browse>")
    assert "no page titled" in o3 and "Scott Derrickson" in o3


def test_tool_call_env_and_schemas():
    env = gym.make("WebQA-ToolCall-v0").unwrapped
    prompt, _ = env.reset(seed=0)
    names = [t["function"]["name"] for t in env.tool_schemas()]
    assert names == ["search", "browse", "answer"]
    o, *_ = env.step('<tool_call>{"name": "search", "arguments": {"query": "Ed Wood"}}</tool_call>')
    assert o.strip().startswith("<tool_response>") and "Doc 1 (Title:" in o
    o, *_ = env.step('<tool_call>{"name": "rm", "arguments": {}}</tool_call>')
    assert "unknown tool" in o


def test_bad_constructor_arguments_are_named():
    with pytest.raises(ValueError, match="reward"):
        gym.make("WebQA-v0", reward="bleu")
    with pytest.raises(ValueError, match="protocol"):
        gym.make("WebQA-v0", protocol="xml")
    with pytest.raises(KeyError, match="unknown QA set"):
        gym.make("WebQA-v0", dataset="nqq").reset()


TAGGY = st.lists(st.sampled_from(list("<>/ abc#{}\":") + ["<search>", "</search>", "<answer>", "</answer>",
    "<browse>", "</browse>", "<think>", "</think>", "<tool_call>", "</tool_call>", "é", "\u2013", "\x00", "😀"]),
    max_size=40).map("".join)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(action=st.one_of(st.text(max_size=200), TAGGY, st.builds(lambda s: f"<search>{s}</search>", st.text(max_size=80)),
                        st.builds(lambda s: f"<browse>{s}</browse>", st.text(max_size=40))))
def test_fuzz_actions_never_raise(action):
    env = _FUZZ_ENV
    if env._done:
        env.reset(seed=0)
    obs, reward, term, trunc, info = env.step(action)
    assert isinstance(obs, str) and env.observation_space.contains(obs)
    assert isinstance(reward, float) and np.isfinite(reward)
    assert isinstance(info["invalid_actions"], int)


_FUZZ_ENV = gym.make("WebQA-v0", max_turns=50).unwrapped


@pytest.mark.parametrize("size", [10**6, 20_001, 19_999])
def test_huge_actions(size):
    env = gym.make("WebQA-v0").unwrapped
    env.reset(seed=0)
    for action in ["<search>" + "é" * size + "</search>", "<" * size, "<search>" * (size // 8), "x" * size]:
        if env._done:
            env.reset(seed=0)
        obs, *_ , info = env.step(action)
        assert env.observation_space.contains(obs) and "Error" in obs


def test_step_envs_batches_retrieval_for_wrapped_envs():
    """``gym.make`` envs (wrapped) stepped together share one search call, go through their
    wrappers, and see what stepping them one by one gives."""
    from envs.vector import step_envs

    actions = ["<search>Scott Derrickson</search>", "<browse>Ed Wood</browse>", "<search>Tyler Bates</search>", "oops"]
    batch = [gym.make("WebQA-v0") for _ in actions]
    alone = [gym.make("WebQA-v0") for _ in actions]
    for i, (a, b) in enumerate(zip(batch, alone)):
        assert a.reset(seed=i)[0] == b.reset(seed=i)[0]
        assert a is not a.unwrapped  # wrapped by gym.make
    calls = []
    retr = batch[0].unwrapped.retriever
    orig = retr.search
    retr.search = lambda qs, k=3: (calls.append(list(qs)), orig(qs, k))[1]
    try:
        got = step_envs(batch, actions)
    finally:
        retr.search = orig
    assert calls == [["Scott Derrickson", "Tyler Bates"]]
    want = [env.step(a) for env, a in zip(alone, actions)]
    assert [g[:4] for g in got] == [w[:4] for w in want]
    assert [g[4].get("retrieved_ids") for g in got] == [w[4].get("retrieved_ids") for w in want]
    assert all(b.unwrapped._prefetched is None for b in batch)  # nothing left over for a later step
