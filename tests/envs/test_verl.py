"""WebQA inside verl (envs/verl.py): the episode loop against a server manager with verl's
``generate`` signature, backed by a tiny real model; then verl's own agent-loop base class,
registry and output where verl is importable (it pulls in ray, tensordict, fastapi, ...)."""
import asyncio
from dataclasses import dataclass

import gymnasium as gym
import pytest
import torch

from agents.hf_policy import TransformersPolicy
from agents.models import tiny_random_model
from agents.policy import SamplingParams
from envs.grading import grade
from envs.verl import AGENT_NAME, STOPS, build_dataset, chat_prompt_ids, play_episode, row_options

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
    """verl's server manager (``generate(request_id, *, prompt_ids, sampling_params, ...)`` ->
    TokenOutput) on our transformers policy: real sampling, raw log-probs, stop strings."""

    def __init__(self, policy, seed=0):
        self.policy, self.seed, self.calls, self.outputs = policy, seed, [], []

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, video_data=None, **kw):
        sp = dict(sampling_params)
        self.calls.append((request_id, list(prompt_ids), sp))
        params = SamplingParams(temperature=sp["temperature"], top_p=sp["top_p"], top_k=max(0, sp["top_k"]),
                                max_new_tokens=sp["max_tokens"], stop=tuple(sp["stop"]),
                                seed=self.seed + len(self.calls))
        c = self.policy.generate([list(prompt_ids)], params)[0]
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
    return gym.make("WebQA-v0", top_k=1, passage_chars=120, render_mode="ansi", **{"max_turns": 3, **kw}).unwrapped


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


def test_verl_builds_and_runs_the_registered_loop(tiny):
    agent_loop = pytest.importorskip("verl.experimental.agent_loop.agent_loop")
    import inspect

    import hydra
    from omegaconf import OmegaConf

    from envs.verl import WebQAAgentLoop

    model, tok = tiny
    assert agent_loop._agent_loop_registry[AGENT_NAME] == {"_target_": "envs.verl.WebQAAgentLoop"}
    # as AgentLoopWorker does: the YAML entry (name, _target_, our keys) plus verl's arguments
    entry = OmegaConf.create({"name": AGENT_NAME, "_target_": "envs.verl.WebQAAgentLoop", "env_id": "WebQA-v0",
                              "env_kwargs": {"top_k": 1, "passage_chars": 120, "max_turns": 3},
                              "max_tokens_per_turn": 100})
    trainer = OmegaConf.create({"actor_rollout_ref": {"rollout": {"prompt_length": 1024, "response_length": 512}},
                                "data": {}})
    params = inspect.signature(agent_loop.AgentLoopBase.__init__).parameters
    data_key = "data_config" if "data_config" in params else "dataset_config"  # 0.9 / 0.8
    script = ["<search>Scott Derrickson</search>", "<answer>yes</answer>"]
    server = ScriptServer(model, tok, script)
    loop = hydra.utils.instantiate(entry, trainer_config=agent_loop.DictConfigWrap(trainer), server_manager=server,
                                   tokenizer=tok, processor=None, dataset_cls=None,
                                   **{data_key: agent_loop.DictConfigWrap(trainer.data)})
    assert isinstance(loop, WebQAAgentLoop) and loop.env.max_turns == 3 and loop.response_length == 512

    row = build_dataset("hotpotqa", limit=1, top_k=1, max_turns=3)[0]
    row = {"raw_prompt": row["prompt"], "extra_info": row["extra_info"], "reward_model": row["reward_model"],
           "data_source": row["data_source"], "index": 0, "tools_kwargs": {}}
    row["extra_info"] = dict(row["extra_info"], answers=["yes"])
    try:  # verl's base class made (or took) the thread's event loop: run on it, as AgentLoopWorker does
        out = loop.loop.run_until_complete(loop.run(dict(SAMPLING), **row))
    finally:
        loop.loop.close()
        asyncio.set_event_loop(None)
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
