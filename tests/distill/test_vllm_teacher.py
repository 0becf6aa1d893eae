"""The vLLM teacher agrees with the local transformers teacher (needs vLLM and a CUDA GPU)."""
import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM teacher needs a CUDA GPU")


def test_vllm_prompt_logprobs_match_transformers():
    from agents.models import load_model
    from distill.teachers.local import LocalTeacher
    from distill.teachers.vllm import VLLMTeacher

    v = VLLMTeacher("small", dtype="float32")
    model, tok = load_model("small", dtype="float32", device="cuda")
    local = LocalTeacher(model, tok)
    seq = tok.encode("Question: who wrote Hamlet? <search> Hamlet author </search>", add_special_tokens=False)
    targets = list(range(5, len(seq)))
    a = v.logprobs([seq], [targets])[0]
    b = local.logprobs([seq], [targets])[0]
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05  # bf16 engine vs fp32 reference
    assert v.capabilities >= {"score", "logprobs"}
