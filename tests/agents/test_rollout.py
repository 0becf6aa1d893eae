"""Rollout bookkeeping: exact ids, loss mask, log-probs, budgets, any text env."""
import gymnasium as gym
import pytest
import torch

import envs  # noqa: F401
from agents.hf_policy import TransformersPolicy
from agents.models import byte_tokenizer, tiny_random_model
from agents.policy import SamplingParams
from agents.rollout import rollout
from agents.scripted import BaselineAgent, OracleAgent
from agents.scripted_policy import ScriptedPolicy
from trajectory_checks import agent_logprobs, mask_runs


class Recording:
    """Wraps a policy and keeps every completion it returned."""

    def __init__(self, policy):
        self.p, self.calls = policy, []

    def __getattr__(self, name):
        return getattr(self.p, name)

    def generate(self, prompts, sampling, contexts=None):
        out = self.p.generate(prompts, sampling, contexts)
        self.calls.append(([c["episode"] for c in contexts], out))
        return out

    def turn_scheduler(self, sampling):
        return RecordingScheduler(self.p.turn_scheduler(sampling), self.calls)


class RecordingScheduler:
    def __init__(self, sched, calls):
        self.s, self.calls = sched, calls

    def __getattr__(self, name):
        return getattr(self.s, name)

    def advance(self):
        out = self.s.advance()
        self.calls.append(([k for k, _ in out], [c for _, c in out]))
        return out


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = tiny_random_model("bytes", seed=0)
    return TransformersPolicy(model, tok)


@pytest.mark.parametrize("schedule", ["lockstep", "continuous"])
def test_ids_are_exactly_generated_plus_tokenised_observations(tiny, schedule):
    pol = Recording(tiny)
    trajs = rollout(pol, lambda: gym.make("WebQA-v0"), [{"index": 0}, {"index": 3}], group_size=2, schedule=schedule,
                    sampling=SamplingParams(temperature=1.0, seed=1), max_tokens_per_turn=24, max_total_tokens=2000)
    assert pol.calls and len(trajs) == 4 and [t.sample_index for t in trajs] == [0, 1, 0, 1]
    for j, tr in enumerate(trajs):
        generated = [c.token_ids for eps, outs in pol.calls for e, c in zip(eps, outs) if e == j]
        segs = mask_runs(tr)
        agent = [s for m, s in segs if m == 1]
        env = [s for m, s in segs if m == 0]
        assert agent == generated  # mask 1 exactly on what the policy produced, in order
        assert env == [tiny.encode(o) for o in tr.observations[: len(env)]]  # mask 0 on tokenised observations
        assert len(tr.logprobs) == len(tr.completion_ids)
        assert all(lp == 0.0 for lp, m in zip(tr.logprobs, tr.loss_mask) if m == 0)
        assert tr.text == tiny.decode(tr.prompt_ids + tr.completion_ids)


def test_sampling_logprobs_match_a_full_forward_pass(tiny):
    tr = rollout(tiny, lambda: gym.make("WebQA-v0"), [{"index": 5}], sampling=SamplingParams(temperature=1.0, seed=3),
                 max_tokens_per_turn=20, max_total_tokens=600)[0]
    got, want = agent_logprobs(tiny.model, tr)
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("schedule,batch_size", [("lockstep", None), ("continuous", None), ("continuous", 2)])
def test_every_episodes_logprobs_match_a_full_forward_pass(tiny, schedule, batch_size):
    """The continuous schedule cuts rows out of the batched KV cache and splices them back with
    their observations prefilled: every sampled token's log-prob must still be the model's."""
    trajs = rollout(tiny, lambda: gym.make("WebQA-v0"), [{"index": i} for i in range(3)], group_size=2,
                    sampling=SamplingParams(temperature=1.0, seed=7), max_tokens_per_turn=16, max_total_tokens=900,
                    schedule=schedule, batch_size=batch_size)
    assert sum(len(t.actions) for t in trajs) > len(trajs)  # several turns: observations were spliced in
    for tr in trajs:
        got, want = agent_logprobs(tiny.model, tr)
        assert got == pytest.approx(want, abs=1e-4)


def test_grouped_query_attention_logprobs_match_a_full_forward_pass():
    """Qwen2.5 shares each key/value head among several query heads (the attention kernels then
    take other paths for cached prefills and decode steps): log-probs are still the model's."""
    model, tok = tiny_random_model("bytes", num_heads=4, num_kv_heads=2, architecture="qwen2", seed=1)
    pol = TransformersPolicy(model, tok)
    trajs = rollout(pol, lambda: gym.make("WebQA-v0"), [{"index": i} for i in range(3)], group_size=2,
                    sampling=SamplingParams(temperature=1.0, seed=5), max_tokens_per_turn=16, max_total_tokens=900,
                    schedule="continuous", batch_size=3)
    assert sum(len(t.actions) for t in trajs) > len(trajs)
    for tr in trajs:
        got, want = agent_logprobs(model, tr)
        assert got == pytest.approx(want, abs=1e-4)


def test_continuous_greedy_gives_the_lockstep_episodes(tiny):
    opts = [{"index": i} for i in range(5)]
    kw = dict(sampling=SamplingParams(temperature=0), max_tokens_per_turn=12, max_total_tokens=800)
    lock = rollout(tiny, lambda: gym.make("WebQA-v0"), opts, schedule="lockstep", **kw)
    seen = []
    cont = rollout(tiny, lambda: gym.make("WebQA-v0"), opts, schedule="continuous", batch_size=2,
                   on_episode=lambda tr: seen.append(tr.question_id), **kw)
    assert [t.completion_ids for t in cont] == [t.completion_ids for t in lock]
    assert [t.loss_mask for t in cont] == [t.loss_mask for t in lock]
    assert [t.actions for t in cont] == [t.actions for t in lock]
    assert sorted(seen) == sorted(t.question_id for t in lock) and len(seen) == 5  # each once, as it finished


def test_continuous_decode_steps_are_the_longest_episode_not_the_sum_of_turn_maxima(tiny):
    """Lockstep turns last until their longest row stops; a continuous row never waits: with every
    episode under way at once, decode steps = the most agent tokens of one episode."""
    steps = []
    tiny.turn_scheduler(SamplingParams())  # its one-off model checks run before counting

    def decode_step(m, a, kw):  # forwards that sample tokens: plain decode steps and packed joins
        if (kw["input_ids"].shape[1] == 1 and kw.get("past_key_values")) or kw.get("webqa_packed"):
            steps.append(1)

    hook = tiny.model.register_forward_pre_hook(decode_step, with_kwargs=True)
    try:
        trajs = rollout(tiny, EchoEnv, [{}], group_size=4, max_tokens_per_turn=40, max_turns=5, schedule="continuous",
                        sampling=SamplingParams(temperature=1.0, seed=1, stop=("t",)))
    finally:
        hook.remove()
    lengths = [[b - a for a, b in t.info["turn_spans"]] for t in trajs]
    lockstep_bound = sum(max(turn) for turn in zip(*lengths))
    assert len(steps) == max(t.num_agent_tokens for t in trajs) < lockstep_bound, (len(steps), lengths)


def test_unknown_schedule_is_named(tiny):
    with pytest.raises(ValueError, match="schedule"):
        rollout(tiny, EchoEnv, [{}], schedule="async")
    with pytest.raises(ValueError, match="continuous"):
        rollout(ScriptedPolicy(OracleAgent, byte_tokenizer()), lambda: gym.make("WebQA-v0"), [{"index": 0}],
                schedule="continuous")


def test_batched_greedy_equals_one_by_one(tiny):
    prompts = [tiny.prompt_ids("short"), tiny.prompt_ids("a much longer prompt " * 5), tiny.prompt_ids("mid length prompt")]
    sp = SamplingParams(temperature=0, max_new_tokens=12, stop=())
    batch = tiny.generate(prompts, sp)
    single = [tiny.generate([p], sp)[0] for p in prompts]
    assert [c.token_ids for c in batch] == [c.token_ids for c in single]
    for b, s in zip(batch, single):
        assert b.logprobs == pytest.approx(s.logprobs, abs=1e-4)


def test_context_budget_truncates_but_keeps_the_question(tiny):
    trajs = rollout(tiny, lambda: gym.make("WebQA-v0"), [{"index": 0}], max_tokens_per_turn=30, max_total_tokens=50,
                    sampling=SamplingParams(seed=0))
    tr = trajs[0]
    assert tr.truncation == "context_budget" and len(tr.completion_ids) <= 50
    assert "Question: Were Scott Derrickson and Ed Wood of the same nationality?" in tiny.decode(tr.prompt_ids)


def test_scripted_rollout_reproduces_the_scripted_episode():
    tok = byte_tokenizer()
    for agent in (OracleAgent, BaselineAgent):
        trajs = rollout(ScriptedPolicy(agent, tok), lambda: gym.make("WebQA-v0"), [{"index": i} for i in range(6)],
                        with_privileged=True)
        for i, tr in enumerate(trajs):  # the same episode, stepped by hand in a fresh env
            env = gym.make("WebQA-v0")
            prompt, info = env.reset(options={"index": i})
            a = agent()
            a.reset(prompt, info, env.unwrapped.privileged())
            obs, acts, seen = prompt, [], []
            while True:
                acts.append(a.act(obs))
                obs, reward, term, trunc, step_info = env.step(acts[-1])
                seen.append(obs)
                if term or trunc:
                    break
            assert tr.actions == acts and tr.observations == seen
            assert (tr.em, tr.f1, tr.reward) == (step_info["em"], step_info["f1"], reward)


class EchoEnv(gym.Env):
    """Not WebQA: answers 'ok' twice, then ends. Shows the rollout needs only the text protocol."""

    observation_space = gym.spaces.Text(100)
    action_space = gym.spaces.Text(100)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return "Say anything.", {"question_id": "echo"}

    def step(self, action):
        self.t += 1
        return " ok ", float(self.t), self.t >= 2, False, {"answer": action}


def test_rollout_works_with_any_text_env(tiny):
    trajs = rollout(tiny, EchoEnv, [{}], group_size=3, max_tokens_per_turn=5, max_turns=5, sampling=SamplingParams(seed=0))
    assert all(t.terminated and t.reward == 2.0 and len(t.actions) == 2 for t in trajs)


@pytest.mark.slow
def test_real_small_model_rollout_mask_and_ids():
    """Acceptance: real rollouts with the embedded SmolLM2-135M keep exact ids and masks."""
    from agents.models import MissingModelPackage, load_model

    try:
        model, tok = load_model("small")
    except MissingModelPackage as exc:
        pytest.skip(str(exc))
    torch.set_num_threads(1)
    pol = Recording(TransformersPolicy(model, tok))
    trajs = rollout(pol, lambda: gym.make("WebQA-v0"), [{"index": 0}, {"index": 1}], max_tokens_per_turn=24,
                    max_total_tokens=1200, sampling=SamplingParams(temperature=1.0, seed=0))
    for j, tr in enumerate(trajs):
        generated = [c.token_ids for eps, outs in pol.calls for e, c in zip(eps, outs) if e == j]
        segs = mask_runs(tr)
        assert [s for m, s in segs if m == 1] == generated
        env = [s for m, s in segs if m == 0]
        assert env == [pol.encode(o) for o in tr.observations[: len(env)]]
        assert tr.prompt_ids[:3] == pol.prompt_ids("x")[:3]  # chat template applied


@pytest.mark.parametrize("packed", [True, False])
def test_new_episodes_prefill_only_what_they_do_not_share(tiny, packed):
    """G samples of one question prefill their prompt once; a later question prefills only the
    part after the template it shares with the earlier ones. Packed joins feed the rest (each
    copy's last prompt id; the later question's own part) in the forward that samples."""
    pol = TransformersPolicy(tiny.model, tiny.tokenizer, packed=packed)
    sched = pol.turn_scheduler(SamplingParams(temperature=0))
    assert sched.packed == packed
    fed = []
    hook = tiny.model.register_forward_pre_hook(
        lambda m, a, kw: fed.append(tuple(kw["input_ids"].shape)) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        p1, p2 = tiny.prompt_ids("Question: who wrote Hamlet?"), tiny.prompt_ids("Question: where is Bath?")
        for k in range(4):
            sched.submit(k, p1, 3)
        first = sched.advance()
        assert fed == [(1, len(p1) - 1)] + ([(1, 4)] if packed else [])  # one prefill for the four copies
        assert len({tuple(c.token_ids) for _, c in first}) == 1  # greedy: the same completion for each
        fed.clear()
        for k, _ in first:
            sched.release(k)
        sched.submit(9, p2, 3)
        (key, c), = sched.advance()
        shared = next(i for i, (a, b) in enumerate(zip(p1, p2)) if a != b)
        assert key == 9 and fed == [(1, len(p2) - shared - (0 if packed else 1))]
    finally:
        hook.remove()
    alone = TransformersPolicy(tiny.model, tiny.tokenizer).generate([p2], SamplingParams(temperature=0, max_new_tokens=3, stop=()))[0]
    assert c.token_ids == alone.token_ids and c.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_spare_layer_decodes_in_place_and_matches_a_plain_cache(tiny):
    """Decoding writes each new position into spare room (no copy of the cache per step) and
    gives the logits of transformers' own concatenating DynamicCache."""
    from transformers.cache_utils import DynamicCache

    from agents.hf_policy import _SpareLayer, _spare_cache

    m = tiny.model
    ids = torch.tensor([tiny.prompt_ids("Question: who wrote Hamlet?")])
    mine, plain = _spare_cache(spare=4), DynamicCache()
    with torch.no_grad():
        a = m(input_ids=ids, past_key_values=mine, use_cache=True).logits[:, -1]
        b = m(input_ids=ids, past_key_values=plain, use_cache=True).logits[:, -1]
        assert all(type(layer) is _SpareLayer for layer in mine.layers)
        buffers = [layer.kb.data_ptr() for layer in mine.layers]
        for step in range(6):  # 4 fit in the spare room, then one reallocation with room again
            tok = a.argmax(-1, keepdim=True)
            assert torch.equal(tok, b.argmax(-1, keepdim=True))
            a = m(input_ids=tok, past_key_values=mine, use_cache=True).logits[:, -1]
            b = m(input_ids=tok, past_key_values=plain, use_cache=True).logits[:, -1]
            assert torch.allclose(a, b, atol=1e-5)
            same = [layer.kb.data_ptr() for layer in mine.layers] == buffers
            assert same == (step < 4), step
        assert mine.get_seq_length() == plain.get_seq_length() == ids.shape[1] + 6
        layer = mine.layers[0]
        layer.crop(-2)  # keys set by DynamicLayer itself: copied into a buffer on the next update
        layer.update(layer.keys[..., :1, :], layer.values[..., :1, :])
        assert layer.keys.shape[-2] == ids.shape[1] + 5 and layer.keys.data_ptr() == layer.kb.data_ptr()


def test_prefill_groups_split_rows_of_very_different_lengths():
    from agents.schedulers import _FORWARD_COST, _prefill_groups, _Row

    def rows(*news):
        return [_Row(list(range(n + 1))) for n in news]  # nothing cached: n ids to prefill, the last is fed later

    assert _prefill_groups([]) == []
    same = rows(40, 42, 41)
    assert _prefill_groups(same) == [[same[0], same[2], same[1]]]  # one forward, short rows first
    mixed = rows(300, 5, 6)
    assert [[len(r.ids) - 1 for r in g] for g in _prefill_groups(mixed)] == [[5, 6], [300]]
    # the split is only made when padding costs more than another forward
    assert len(_prefill_groups(rows(5, 5 + _FORWARD_COST - 1))) == 1


def test_continuous_batch_drops_padding_when_a_long_row_leaves(tiny):
    """Rows are left-padded to the longest one; when that one leaves, the columns that are
    padding in every remaining row are dropped (no copy) so decode attention stops paying for them."""
    sched = tiny.turn_scheduler(SamplingParams(temperature=0, stop=()))
    long, short = tiny.prompt_ids("x " * 200), tiny.prompt_ids("short")
    sched.submit(0, long, 2)
    sched.submit(1, short, 5)
    (key, _), = sched.advance()  # the long row stops first (max 2 new tokens)
    assert key == 0
    width = sched.attn.shape[1]
    assert width == len(short) + 1  # only the short row's own positions are left
    assert all(layer.keys.shape[-2] == width for layer in sched.past.layers)
    (key, c), = sched.advance()
    alone = TransformersPolicy(tiny.model, tiny.tokenizer).generate([short], SamplingParams(temperature=0, max_new_tokens=5, stop=()))[0]
    assert key == 1 and c.token_ids == alone.token_ids and c.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_continuous_rollout_on_cuda(dtype):
    """The KV-cache surgery of the continuous schedule on a GPU: masks and ids exact, and in
    float32 every sampled token's log-prob equals a full forward pass."""
    model, tok = tiny_random_model("bytes", seed=0)
    pol = TransformersPolicy(model.to("cuda", dtype), tok)
    trajs = rollout(pol, lambda: gym.make("WebQA-v0"), [{"index": i} for i in range(3)], group_size=2,
                    sampling=SamplingParams(temperature=1.0, seed=7), max_tokens_per_turn=16, max_total_tokens=900,
                    schedule="continuous", batch_size=2)
    assert sum(len(t.actions) for t in trajs) > len(trajs)
    for tr in trajs:
        assert tr.text == pol.decode(tr.prompt_ids + tr.completion_ids)
        assert all(lp == 0.0 for lp, m in zip(tr.logprobs, tr.loss_mask) if m == 0)
        if dtype is torch.float32:
            got, want = agent_logprobs(model, tr)
            assert got == pytest.approx(want, abs=1e-3)
