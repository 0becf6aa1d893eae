"""Packed forward: one model forward over the new tokens of many sequences, without padding.

When an episode's observation arrives in a continuous rollout there are two kinds of work at
once: the decode batch needs its next token (one position per row) and each joining row needs
its observation prefilled (tens to hundreds of positions over its own KV cache). As separate
forwards each pays for reading every weight once; on a CPU that read is most of a decode step
(about 0.3 s of the 0.5B student's 0.33 s step in fp32 on 2 cores), and a padded prefill of
rows of different lengths also computes the padding.

:func:`packed_forward` lays all the new tokens side by side in one sequence, so the embedding,
projections, MLPs and the LM head run once over ``[tokens, hidden]``; only attention is done per
part: the decode batch's tokens against the batch cache (written in place, with its padding
mask), and each other sequence causally against its own cache. It goes through transformers'
attention interface: :data:`NAME` is a registered attention function, the model's config is
switched to it for the call, and the plan rides along as a keyword argument. Models whose
attention layers call ``ALL_ATTENTION_FUNCTIONS`` and rotate by ``position_ids`` (Llama, Qwen2,
Qwen3, Mistral without a sliding window, SmolLM, ...) work; :func:`packed_ok` checks a model
once against its own forward, and callers fall back to plain forwards when it says no.
Not thread-safe for one model (the config is switched during the call).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NAME = "webqa_packed"


@dataclass
class Seq:
    """A sequence whose new ``ids`` are fed at positions ``start, start+1, ...`` after its own
    KV cache ``layers`` (per layer ``(keys, values)``, each ``[kv_heads, start, head_dim]``; None
    when empty). :func:`packed_forward` sets ``layers`` to the cache including the new ids."""

    ids: list[int]
    start: int = 0
    layers: list | None = None


@dataclass
class Batch:
    """The decode batch: one new token per row at ``pos``; ``cache`` is a list of cache layers
    with ``update(keys, values)`` (``[B, kv_heads, 1, head_dim]`` in, the whole keys/values out),
    ``attn`` the ``[B, width]`` mask of the batch cache including the new column."""

    ids: list[int]
    pos: torch.Tensor
    cache: list
    attn: torch.Tensor


@dataclass
class _Plan:
    batch: Batch | None
    seqs: list[Seq]
    mask: torch.Tensor | None = None  # the batch's padding mask, [B, 1, 1, width]
    causal: list = field(default_factory=list)  # per seq, its [n, cached + n] causal mask (made at the first layer)
    new: list[list] = field(default_factory=list)  # per seq, per layer (keys, values)


_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "sinks")  # attention variants this does not do


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, webqa_packed=None, **kwargs):
    """The registered attention function: ``query`` ``[1, heads, T, d]``, ``key``/``value``
    ``[1, kv_heads, T, d]`` (rotated, not cached); returns ``[1, T, heads, d]``."""
    plan = webqa_packed
    if plan is None:
        raise RuntimeError(f"the {NAME!r} attention runs only inside packed_forward()")
    bad = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if bad:
        raise NotImplementedError(f"packed attention does not support {bad}")
    layer = module.layer_idx
    q, k, v = query[0], key[0], value[0]
    out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])
    s = 0
    if plan.batch is not None:
        s = len(plan.batch.ids)
        kk, vv = plan.batch.cache[layer].update(k[:, :s].transpose(0, 1).unsqueeze(2), v[:, :s].transpose(0, 1).unsqueeze(2))
        o = _sdpa(q[:, :s].transpose(0, 1).unsqueeze(2), kk, vv, plan.mask, scaling)
        out[:s] = o[:, :, 0]
    for j, seq in enumerate(plan.seqs):
        n = len(seq.ids)
        kk, vv = k[:, s : s + n], v[:, s : s + n]
        if seq.layers:
            kk, vv = torch.cat([seq.layers[layer][0], kk], 1), torch.cat([seq.layers[layer][1], vv], 1)
        if len(plan.causal) <= j:
            plan.causal.append(torch.ones((n, kk.shape[1]), dtype=torch.bool, device=q.device).tril(kk.shape[1] - n))
        out[s : s + n] = _sdpa(q[None, :, s : s + n], kk[None], vv[None], plan.causal[j], scaling)[0].transpose(0, 1)
        plan.new[j].append((kk, vv))
        s += n
    return out[None], None


def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[-3] != k.shape[-3])


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _attention)


@contextmanager
def _switched(model):
    """The model's configs use the packed attention inside the block."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation_internal")}
    saved = [(c, c._attn_implementation_internal) for c in configs.values()]
    for c, _ in saved:
        c._attn_implementation_internal = NAME
    try:
        yield
    finally:
        for c, impl in saved:
            c._attn_implementation_internal = impl


def packed_forward(model, seqs: list[Seq], batch: Batch | None = None, keep: list[int] | None = None) -> torch.Tensor:
    """One forward over the batch's new tokens (first) and each sequence's new ids (after).
    Returns the logits ``[len(keep), vocab]`` at the packed positions ``keep`` (default: the
    batch's rows, then each sequence's last id). Updates the batch cache in place and every
    ``seq.layers``."""
    if not seqs and batch is None:
        raise ValueError("packed_forward() needs a batch or at least one sequence")
    device = next(model.parameters()).device
    ids, pos = [], []
    if batch is not None:
        ids += [int(x) for x in batch.ids]
        pos += batch.pos.tolist()
    for seq in seqs:
        ids += [int(x) for x in seq.ids]
        pos += range(seq.start, seq.start + len(seq.ids))
    if keep is None:
        keep = list(range(len(batch.ids) if batch is not None else 0))
        for seq in seqs:
            keep.append((keep[-1] if keep else -1) + len(seq.ids))
    plan = _Plan(batch, seqs, new=[[] for _ in seqs])
    if batch is not None:
        plan.mask = batch.attn.to(device=device, dtype=torch.bool)[:, None, None, :]
    with _switched(model):
        out = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([pos], device=device),
                    use_cache=False, logits_to_keep=torch.tensor(keep, device=device), webqa_packed=plan)
    for seq, layers in zip(seqs, plan.new):
        seq.layers = layers
    return out.logits[0]


# packed_ok's bounds on |log p| differences below float32. Measured in bf16: the student's packed
# forward differs from its own by max 0.17, mean 0.026; an off-by-one position gives max 1.2+,
# mean 0.2+, a wrong mask max 1.5+, mean 0.28+.
_LOW_MAX, _LOW_MEAN = 0.5, 0.08


@torch.no_grad()
def packed_ok(model) -> bool:
    """Whether :func:`packed_forward` gives this model's own logits: a decode row and a
    sequence with a cache, both ending at the same token, against a plain forward."""
    from transformers.cache_utils import DynamicCache

    try:
        device = next(model.parameters()).device
        vocab = model.get_output_embeddings().weight.shape[0]
        ids = [(7 * i + 3) % vocab for i in range(6)]
        full = torch.log_softmax(model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float(), -1)
        past = model(input_ids=torch.tensor([ids[:5]], device=device), use_cache=True).past_key_values
        if not isinstance(past, DynamicCache):
            return False
        head = model(input_ids=torch.tensor([ids[:2]], device=device), use_cache=True).past_key_values
        seq = Seq(ids[2:], 2, [(layer.keys[0], layer.values[0]) for layer in head.layers])
        batch = Batch([ids[5]], torch.tensor([5]), list(past.layers), torch.ones((1, 6), device=device))
        logits = packed_forward(model, [seq], batch)  # the decode row, then the sequence's last id
    except (NotImplementedError, RuntimeError, TypeError, ValueError, AttributeError, KeyError):
        return False
    diff = (torch.log_softmax(logits.float(), -1) - full).abs()
    if next(model.parameters()).dtype == torch.float32:
        close = diff.max() <= 1e-3
    else:
        close = diff.max() <= _LOW_MAX and diff.mean(-1).max() <= _LOW_MEAN
    return bool(close) and seq.layers[0][0].shape[1] == 6


_register()
