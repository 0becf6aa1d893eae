"""Failover: WebQA episodes over two retrieval-server replicas (real subprocesses on loopback),
one replica killed mid-run; every episode must finish exactly as with the in-process index."""
from __future__ import annotations

import os
import signal

import gymnasium as gym
import pytest

import envs  # noqa: F401  (registers WebQA-v0 from a source checkout)
from agents.scripted import BaselineAgent, OracleAgent
from corpora.http_client import HttpRetriever
from corpora.index import BM25Index
from corpora.qa import load_qa
from corpora.retrievers import bundled_index_dir, get_retriever
from corpora.serve import ServerProcess

N_EPISODES = 24


@pytest.fixture(scope="module")
def index_dir():
    return bundled_index_dir()


def play(env, agent, index: int, on_step=None) -> dict:
    """One episode; ``on_step(turn)`` runs after each step (to kill a replica mid-episode)."""
    prompt, info = env.reset(options={"index": index})
    priv = env.unwrapped.privileged() if isinstance(agent, OracleAgent) else None
    agent.reset(prompt, info, priv, max_turns=env.unwrapped.max_turns)
    obs, trace = prompt, []
    for turn in range(1, 100):
        action = agent.act(obs)
        obs, reward, terminated, truncated, step_info = env.step(action)
        trace.append((action, obs, reward))
        if on_step:
            on_step(turn)
        if terminated or truncated:
            return {"trace": trace, "em": step_info["em"], "retrieved": step_info["all_retrieved_ids"]}
    raise AssertionError("episode did not end")


def agent_for(i: int):
    return OracleAgent() if i % 2 else BaselineAgent()


def test_episodes_survive_a_replica_killed_mid_run(index_dir):
    local_env = gym.make("WebQA-v0")
    want = [play(local_env, agent_for(i), i) for i in range(N_EPISODES)]
    with ServerProcess(index_dir) as a, ServerProcess(index_dir) as b:
        spec = f"{a.url},{b.url}"
        env = gym.make("WebQA-v0", retriever=spec)
        retriever = env.unwrapped.retriever
        assert isinstance(retriever, HttpRetriever) and retriever is get_retriever(spec)
        got = []

        def kill_b(turn):
            if turn == 1 and b.proc.poll() is None:
                os.kill(b.proc.pid, signal.SIGKILL)  # in the middle of an episode
                b.proc.wait(10)

        for i in range(N_EPISODES):
            got.append(play(env, agent_for(i), i, on_step=kill_b if i == N_EPISODES // 2 else None))
        assert b.proc.returncode == -signal.SIGKILL
        a_url, b_url = a.url + "/retrieve", b.url + "/retrieve"
        assert retriever.failures_by_url[b_url] >= 1 and retriever.failures_by_url[a_url] == 0
        assert retriever.requests_by_url[b_url] >= 5, "round robin should have used both replicas before the kill"
        assert b_url in retriever.down()
        served_by_a = retriever.health()[a.url]["requests"]["by_status"]["200"]
    assert got == want  # same observations, rewards, retrieved ids, EM
    assert sum(g["em"] for g in got) > 0
    # requests, not just episodes, were spread: a served fewer than all requests (the searches, and
    # one POST /passages per oracle episode: privileged() reads the gold passages from the server)
    total = sum(1 for g in got for action, _, _ in g["trace"] if action.startswith("<search>"))
    total += sum(isinstance(agent_for(i), OracleAgent) for i in range(N_EPISODES))
    assert served_by_a < total


def test_vector_env_over_http_matches_in_process(index_dir):
    qs = load_qa("hotpotqa", limit=8)
    with ServerProcess(index_dir) as a:
        venv = gym.make_vec("WebQA-v0", num_envs=4, retriever=a.url)
        local = gym.make_vec("WebQA-v0", num_envs=4)
        for v in (venv, local):
            v.reset(seed=3)
        actions = [f"<search>{q['question']}</search>" for q in qs[:4]]
        obs_http = venv.step(actions)[0]
        obs_local = local.step(actions)[0]
        assert obs_http == obs_local


@pytest.mark.slow
def test_hung_replica_times_out_and_fails_over(index_dir):
    idx = BM25Index(index_dir)
    qs = [q["question"] for q in load_qa("hotpotqa", limit=6)]
    with ServerProcess(index_dir) as a, ServerProcess(index_dir) as b:
        r = HttpRetriever([b.url, a.url], timeout=(1.0, 1.0), retries=0, down_seconds=30)
        assert r.search(qs[:1], k=3) == idx.search(qs[:1], k=3)  # b answers (round robin starts at b)
        os.kill(b.proc.pid, signal.SIGSTOP)  # b hangs: accepts connections, never answers
        try:
            for q in qs:
                assert r.search([q], k=3) == idx.search([q], k=3)
            assert r.down() == [b.url + "/retrieve"] and r.failures_by_url[b.url + "/retrieve"] == 1
        finally:
            os.kill(b.proc.pid, signal.SIGCONT)
