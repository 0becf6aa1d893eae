"""VLLMPolicy against the in-process TransformersPolicy (greedy, small model). Needs vLLM and a
CUDA GPU; skips cleanly otherwise. The import-error message is checked everywhere."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from agents.policy import SamplingParams


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_names_the_extra():
    from agents.vllm_policy import VLLMPolicy

    with pytest.raises(ImportError, match=r"webqa-gym\[vllm\]"):
        VLLMPolicy("small")


@pytest.fixture(scope="module")
def pair():
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM tests need a CUDA GPU")
    from agents.hf_policy import TransformersPolicy
    from agents.models import MissingModelPackage, load_model
    from agents.vllm_policy import VLLMPolicy

    try:
        model, tok = load_model("small", dtype="float32", device="cuda")
    except MissingModelPackage as exc:
        pytest.skip(str(exc))
    # float32 on both sides so greedy ids agree; logprobs within float noise of two kernels
    vpol = VLLMPolicy("small", dtype="float32", gpu_memory_utilization=0.3, enable_lora=False, enforce_eager=True)
    return vpol, TransformersPolicy(model, tok)


def test_greedy_ids_and_logprobs_match_transformers(pair):
    vpol, hpol = pair
    prompts = [hpol.prompt_ids(q) for q in ("What is the capital of France?", "Who wrote Hamlet? Answer briefly.")]
    assert prompts == [vpol.prompt_ids(q) for q in ("What is the capital of France?", "Who wrote Hamlet? Answer briefly.")]
    sp = SamplingParams(temperature=0, max_new_tokens=24, stop=())
    got, ref = vpol.generate(prompts, sp), hpol.generate(prompts, sp)
    for g, r in zip(got, ref):
        n = 8  # the first tokens at least; later ones may flip on a near-tie between kernels
        assert g.token_ids[:n] == r.token_ids[:n]
        assert g.logprobs[:n] == pytest.approx(r.logprobs[:n], abs=2e-2)


def test_stop_strings_end_the_completion_like_transformers(pair):
    vpol, hpol = pair
    p = hpol.prompt_ids("What is the capital of France?")
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
