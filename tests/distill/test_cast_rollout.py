"""``rollout.dtype=bfloat16`` beside a float32 learner: a cast copy of the student samples. Its
weights are the learner's rounded to bfloat16 after every sync, the base weights are never
touched, the policy's KV cache notices the new weights, and a 2-step run logs the sampler/learner
drift that the rounding causes (0 without the copy)."""
import json

import torch

from distill.rollout_engine import CastRollout, make_policy
from test_checkpointing import lora_tiny


def test_copy_is_the_learner_cast_and_follows_each_sync():
    from agents.tiny import byte_tokenizer

    model = lora_tiny()
    roll = CastRollout(model, byte_tokenizer(), "bfloat16")
    mine = dict(roll.sampler.named_parameters())
    for n, p in model.named_parameters():
        assert mine[n].dtype == torch.bfloat16 and torch.equal(mine[n], p.detach().to(torch.bfloat16))
        assert not mine[n].requires_grad
    assert roll.names and all("lora_" in n for n in roll.names)  # LoRA: only the adapter is copied
    base = {n: p.clone() for n, p in mine.items() if n not in roll.names}
    key = roll.policy._weights_key()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    roll.sync(model, None, 3)
    assert roll.adapter_step == 3
    assert roll.policy._weights_key() != key  # the kept KV cache is dropped on the next generate
    for n, p in model.named_parameters():
        assert torch.equal(mine[n], p.detach().to(torch.bfloat16))
    assert all(torch.equal(mine[n], v) for n, v in base.items())


def test_same_dtype_keeps_the_trained_module():
    from types import SimpleNamespace

    from agents.hf_policy import TransformersPolicy
    from agents.tiny import byte_tokenizer

    model = lora_tiny()
    pol = make_policy(SimpleNamespace(engine="transformers", dtype="fp32"), model, byte_tokenizer(),
                      SimpleNamespace(dtype="float32"), 0)
    assert isinstance(pol, TransformersPolicy) and pol.model is model
    pol = make_policy(SimpleNamespace(engine="transformers", dtype="bf16"), model, byte_tokenizer(),
                      SimpleNamespace(dtype="float32"), 0)
    assert isinstance(pol, CastRollout) and pol.dtype == torch.bfloat16


ARGS = ["model=tiny", "method=grpo", "env.id=ToyVowel-v0", "env.eval_id=ToyVowel-eval-v0", "steps=2",
        "questions_per_step=2", "group_size=4", "max_tokens_per_turn=12", "max_total_tokens=128", "eval.questions=0",
        "progress=false", "tensorboard=false", "threads=1", "lr=1e-2"]


def run(out, *extra):
    from distill.run import main

    assert main([*ARGS, f"output_dir={out}", *extra]) == 0
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_sampler_run_logs_its_drift(tmp_path):
    cast = run(tmp_path / "bf16", "rollout.dtype=bfloat16")
    same = run(tmp_path / "fp32")
    assert [x["rollout_adapter_step"] for x in cast] == [0, 1]  # each step sampled with the weights after the last
    assert "rollout_adapter_step" not in same[0]
    assert all(x["logprob_drift"] < 1e-5 for x in same)  # the trained module samples: no drift
    assert all(1e-4 < x["logprob_drift"] < 0.5 for x in cast)  # bfloat16 rounding, small
    assert any(x["grad_norm"] > 0 for x in cast)
    assert all(x["sampled_tokens"] == x["agent_tokens"] > 0 for x in cast + same)  # grpo replaces nothing

