"""The vLLM teacher agrees with the local transformers teacher. Runs wherever vLLM can (a CUDA
GPU, or vLLM's CPU build: ``scripts/test_vllm_cpu.sh``); skips cleanly otherwise."""
import pytest

from agents.vllm_policy import vllm_device

DEVICE = vllm_device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs vLLM on a CUDA GPU or vLLM's CPU build (vllm-cpu)")


@pytest.fixture(scope="module")
def teachers():
    from agents.models import load_model
    from distill.teachers.local import LocalTeacher
    from distill.teachers.vllm import VLLMTeacher

    kw = {"kv_cache_memory_bytes": 1 << 30} if DEVICE == "cpu" else {}
    v = VLLMTeacher("small", dtype="float32", enforce_eager=True, max_model_len=1024, **kw)
    model, tok = load_model("small", dtype="float32", device=DEVICE)
    yield v, LocalTeacher(model, tok), tok
    v.close()


def test_vllm_prompt_logprobs_match_transformers(teachers):
    v, local, tok = teachers
    seq = tok.encode("Question: who wrote Hamlet? <search> Hamlet author </search>", add_special_tokens=False)
    targets = list(range(5, len(seq)))
    a = v.logprobs([seq], [targets])[0]
    b = local.logprobs([seq], [targets])[0]
    assert len(a) == len(b) == len(targets)
    assert max(abs(x - y) for x, y in zip(a, b)) < 2e-2  # float32 on both sides: two kernels' float noise
    assert v.capabilities >= {"score", "logprobs"}


def test_vllm_topk_contains_the_local_argmax(teachers):
    v, local, tok = teachers
    seq = tok.encode("The capital of France is Paris. The capital of Italy is Rome.", add_special_tokens=False)
    targets = list(range(3, len(seq)))
    ids, vals = v.topk_logprobs([seq], [targets], k=5)[0]
    assert tuple(ids.shape) == tuple(vals.shape) == (len(targets), 5)
    assert (vals[:, :-1] >= vals[:, 1:]).all()  # best first
    ref_ids, _ = local.topk_logprobs([seq], [targets], k=1)[0]
    # the local top-1 is vLLM's top-1 (bar a near-tie between two kernels) and always in its top-5
    assert all(int(r[0]) in set(map(int, row)) for r, row in zip(ref_ids, ids))
    assert sum(int(r[0]) == int(row[0]) for r, row in zip(ref_ids, ids)) >= len(targets) - 1


def test_vllm_teacher_scores_are_verbal_digits(teachers):
    v, _, _ = teachers
    from distill.teachers.local import SCORE_PREFIX

    before = v.stats["requests"]
    out = v.score([[{"role": "user", "content": "Rate this answer 0-9: Paris is the capital of France."}]] * 2)
    assert len(out) == 2 and out[0] == out[1] and out[0].startswith(SCORE_PREFIX)  # greedy: the same reply twice
    assert "\n" not in out[0].rstrip("\n")  # stopped at the end of the line
    assert v.stats["requests"] == before + 2


def test_vllm_score_distribution_and_chat_agree_with_the_local_teacher(teachers):
    from agents.policy import SamplingParams
    from distill.verbal import render

    v, local, tok = teachers
    msgs = [render("Who wrote Hamlet?", ["William Shakespeare"], ["<answer> Shakespeare </answer>"], [""], "Shakespeare")]
    a, b = v.score_distribution(msgs)[0], local.score_distribution(msgs)[0]
    assert a is not None and abs(sum(a) - 1) < 1e-5
    assert max(range(10), key=a.__getitem__) == max(range(10), key=b.__getitem__)
    chat = [{"role": "user", "content": "Say hello, then write <answer> hi </answer>."}]
    sp = SamplingParams(temperature=0.0, max_new_tokens=8)  # greedy: the same first tokens (float32 both sides)
    assert v.chat([chat], sp) == local.chat([chat], sp)


def test_a_closed_engine_says_so(teachers):
    """Last in this module, as it closes the module's engine: a closed VLLMPolicy refuses to
    generate with a message that says so, and closing twice (the fixture closes again) is harmless."""
    v, _, _ = teachers
    chat = [[{"role": "user", "content": "Hi"}]]
    assert v.score(chat)[0].startswith("Score:")
    v.close()
    with pytest.raises(RuntimeError, match="closed"):
        v.score(chat)
    v.close()
