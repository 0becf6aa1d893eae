"""Samples whose advantages are all 0 run forward only (no backward) for methods whose loss is the
policy gradient alone: the step's gradient, parameters after the optimizer step, and logged
loss/entropy/drift are those of the full backward over every sample."""
import copy
from types import SimpleNamespace

import pytest
import torch

from distill.batches import Sample
from distill.methods import get_method
from distill.methods.grpo import GRPOConfig
from distill.train import update
from test_checkpointing import lora_tiny


def samples():
    # two groups: the first has rewards that differ (nonzero advantages), the second all equal (zeros)
    nan = float("nan")
    return [Sample([5, 9, 14, 3, 7, 22, 8, 1, 4], [4, 5, 6, 7, 8], [1.0] * 5, [1.0] * 5, {}, old_logprobs=[nan] * 5),
            Sample([6, 2, 30, 11, 12], [2, 3, 4], [-1.0] * 3, [1.0] * 3, {}, old_logprobs=[nan] * 3),
            Sample([7, 3, 9, 20, 5, 6], [3, 4, 5], [0.0] * 3, [1.0] * 3, {}, old_logprobs=[-2.0, nan, -3.0]),
            Sample([4, 8, 15, 16, 23, 42], [1, 2, 3, 4, 5], [0.0] * 5, [1.0] * 5, {}, old_logprobs=[nan] * 5)]


def make_run(model, method, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    return SimpleNamespace(cfg=SimpleNamespace(micro_batch_size=1, max_grad_norm=1e9), model=model, method=method,
                           mcfg=cfg, blocks=[], policy=SimpleNamespace(pad_id=0), layers=None, reference=None,
                           method_state={}, n_layers=(0, 0), teacher=None, params=params, optimizer=opt,
                           scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def run_update(skip: bool, batch):
    method = get_method("grpo")
    if not skip:
        method = copy.copy(method)
        object.__setattr__(method, "advantage_only", lambda cfg: False)
    model = lora_tiny()
    run = make_run(model, method, GRPOConfig())
    out = update(run, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads, after


def test_idle_samples_skip_backward_with_the_same_step():
    full, g_full, p_full = run_update(False, samples())
    fast, g_fast, p_fast = run_update(True, samples())
    assert full["idle_samples"] == 0 and fast["idle_samples"] == 2
    assert any(float(g.abs().sum()) > 0 for g in g_full.values())
    for n in g_full:
        torch.testing.assert_close(g_fast[n], g_full[n], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(p_fast[n], p_full[n], rtol=1e-5, atol=1e-7)
    for k in ("loss", "entropy_sum", "rows", "drift_n"):
        assert fast[k] == pytest.approx(full[k], rel=1e-5)
    assert fast["drift_n"] == 2 and fast["agg"]["pg_loss"] == pytest.approx(full["agg"]["pg_loss"], rel=1e-5)


def test_a_step_where_every_sample_is_idle_still_steps_adam_on_zeros():
    batch = [s for s in samples() if not any(s.advantages)]
    out, grads, _ = run_update(True, batch)
    assert out["idle_samples"] == 2 and out["grad_norm"] == 0.0
    assert all(float(g.abs().sum()) == 0.0 for g in grads.values())  # zero-filled, not None


def test_methods_with_a_loss_beyond_the_policy_gradient_never_skip():
    assert get_method("grpo").advantage_only(GRPOConfig(kl_beta=0.0))
    assert not get_method("grpo").advantage_only(GRPOConfig(kl_beta=0.1))  # the KL term has a gradient at A = 0
    for name in ("opd", "eopd", "opsd", "oprd"):
        m = get_method(name)
        assert not m.advantage_only(m.config())
