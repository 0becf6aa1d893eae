"""Packed forwards: many sequences' new tokens and a decode batch's step in one forward."""
import pytest
import torch

from agents.hf_policy import TransformersPolicy
from agents.models import tiny_random_model
from agents.packed import Batch, Seq, packed_forward, packed_ok
from agents.policy import SamplingParams


def _model(architecture="llama", **kw):
    model, tok = tiny_random_model("bytes", architecture=architecture, seed=3, **kw)
    return model, tok


def _last_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def _cache(model, ids):
    with torch.no_grad():
        past = model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
    return [(layer.keys[0], layer.values[0]) for layer in past.layers]


@pytest.mark.parametrize("arch", [dict(architecture="llama"), dict(architecture="qwen2", num_heads=4, num_kv_heads=2)])
def test_packed_forward_gives_each_sequence_its_own_logits_and_cache(arch):
    model, tok = _model(**arch)
    policy = TransformersPolicy(model, tok)
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 200, (n,), generator=g).tolist()  # noqa: E731
    # a decode batch of two rows of different lengths (left-padded), each feeding one new token
    rows = [rand(9), rand(4)]
    past, _, attn, _ = policy._left_padded([_cache(model, r[:-1]) for r in rows], [[] for _ in rows], spare=2)
    attn = torch.cat([attn, torch.ones((2, 1), dtype=attn.dtype)], 1)
    batch = Batch([r[-1] for r in rows], torch.tensor([len(r) - 1 for r in rows]), past.layers, attn)
    # sequences joining: one continuing a cache, one from nothing
    cont, fresh = rand(12), rand(7)
    seqs = [Seq(cont[5:], 5, _cache(model, cont[:5])), Seq(fresh, 0, None)]
    before = model.config._attn_implementation
    with torch.no_grad():
        logits = packed_forward(model, seqs, batch, keep=[0, 1, 2 + 7 - 1, 2 + 7 + 7 - 1])
    assert model.config._attn_implementation == before  # switched back
    want = torch.stack([_last_logits(model, x) for x in (rows[0], rows[1], cont, fresh)])
    assert torch.allclose(logits, want, atol=1e-5), (logits - want).abs().max()
    for seq, ids in zip(seqs, (cont, fresh)):  # each sequence's cache now covers all its ids
        for (k, v), (k2, v2) in zip(seq.layers, _cache(model, ids)):
            assert torch.allclose(k, k2, atol=1e-5) and torch.allclose(v, v2, atol=1e-5)
    assert all(layer.keys.shape[-2] == attn.shape[1] for layer in past.layers)  # the batch cache grew in place


def test_packed_ok_says_yes_to_plain_attention_and_no_to_a_sliding_window():
    llama, _ = _model()
    qwen_gqa, _ = _model("qwen2", num_heads=4, num_kv_heads=2)
    assert packed_ok(llama) and packed_ok(qwen_gqa)
    from transformers import AutoModelForCausalLM, MistralConfig

    windowed = AutoModelForCausalLM.from_config(MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                              num_attention_heads=4, num_key_value_heads=2, sliding_window=4)).eval()
    assert not packed_ok(windowed)
    assert windowed.config._attn_implementation != "webqa_packed"


def test_packed_ok_with_a_peft_adapter():
    from peft import LoraConfig, get_peft_model

    model, tok = _model()
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)).eval()
    ids = list(range(10, 30))
    seq = Seq(ids[8:], 8, _cache(lora, ids[:8]))
    with torch.no_grad():
        got = packed_forward(lora, [seq])[0]
    assert packed_ok(lora) and torch.allclose(got, _last_logits(lora, ids), atol=1e-5)
    with lora.disable_adapter():
        base = _last_logits(lora, ids)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter is in it


def test_the_attention_refuses_to_run_outside_a_packed_forward():
    from agents.packed import _attention

    with pytest.raises(RuntimeError, match="packed_forward"):
        _attention(None, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), None)


def test_a_joining_row_whose_turn_ends_at_its_first_token_does_not_join():
    """A one-token turn ends inside the packed forward that prefills it: it is returned at once,
    the other rows go on, and every completion equals a plain generate."""
    model, tok = _model()
    policy = TransformersPolicy(model, tok)
    sched = policy.turn_scheduler(SamplingParams(temperature=0, stop=()))
    assert sched.packed
    prompts = [policy.prompt_ids("a long enough question"), policy.prompt_ids("short one")]
    sched.submit(0, prompts[0], 5)
    sched.submit(1, prompts[1], 1)
    first = sched.advance()
    assert [k for k, _ in first] == [1] and sched.batch == [0]
    sched.submit(2, policy.prompt_ids("another"), 3)  # joins while row 0 decodes: one packed forward for both
    rest = dict(first + sched.advance() + sched.advance())
    plain = TransformersPolicy(model, tok, packed=False)
    for k, (p, n) in {0: (prompts[0], 5), 1: (prompts[1], 1), 2: (policy.prompt_ids("another"), 3)}.items():
        alone = plain.generate([p], SamplingParams(temperature=0, max_new_tokens=n, stop=()))[0]
        assert rest[k].token_ids == alone.token_ids and rest[k].logprobs == pytest.approx(alone.logprobs, abs=1e-4), k


@pytest.mark.slow
def test_packed_ok_in_bfloat16_accepts_rounding_and_refuses_a_wrong_position(monkeypatch):
    """Below float32 the check allows rounding (bf16 on the student: max 0.17 where right) but
    still tells a wrong position or mask (max 1.2 and more). Tiny random models cannot show this
    (their logits barely depend on context), so the embedded small model does."""
    from agents import packed
    from agents.models import MissingModelPackage, load_model

    try:
        model, _ = load_model("small", dtype="bfloat16")
    except MissingModelPackage as exc:
        pytest.skip(str(exc))
    assert packed_ok(model)
    right = packed.packed_forward

    def shifted(m, seqs, batch=None, keep=None):  # the joining sequence one position too far
        for s in seqs:
            s.start += 1
        return right(m, seqs, batch, keep)

    def unmasked(m, seqs, batch=None, keep=None):  # the decode row loses its first key
        batch.attn[:, 0] = 0
        return right(m, seqs, batch, keep)

    for wrong in (shifted, unmasked):
        monkeypatch.setattr(packed, "packed_forward", wrong)
        assert not packed_ok(model), wrong.__name__
