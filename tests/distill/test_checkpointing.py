"""Activation checkpointing in the update: the same loss and gradients as keeping activations,
each block really recomputed in the backward pass, and the model left in eval mode (no dropout)."""
import torch
from peft import LoraConfig, get_peft_model

from agents.models import tiny_random_model
from distill.forward import checkpointed, checkpointing_layers, forward_at
from distill.losses import token_logprobs


def lora_tiny(seed=0):
    model, tok = tiny_random_model("small", hidden_size=64, num_layers=3, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():  # LoRA B starts at 0: give it values so every path has a gradient
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.eval()
    return model


def loss_and_grads(model, blocks):
    seqs = [[5, 9, 14, 3, 7, 22, 8, 1, 4], [6, 2, 30, 11, 12]]
    targets = [[4, 5, 6, 7, 8], [2, 3, 4]]
    model.zero_grad(set_to_none=True)
    with checkpointed(blocks):
        out = forward_at(model, seqs, targets, pad_id=0, layers=[1, 3])
        loss = -token_logprobs(out.logits_N_V, out.target_ids_N).sum() + out.hidden_L_N_D.pow(2).mean()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def test_checkpointing_recomputes_blocks_and_gives_the_same_gradients():
    plain = lora_tiny()
    ref_loss, ref = loss_and_grads(plain, [])

    model = lora_tiny()
    blocks = checkpointing_layers(model)
    assert len(blocks) == 3
    calls = []
    for b in blocks:  # transformers checkpoints a block's forward, not its __call__: hook a child
        b.mlp.register_forward_pre_hook(lambda m, a: calls.append(m))
    loss, grads = loss_and_grads(model, blocks)
    assert len(calls) == 2 * len(blocks)  # every block ran again in the backward pass
    assert abs(loss - ref_loss) < 1e-5
    assert grads.keys() == ref.keys() and len(grads) > 0
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6)
    assert not any(m.training for m in model.modules())  # back in eval mode everywhere

    calls.clear()
    with torch.no_grad():  # outside `checkpointed` the blocks run once, as in sampling
        forward_at(model, [[5, 9, 14]], [[1, 2]], pad_id=0)
    assert len(calls) == len(blocks)
