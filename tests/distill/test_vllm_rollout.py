"""``rollout.engine=vllm``: a 2-step grpo run whose episodes an in-process vLLM engine samples
(the small model + LoRA). The adapter changes; step 2 is sampled with step 1's adapter (the
metrics say so, and vLLM with that adapter decodes greedily what peft does); the sampler/learner
drift is logged; a run that lost step 2's checkpoint resumes to the uninterrupted run's weights. The same
with a separate ``vllm serve`` on 127.0.0.1 (``rollout.url``), whose adapters are loaded and
unloaded at run time. Runs wherever vLLM can (a CUDA GPU, or vLLM's CPU build: ``scripts/test_vllm_cpu.sh``)."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from agents.vllm_policy import vllm_device

DEVICE = vllm_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs vLLM on a CUDA GPU or vLLM's CPU build (vllm-cpu)")
ENGINE = ["rollout.engine=vllm", "rollout.enforce_eager=true", "rollout.max_model_len=1024"] + (
    ["rollout.kv_cache_memory_bytes=1073741824"] if DEVICE == "cpu" else [])
ARGS = ["model=small", "model.dtype=float32", "model.lora_r=8", "method=grpo", "env.id=ToyVowel-v0",
        "env.eval_id=ToyVowel-eval-v0", "questions_per_step=2", "group_size=4", "max_tokens_per_turn=24",
        "max_total_tokens=256", "eval.questions=0", "progress=false", "tensorboard=false", "lr=1e-2", *ENGINE]


def train(out, *extra):
    from distill.run import main

    assert main([*ARGS, f"output_dir={out}", *extra]) == 0


def lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from agents.models import MissingModelPackage, resolve_model

    try:
        resolve_model("small")
    except MissingModelPackage as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("vllm") / "run"
    train(out, "steps=2")
    return out


def test_adapter_changes_and_reaches_vllm_each_step(reference):
    got = lines(reference)
    assert [x["step"] for x in got] == [1, 2]
    assert [x["rollout_adapter_step"] for x in got] == [0, 1]  # step 2 sampled with step 1's adapter
    for x in got:
        assert math.isfinite(x["logprob_drift"]) and x["logprob_drift"] < 0.05  # vLLM vs peft log-probs, float32
    assert any(x["grad_norm"] > 0 for x in got)
    b1 = load_file(str(reference / "rollout_adapter" / "step_1" / "adapter_model.safetensors"))
    b2 = load_file(str(reference / "rollout_adapter" / "step_2" / "adapter_model.safetensors"))
    lora_b = [k for k in b1 if "lora_B" in k]
    assert lora_b and any(float(b1[k].abs().max()) > 0 for k in lora_b)  # lora_B starts at 0: the step moved it
    assert any(not torch.equal(b1[k], b2[k]) for k in b1)


def test_vllm_greedy_with_the_step1_adapter_matches_peft(reference, vllm_small):
    from peft import PeftModel

    from agents.hf_policy import TransformersPolicy
    from agents.models import load_model
    from agents.policy import SamplingParams, chat_ids
    adapter = str(reference / "rollout_adapter" / "step_1")
    model, tok = load_model("small", dtype="float32", device=DEVICE)
    base = TransformersPolicy(model, tok)
    prompt = chat_ids(tok, [{"role": "user", "content": "Say something with many vowels (3)."}])
    sp = SamplingParams(temperature=0.0, max_new_tokens=12)
    plain = base.generate([prompt], sp)[0].token_ids
    peft = TransformersPolicy(PeftModel.from_pretrained(model, adapter).eval(), tok).generate([prompt], sp)[0]
    vllm_small.load_adapter(adapter)  # the session's engine (tests/conftest.py)
    try:
        got = vllm_small.generate([prompt], sp)[0]
    finally:
        vllm_small.load_adapter(None)
    assert got.token_ids[:8] == peft.token_ids[:8]
    assert got.logprobs[:8] == pytest.approx(peft.logprobs[:8], abs=2e-2)
    assert peft.token_ids != plain or peft.logprobs != pytest.approx(base.generate([prompt], sp)[0].logprobs, abs=1e-4)


def test_resume_with_vllm_rollouts_gives_the_same_weights(reference, tmp_path):
    """The reference run as a kill after step 2's metrics line but before its checkpoint would
    leave it (step 2's checkpoint gone): resuming samples step 2 in a fresh engine with step 1's
    adapter and reaches the uninterrupted run's weights. (A kill at each point of a step is
    tested on the transformers engine in test_resume.py; this is the vLLM adapter hand-over.)"""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert (out / "checkpoints" / "step_000001").is_dir()
    shutil.rmtree(out / "checkpoints" / "step_000002")
    train(out, "steps=2", "resume=true")
    assert [x["step"] for x in lines(out)] == [1, 2]
    assert lines(out)[1]["rollout_adapter_step"] == 1  # the fresh engine was handed step 1's adapter
    assert [x["reward"] for x in lines(out)] == pytest.approx([x["reward"] for x in lines(reference)], abs=1e-6)
    a = load_file(str(out / "checkpoints" / "step_000002" / "trainable.safetensors"))
    b = load_file(str(reference / "checkpoints" / "step_000002" / "trainable.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_a_vllm_serve_endpoint_samples_with_each_steps_adapter(vllm_served, tmp_path):
    """Against the session's ``vllm serve`` of the small model (tests/conftest.py), runtime LoRA loading on."""
    import requests
    from peft import PeftModel

    from agents.hf_policy import TransformersPolicy
    from agents.http_policy import OpenAIPolicy
    from agents.models import load_model
    from agents.policy import SamplingParams, chat_ids

    out = tmp_path / "run"
    base = [a for a in ARGS if not a.startswith("rollout.")]
    from distill.run import main

    assert main([*base, "rollout.engine=vllm", f"rollout.url={vllm_served}", f"output_dir={out}", "steps=2"]) == 0
    got = lines(out)
    assert [x["rollout_adapter_step"] for x in got] == [0, 1]
    assert all(math.isfinite(x["logprob_drift"]) and x["logprob_drift"] < 0.05 for x in got)
    served = {m["id"] for m in requests.get(vllm_served + "/models", timeout=10).json()["data"]}
    assert "step-2" in served and "step-1" not in served  # the newest adapter loaded, the one before unloaded
    # greedy through the server with the step-2 adapter = peft with the same folder
    model, tok = load_model("small", dtype="float32", device=DEVICE)
    peft = TransformersPolicy(PeftModel.from_pretrained(model, str(out / "rollout_adapter" / "step_2")).eval(), tok)
    prompt = chat_ids(tok, [{"role": "user", "content": "Say something with many vowels (4)."}])
    sp = SamplingParams(temperature=0.0, max_new_tokens=12)
    client = OpenAIPolicy(vllm_served, model="step-2", tokenizer=tok, timeout=120)
    try:
        a, b = client.generate([prompt], sp)[0], peft.generate([prompt], sp)[0]
    finally:
        client.close()
    assert a.token_ids[:8] == b.token_ids[:8]
    assert a.logprobs[:8] == pytest.approx(b.logprobs[:8], abs=2e-2)
