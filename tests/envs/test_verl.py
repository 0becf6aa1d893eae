"""WebQA inside verl (envs/verl.py): the episode loop against a server manager with verl's
``generate`` signature, backed by a tiny real model, in process or behind a real OpenAI-compatible
HTTP server on 127.0.0.1 (``agents/openai_server.py``); then verl's own agent-loop base class,
registry and output where verl is importable (it pulls in ray, tensordict, fastapi, ...); last, a
short verl GRPO job, marked ``gpu`` and skipped without verl, CUDA and ``WEBQA_VERL_MODEL``."""
import asyncio
import inspect
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import pytest
import requests
import torch

from agents.hf_policy import TransformersPolicy
from agents.http_policy import OpenAIPolicy
from agents.models import tiny_random_model
from agents.openai_server import ModelServerProcess
from agents.policy import SamplingParams
from envs.grading import grade
from envs.verl import AGENT_NAME, STOPS, build_dataset, chat_prompt_ids, play_episode, row_options

ROOT = Path(__file__).resolve().parents[2]

ROW = {"extra_info": {"id": "q1", "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
                      "answers": ["yes"], "supporting_titles": ["Scott Derrickson", "Ed Wood"]}}
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}  # verl's keys


@dataclass
class TokenOutput:
    """The fields of verl's ``TokenOutput`` (verl.workers.rollout.replica) that a loop reads."""
    token_ids: list
    log_probs: list | None = None
    num_preempted: int | None = None


def token_output(**kw):
    try:
        from verl.workers.rollout.replica import TokenOutput as VerlTokenOutput
    except ImportError:
        return TokenOutput(**kw)
    return VerlTokenOutput(**kw)


class PolicyServer:
    """verl's server manager on one of our policies: ``generate`` has exactly the signature of verl
    0.9.1's ``LLMServerClient.generate`` and returns a ``TokenOutput``. With ``TransformersPolicy``
    the model runs in process; with ``OpenAIPolicy(url, api="completions")`` every request goes over
    HTTP to an OpenAI-compatible server (token-id prompt in; exact token ids and their sampling
    log-probs back). verl's ``top_k=-1`` (off) is our 0; each call gets its own seed."""

    def __init__(self, policy, seed=0):
        self.policy, self.seed, self.calls, self.outputs = policy, seed, [], []

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, video_data=None,
                       audio_data=None, mm_processor_kwargs=None, **kwargs):
        sp = dict(sampling_params)
        self.calls.append((request_id, list(prompt_ids), sp))
        params = SamplingParams(temperature=sp["temperature"], top_p=sp["top_p"], top_k=max(0, sp["top_k"]),
                                max_new_tokens=sp["max_tokens"], stop=tuple(sp["stop"]),
                                seed=self.seed + len(self.calls))
        # off the event loop, as verl's own client awaits its server
        c = (await asyncio.to_thread(self.policy.generate, [list(prompt_ids)], params))[0]
        self.outputs.append(c)
        return token_output(token_ids=list(c.token_ids), log_probs=list(c.logprobs) if sp["logprobs"] else None)


class ScriptServer:
    """A server whose model says the scripted texts, one per call, ignoring ``stop`` (so it can run
    past an action's end), with the tiny model's log-probs of those tokens."""

    def __init__(self, model, tokenizer, script):
        self.model, self.tok, self.script, self.calls, self.outputs = model, tokenizer, list(script), [], []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kw):
        self.calls.append((request_id, list(prompt_ids), dict(sampling_params)))
        ids = self.tok.encode(self.script[len(self.calls) - 1], add_special_tokens=False)
        ids = ids[: sampling_params["max_tokens"]]
        self.outputs.append(ids)
        lps = forward_logprobs(self.model, prompt_ids, ids)
        return token_output(token_ids=ids, log_probs=lps if sampling_params.get("logprobs") else None, num_preempted=0)


def forward_logprobs(model, prompt_ids, response_ids):
    """Each response token's log-prob from one forward pass over prompt + response."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    n0 = len(prompt_ids)
    return [logp[n0 + t - 1, tok].item() for t, tok in enumerate(response_ids)]


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_random_model("small", hidden_size=64, num_layers=2, seed=0)
    return model, tok


def make_env(**kw):
    kw = {"top_k": 1, "passage_chars": 120, "max_turns": 3, **kw}
    return gym.make("WebQA-v0", render_mode="ansi", **kw).unwrapped


def start(env, tok, row=ROW):
    prompt, _ = env.reset(options=row_options(row))
    return prompt, chat_prompt_ids(tok, [{"role": "user", "content": prompt}])


def play(server, env, tok, prompt_ids, **kw):
    kw.setdefault("response_length", 4096)
    return asyncio.run(play_episode(server, env, tok, prompt_ids, dict(SAMPLING), **kw))


def test_tiny_model_episode_is_generated_tokens_and_env_observations(tiny):
    model, tok = tiny
    env = make_env()
    prompt, prompt_ids = start(env, tok)
    server = PolicyServer(TransformersPolicy(model, tok))
    sampling = dict(SAMPLING)
    ep = asyncio.run(play_episode(server, env, tok, prompt_ids, sampling, response_length=4096, max_tokens_per_turn=12))
    assert sampling == SAMPLING  # the caller's dict is not changed

    # a random model writes no valid action: each turn gets the env's error, until its turn limit
    assert len(server.calls) == len(ep.actions) == len(ep.observations) == 3
    assert all("Error:" in o for o in ep.observations) and ep.info["invalid_actions"] == 3
    assert ep.end_reason == "max_turns" and ep.info["answer"] is None
    assert ep.reward == 0.0 and ep.reward_extra_info["em"] == 0.0 and ep.reward_extra_info["answered"] == 0.0

    # response = generated ids, then the observation tokenised on its own, ...; the last turn's
    # observation (the turn-limit notice) ends the episode unappended
    gens = [list(c.token_ids) for c in server.outputs]
    obs = [tok.encode(o, add_special_tokens=False) for o in ep.observations[:-1]]
    want_ids, want_mask = [], []
    for k, g in enumerate(gens):
        assert 1 <= len(g) <= 12
        want_ids += g
        want_mask += [1] * len(g)
        if k < len(obs):
            want_ids += obs[k]
            want_mask += [0] * len(obs[k])
    assert ep.response_ids == want_ids and ep.response_mask == want_mask
    assert ep.prompt_ids == prompt_ids and ep.num_turns == 1 + 3 + 2

    # each turn was asked with the exact history, an action-end stop and the turn cap
    offset = 0
    for k, (rid, ids, sp) in enumerate(server.calls):
        assert ids == prompt_ids + ep.response_ids[:offset]
        assert sp["stop"] == list(STOPS["tags"]) and sp["max_tokens"] == 12 and sp["temperature"] == 1.0
        assert rid == server.calls[0][0]  # one request id per episode (verl's sticky session)
        offset += len(gens[k]) + (len(obs[k]) if k < len(obs) else 0)

    # log-probs: the sampled ones on generated tokens, 0 on observations, aligned with the ids
    assert len(ep.response_logprobs) == len(ep.response_ids)
    sampled = [lp for c in server.outputs for lp in c.logprobs]
    assert [lp for lp, m in zip(ep.response_logprobs, ep.response_mask) if m] == sampled
    assert all(lp == 0.0 for lp, m in zip(ep.response_logprobs, ep.response_mask) if not m)
    full = forward_logprobs(model, prompt_ids, ep.response_ids)
    got = [lp for lp, m in zip(ep.response_logprobs, ep.response_mask) if m]
    assert got == pytest.approx([f for f, m in zip(full, ep.response_mask) if m], abs=1e-4)

    # prompt + response decode to the episode's text: the env's own transcript
    transcript = env.render()
    assert transcript.startswith(prompt) and transcript.endswith(ep.observations[-1])
    text = tok.decode(ep.prompt_ids + ep.response_ids)
    assert text == tok.decode(prompt_ids) + transcript[len(prompt): len(transcript) - len(ep.observations[-1])]
    assert ep.actions == [tok.decode(g) for g in gens]


@pytest.mark.parametrize("answer,gold,reward", [("yes", ["yes"], "em"), ("no", ["yes"], "em"),
                                                ("Paris, France", ["Paris"], "f1")])
def test_scripted_episode_reward_is_the_env_grade(tiny, answer, gold, reward):
    model, tok = tiny
    env = make_env(reward=reward)
    row = {"extra_info": {"question": "Scott Derrickson's nationality?"}, "reward_model": {"ground_truth": gold}}
    prompt, prompt_ids = start(env, tok, row)
    # the first turn runs past its action's end (the server ignores stop): the loop cuts it there
    script = ["<think>search him</think><search>Scott Derrickson</search> <information>made up</information>",
              f"<answer>{answer}</answer>"]
    server = ScriptServer(model, tok, script)
    ep = play(server, env, tok, prompt_ids)

    g = grade(answer, gold)
    assert ep.end_reason == "answer" and ep.info["answer"] == answer
    assert ep.reward == pytest.approx(g.get(reward)) and ep.reward == ep.info[reward]
    assert ep.reward_extra_info["em"] == g.em and ep.reward_extra_info["f1"] == pytest.approx(g.f1)
    assert (ep.reward == 1.0) == (answer == "yes") and (0 < ep.reward < 1) == (reward == "f1")

    assert ep.actions[0].rstrip() == "<think>search him</think><search>Scott Derrickson</search>"
    assert ep.info["searches"] == ["Scott Derrickson"] and ep.info["invalid_actions"] == 0
    assert ep.observations[0].startswith("\n\n<information>Doc 1 (Title: Scott Derrickson)")
    cut = len(tok.encode(ep.actions[0], add_special_tokens=False))
    assert cut < len(server.outputs[0])  # the made-up tail was dropped, not sent to the env
    obs = tok.encode(ep.observations[0], add_special_tokens=False)
    assert ep.response_ids == server.outputs[0][:cut] + obs + server.outputs[1]
    assert ep.response_mask == [1] * cut + [0] * len(obs) + [1] * len(server.outputs[1])
    assert "made up" not in tok.decode(ep.response_ids)
    assert ep.response_mask[-1] == 1  # the reward lands on the model's own last token
    full = forward_logprobs(model, prompt_ids, ep.response_ids)
    assert ep.response_logprobs == pytest.approx([f if m else 0.0 for f, m in zip(full, ep.response_mask)], abs=1e-4)


def test_response_length_ends_the_episode_on_a_generated_token(tiny):
    model, tok = tiny
    script = ["<search>Ed Wood</search>", "<answer>yes</answer>"]
    first = tok.encode(script[0], add_special_tokens=False)

    env = make_env()
    _, prompt_ids = start(env, tok)
    server = ScriptServer(model, tok, script)
    ep = play(server, env, tok, prompt_ids, response_length=len(first) + 5)  # the observation does not fit
    assert len(server.calls) == 1 and ep.end_reason == "response_length" and ep.reward == 0.0
    assert ep.response_ids == first and ep.response_mask == [1] * len(first)
    assert ep.observations[0].startswith("\n\n<information>Doc 1 (Title: Ed Wood")  # kept, not appended
    assert ep.reward_extra_info["answered"] == 0.0

    env = make_env()
    _, prompt_ids = start(env, tok)
    server = ScriptServer(model, tok, script)
    ep = play(server, env, tok, prompt_ids, response_length=4, max_tokens_per_turn=100)
    assert server.calls[0][2]["max_tokens"] == 4 and ep.response_ids == first[:4]
    assert "Error:" in ep.observations[0] and ep.end_reason == "response_length"

    env = make_env()
    _, prompt_ids = start(env, tok)
    ep = play(ScriptServer(model, tok, script), env, tok, prompt_ids, response_length=4096, max_tokens_per_turn=100)
    assert ep.end_reason == "answer" and ep.reward == 1.0  # the same script, with room


def test_no_logprobs_asked_none_returned(tiny):
    model, tok = tiny
    env = make_env()
    _, prompt_ids = start(env, tok)
    ep = asyncio.run(play_episode(ScriptServer(model, tok, ["<answer>yes</answer>"]), env, tok, prompt_ids,
                                  dict(SAMPLING, logprobs=False), response_length=64))
    assert ep.response_logprobs is None and ep.reward == 1.0


def test_dataset_rows_are_verl_rows_the_loop_reads():
    ds = build_dataset("hotpotqa", limit=2, top_k=1, max_turns=3)
    assert {"data_source", "agent_name", "prompt", "ability", "reward_model", "extra_info"} <= set(ds.column_names)
    row = ds[0]
    assert row["agent_name"] == AGENT_NAME and row["reward_model"]["ground_truth"] == row["extra_info"]["answers"]
    env = make_env()
    prompt, info = env.reset(options=row_options(row))
    assert row["prompt"] == [{"role": "user", "content": prompt}] and "at most 3 actions" in prompt
    assert info["question_id"] == row["extra_info"]["id"]
    assert env.privileged()["answers"] == row["extra_info"]["answers"]
    assert env.privileged()["supporting_titles"] == row["extra_info"]["supporting_titles"]
    assert row_options({"extra_info": {"question_id": "abc"}}) == {"question_id": "abc"}
    with pytest.raises(ValueError, match="extra_info.question"):
        row_options({"extra_info": {}, "reward_model": {"ground_truth": ["x"]}})


# -- verl's own classes (skipped where verl cannot be imported) ---------------------------------

def test_without_verl_the_loop_class_says_what_is_missing():
    import envs.verl as mod

    if mod._VERL_MISSING is None:
        pytest.skip("verl is importable")
    with pytest.raises(ImportError, match="needs verl"):
        mod.WebQAAgentLoop


def make_verl_loop(agent_loop, server, tok, env_kwargs, max_tokens_per_turn, response_length=512):
    """The loop as AgentLoopWorker builds it: the YAML entry (name, _target_, our keys) plus verl's
    arguments, through ``hydra.utils.instantiate``."""
    import hydra
    from omegaconf import OmegaConf

    entry = OmegaConf.create({"name": AGENT_NAME, "_target_": "envs.verl.WebQAAgentLoop", "env_id": "WebQA-v0",
                              "env_kwargs": env_kwargs, "max_tokens_per_turn": max_tokens_per_turn})
    trainer = OmegaConf.create({"actor_rollout_ref": {"rollout": {"prompt_length": 1024,
                                                                  "response_length": response_length}},
                                "data": {}})
    params = inspect.signature(agent_loop.AgentLoopBase.__init__).parameters
    data_key = "data_config" if "data_config" in params else "dataset_config"  # 0.9 / 0.8
    return hydra.utils.instantiate(entry, trainer_config=agent_loop.DictConfigWrap(trainer), server_manager=server,
                                   tokenizer=tok, processor=None, dataset_cls=None,
                                   **{data_key: agent_loop.DictConfigWrap(trainer.data)})


def verl_row(answers=None, **env_kwargs):
    """A row as verl's dataset hands it to ``run``: from ``build_dataset``, the prompt as ``raw_prompt``."""
    row = build_dataset("hotpotqa", limit=1, **env_kwargs)[0]
    row = {"raw_prompt": row["prompt"], "extra_info": row["extra_info"], "reward_model": row["reward_model"],
           "data_source": row["data_source"], "index": 0, "tools_kwargs": {}}
    if answers is not None:
        row["extra_info"] = dict(row["extra_info"], answers=answers)
    return row


def run_verl_loop(loop, row):
    try:  # verl's base class made (or took) the thread's event loop: run on it, as AgentLoopWorker does
        return loop.loop.run_until_complete(loop.run(dict(SAMPLING), **row))
    finally:
        loop.loop.close()
        asyncio.set_event_loop(None)


def test_verl_builds_and_runs_the_registered_loop(tiny):
    agent_loop = pytest.importorskip("verl.experimental.agent_loop.agent_loop")
    from envs.verl import WebQAAgentLoop

    model, tok = tiny
    assert AGENT_NAME == "webqa"  # the name the issue asks for: YAML entries and rows use it
    assert agent_loop._agent_loop_registry[AGENT_NAME] == {"_target_": "envs.verl.WebQAAgentLoop"}
    script = ["<search>Scott Derrickson</search>", "<answer>yes</answer>"]
    server = ScriptServer(model, tok, script)
    loop = make_verl_loop(agent_loop, server, tok, {"top_k": 1, "passage_chars": 120, "max_turns": 3}, 100)
    assert isinstance(loop, WebQAAgentLoop) and loop.env.max_turns == 3 and loop.response_length == 512

    row = verl_row(answers=["yes"], top_k=1, max_turns=3)
    out = run_verl_loop(loop, row)
    assert isinstance(out, agent_loop.AgentLoopOutput)
    assert out.prompt_ids == chat_prompt_ids(tok, row["raw_prompt"])
    assert out.reward_score == 1.0 and out.extra_fields["reward_extra_info"]["em"] == 1.0
    assert out.extra_fields["webqa"]["end_reason"] == "answer" and out.num_turns == 4
    assert out.metrics.generate_sequences > 0 and out.metrics.num_preempted == 0

    env = make_env()  # the same episode through play_episode directly
    env.reset(options=row_options(row))
    ep = play(ScriptServer(model, tok, script), env, tok, out.prompt_ids, response_length=512)
    assert (out.response_ids, out.response_mask) == (ep.response_ids, ep.response_mask)
    assert out.response_logprobs == pytest.approx(ep.response_logprobs)
    if hasattr(out, "as_dict"):  # verl >= 0.9: the tensors verl trains on
        d = out.as_dict()
        assert d["rm_scores"].tolist() == [0.0] * (len(ep.response_ids) - 1) + [1.0]
        assert d["response_mask"].tolist() == ep.response_mask


def test_server_manager_has_verls_generate_signature():
    """PolicyServer.generate takes exactly what verl 0.9.1's client's ``generate`` takes."""
    llm_server = pytest.importorskip("verl.workers.rollout.llm_server")

    def shape(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert shape(PolicyServer.generate) == shape(llm_server.LLMServerClient.generate)
    assert list(inspect.signature(llm_server.LLMServerClient.generate).parameters)[:4] == \
        ["self", "request_id", "prompt_ids", "sampling_params"]


# -- through a real OpenAI-compatible server on 127.0.0.1 -----------------------------------------

PENALTY = 0.5  # format_penalty: an episode without an answer scores -PENALTY, not the 0 a loop starts from
HTTP_ENV = {"top_k": 1, "passage_chars": 120, "max_turns": 3, "format_penalty": PENALTY}
TURN_TOKENS = 12


@pytest.fixture(scope="module")
def http_server():
    """``python -m agents.openai_server --model tiny-random:small`` on a free loopback port: the very
    model the ``tiny`` fixture builds (the ``small`` vocabulary, seed 0, the same sizes)."""
    srv = ModelServerProcess("tiny-random:small", ["--threads", "1"]).start(wait=False)
    try:
        assert srv.wait_ready(), srv.log_text()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def http_policy(http_server, tiny):
    pol = OpenAIPolicy(http_server.url, api="completions", retries=0)
    assert pol.tokenizer.get_vocab() == tiny[1].get_vocab()  # the server names its tokenizer: ours
    yield pol
    pol.close()


def served(srv):
    """(POSTs the server answered 200, generation requests it ran), from its own ``/health``."""
    h = requests.get(srv.base + "/health", timeout=10).json()
    return h["requests"]["by_status"].get("200", 0), h["jobs"]["requests"]


def replay(row, actions, **env_kwargs):
    """The actions through a fresh env: (its observations, its final reward, its info)."""
    env = make_env(**env_kwargs)
    env.reset(options=row_options(row))
    observations = []
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        observations.append(obs)
        if terminated or truncated:
            return observations, reward, info
    raise AssertionError("the actions did not end the episode")


def check_http_episode(model, tok, server, prompt_ids, response_ids, response_mask, response_logprobs, observations):
    """The response is what the server generated, interleaved with the env's observations; the
    log-probs on generated tokens are the ones the server sent (and a forward pass agrees)."""
    gens = [list(c.token_ids) for c in server.outputs]
    assert len(gens) == len(server.calls) == len(observations) and all(1 <= len(g) <= TURN_TOKENS for g in gens)
    want_ids, want_mask = [], []
    for k, g in enumerate(gens):  # each turn's ids, then its observation (not the last: it ended the episode)
        want_ids += g
        want_mask += [1] * len(g)
        if k < len(gens) - 1:
            o = tok.encode(observations[k], add_special_tokens=False)
            want_ids += o
            want_mask += [0] * len(o)
    assert response_ids == want_ids and response_mask == want_mask

    sent = [lp for c in server.outputs for lp in c.logprobs]  # as the server's JSON had them
    assert len(sent) == sum(response_mask) and all(math.isfinite(x) and x < 0 for x in sent)
    assert [lp for lp, m in zip(response_logprobs, response_mask) if m] == sent
    assert all(lp == 0.0 for lp, m in zip(response_logprobs, response_mask) if not m)
    full = forward_logprobs(model, prompt_ids, response_ids)  # the server's model is ours, to the bit
    assert sent == pytest.approx([f for f, m in zip(full, response_mask) if m], abs=1e-4)

    offset = 0
    for k, (rid, ids, sp) in enumerate(server.calls):  # each turn asked with the exact history
        assert rid == server.calls[0][0] and ids == prompt_ids + response_ids[:offset]
        assert sp["stop"] == list(STOPS["tags"]) and sp["max_tokens"] == TURN_TOKENS
        if k < len(gens) - 1:
            offset += len(tok.encode(observations[k], add_special_tokens=False))
        offset += len(gens[k])


def test_episode_through_an_openai_server_on_loopback(tiny, http_server, http_policy):
    """play_episode with verl's server-manager interface over a real HTTP server (tiny random model)."""
    model, tok = tiny
    env = make_env(**HTTP_ENV)
    _, prompt_ids = start(env, tok)
    server = PolicyServer(http_policy, seed=7)
    before = served(http_server)
    ep = play(server, env, tok, prompt_ids, max_tokens_per_turn=TURN_TOKENS)
    after = served(http_server)

    # every turn was one request that reached the server, and nothing else did
    assert len(server.calls) == len(ep.actions) == 3
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)
    check_http_episode(model, tok, server, prompt_ids, ep.response_ids, ep.response_mask, ep.response_logprobs,
                       ep.observations)
    assert ep.actions == [tok.decode(c.token_ids) for c in server.outputs]

    # a random model writes no valid action: the env's grade is no answer, less the format penalty
    observations, reward, info = replay(ROW, ep.actions, **HTTP_ENV)
    assert observations == ep.observations and info["answer"] is None and info["invalid_actions"] == 3
    assert ep.reward == reward == -PENALTY and ep.end_reason == "max_turns"
    assert ep.reward_extra_info["invalid_actions"] == 3.0 and ep.reward_extra_info["answered"] == 0.0


def test_verl_loop_runs_against_an_openai_server_on_loopback(tiny, http_server, http_policy):
    """verl's WebQAAgentLoop.run() (built as verl's worker builds it) with a server manager whose
    requests go to the real HTTP server; the same episode again through play_episode."""
    agent_loop = pytest.importorskip("verl.experimental.agent_loop.agent_loop")
    model, tok = tiny
    server = PolicyServer(http_policy, seed=11)
    loop = make_verl_loop(agent_loop, server, tok, HTTP_ENV, TURN_TOKENS)
    row = verl_row(top_k=1, max_turns=3)
    before = served(http_server)
    out = run_verl_loop(loop, row)
    after = served(http_server)

    assert isinstance(out, agent_loop.AgentLoopOutput)
    assert len(server.calls) == 3 and (after[0] - before[0], after[1] - before[1]) == (3, 3)
    assert out.prompt_ids == chat_prompt_ids(tok, row["raw_prompt"])
    actions = out.extra_fields["webqa"]["actions"]
    observations, reward, info = replay(row, actions, **HTTP_ENV)
    check_http_episode(model, tok, server, out.prompt_ids, out.response_ids, out.response_mask,
                       out.response_logprobs, observations)
    assert out.reward_score == reward == -PENALTY and info["answer"] is None
    assert out.extra_fields["webqa"]["end_reason"] == "max_turns" and out.num_turns == 1 + 3 + 2
    assert out.extra_fields["reward_extra_info"]["invalid_actions"] == 3.0
    assert out.metrics.generate_sequences > 0
    if hasattr(out, "as_dict"):  # verl >= 0.9: the reward lands on the last (generated) token
        d = out.as_dict()
        assert d["rm_scores"].tolist() == [0.0] * (len(out.response_ids) - 1) + [-PENALTY]
        assert d["response_mask"].tolist() == out.response_mask and out.response_mask[-1] == 1

    # the same seeds through play_episode directly: the same episode, request for request
    again = PolicyServer(http_policy, seed=11)
    env = make_env(**HTTP_ENV)
    env.reset(options=row_options(row))
    ep = play(again, env, tok, out.prompt_ids, response_length=512, max_tokens_per_turn=TURN_TOKENS)
    assert (ep.response_ids, ep.response_mask, ep.reward) == (out.response_ids, out.response_mask, out.reward_score)
    assert ep.response_logprobs == pytest.approx(out.response_logprobs, abs=1e-6)
    assert served(http_server)[1] - after[1] == 3


# -- a real verl GRPO job (GPU) --------------------------------------------------------------------

@pytest.mark.gpu
def test_verl_grpo_job_on_the_webqa_loop(tmp_path):
    """Two steps of a real verl GRPO job on WebQA: ``python -m verl.trainer.main_ppo`` with vLLM async
    rollouts through ``envs.verl.WebQAAgentLoop``; it must exit 0 and log a reward for both steps.

    Needs verl 0.9.1 with vLLM, a CUDA GPU and ``WEBQA_VERL_MODEL`` (a small chat model, a local
    folder or hub id, e.g. Qwen/Qwen2.5-0.5B-Instruct); skipped otherwise. It has NOT been run: the
    machine it was written on has no GPU. The overrides are verl 0.9.1's
    (``verl/trainer/config/_generated_ppo_trainer.yaml`` and ``rollout/rollout.yaml``).
    ``WEBQA_VERL_TIMEOUT`` (seconds, default 1800) bounds the job.
    """
    pytest.importorskip("verl.experimental.agent_loop.agent_loop")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm")
    model_path = os.environ.get("WEBQA_VERL_MODEL")
    if not model_path:
        pytest.skip("set WEBQA_VERL_MODEL to a small chat model (folder or hub id) to run the verl GRPO job")
    import importlib.util

    env_kwargs = {"top_k": 1, "max_turns": 2}
    train = tmp_path / "train.parquet"
    build_dataset("hotpotqa", limit=8, **env_kwargs).to_parquet(str(train))
    loops = tmp_path / "agent_loops.yaml"
    loops.write_text(f"- name: {AGENT_NAME}\n  _target_: envs.verl.WebQAAgentLoop\n  env_id: WebQA-v0\n"
                     f"  env_kwargs: {json.dumps(env_kwargs)}\n  max_tokens_per_turn: 64\n")
    metrics = tmp_path / "metrics.jsonl"
    overrides = [
        "algorithm.adv_estimator=grpo",
        f"data.train_files={train}", f"data.val_files={train}",
        "data.train_batch_size=2", "data.max_prompt_length=1024", "data.max_response_length=512",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={model_path}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.mode=async",
        "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.4", "actor_rollout_ref.rollout.enforce_eager=True",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={loops}",
        f"actor_rollout_ref.rollout.agent.default_agent_loop={AGENT_NAME}",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "reward.num_workers=1",
        "trainer.n_gpus_per_node=1", "trainer.nnodes=1", "trainer.logger=[console,file]",
        "trainer.val_before_train=False", "trainer.test_freq=-1", "trainer.save_freq=-1",
        "trainer.total_training_steps=2", "trainer.project_name=webqa_test", "trainer.experiment_name=grpo_smoke",
        f"trainer.default_local_dir={tmp_path / 'checkpoints'}",
    ]
    if importlib.util.find_spec("transfer_queue") is None:  # 0.9.1's default V1 trainer needs it; verl does not pin it
        overrides.append("trainer.use_v1=False")
    if importlib.util.find_spec("flash_attn") is None:  # verl's default attention is flash_attention_2
        overrides.append("+actor_rollout_ref.model.override_config.attn_implementation=sdpa")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               VERL_FILE_LOGGER_PATH=str(metrics), HYDRA_FULL_ERROR="1", WANDB_MODE="disabled")
    timeout = float(os.environ.get("WEBQA_VERL_TIMEOUT", "1800"))
    proc = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", *overrides], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-8000:]
    logged = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    scored = {r["step"]: r["data"]["critic/score/mean"] for r in logged if "critic/score/mean" in r["data"]}
    assert sorted(scored) == [1, 2], proc.stdout[-4000:]
    assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in scored.values())
    assert "critic/score/mean" in proc.stdout  # the console logger printed it too
