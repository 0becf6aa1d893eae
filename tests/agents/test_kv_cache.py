"""The KV cache the transformers policy keeps between turns changes nothing but the time."""
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
