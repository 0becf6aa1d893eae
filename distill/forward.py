"""One forward pass over token sequences, returning outputs only where they are needed.

A causal LM's logits over a 150k vocabulary cost ``T x V`` floats per sequence (0.6 GB for
1,000 tokens in fp32). Losses only need them at agent tokens, so ``forward_at`` runs the
decoder stack, gathers the hidden states that predict the requested target positions and
applies the LM head to those rows only. Hidden states of chosen layers come back at the same
rows (oprd). Works for any transformers causal LM with ``get_decoder`` and
``get_output_embeddings``, wrapped in peft or not (peft injects its LoRA layers into the base
model, so the adapters take part; ``disable_adapter()`` turns them off).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class SelectedOutputs:
    logits_N_V: torch.Tensor | None  # LM-head logits predicting each target token
    hidden_L_N_D: torch.Tensor | None  # block outputs of the requested layers at the same rows
    seq_index_N: torch.Tensor  # which sequence each row belongs to
    target_ids_N: torch.Tensor  # the token each row predicts


def base_model(model):
    """The transformers model under a peft wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def checkpointing_layers(model) -> list:
    """Turn on activation checkpointing (non-reentrant) in ``model``'s blocks and return them.
    transformers only checkpoints a block while ``block.training`` is set, so the model stays in
    eval mode and ``checkpointed`` flips that flag on the blocks alone: no dropout anywhere, the
    loss sees the function the policy sampled from."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    hf = base_model(model)
    enable = getattr(hf, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:  # transformers < 5.x naming
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    return [m for m in hf.modules() if isinstance(m, GradientCheckpointingLayer)]


class checkpointed:
    """``with checkpointed(blocks):`` - the blocks checkpoint in this forward/backward."""

    def __init__(self, blocks: list):
        self.blocks = blocks

    def __enter__(self):
        for b in self.blocks:
            b.training = True  # this module only, not its children (attention, dropout, LoRA)

    def __exit__(self, *exc):
        for b in self.blocks:
            b.training = False


def num_layers(model) -> int:
    cfg = base_model(model).config
    return int(getattr(cfg, "num_hidden_layers"))


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        attn[i, : len(s)] = 1
    return ids.to(device), attn.to(device)


def forward_at(
    model,
    seqs: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    pad_id: int,
    with_logits: bool = True,
    layers: Sequence[int] | None = None,
) -> SelectedOutputs:
    """Run ``model`` over ``seqs``; rows for every position ``t`` in ``targets[i]`` (1 <= t < len)
    hold what the model predicts for ``seqs[i][t]`` from ``seqs[i][:t]``.

    ``layers`` are 1-based block indices (1..num_layers); their outputs at the rows come back
    as ``hidden_L_N_D``.
    """
    hf = base_model(model)
    device = next(hf.parameters()).device
    ids, attn = pad_right(seqs, pad_id, device)
    rows_b, rows_t = [], []
    for i, ts in enumerate(targets):
        for t in ts:
            if not 1 <= t < len(seqs[i]):
                raise IndexError(f"target position {t} outside sequence {i} of length {len(seqs[i])}")
            rows_b.append(i)
            rows_t.append(t - 1)
    b = torch.tensor(rows_b, dtype=torch.long, device=device)
    t = torch.tensor(rows_t, dtype=torch.long, device=device)
    decoder = hf.get_decoder()
    out = decoder(input_ids=ids, attention_mask=attn, output_hidden_states=bool(layers), use_cache=False)
    last = out.last_hidden_state
    logits = hf.get_output_embeddings()(last[b, t]) if with_logits else None
    hidden = None
    if layers:
        hs = out.hidden_states  # embeddings, then one entry per block
        hidden = torch.stack([hs[l][b, t] for l in layers])
    return SelectedOutputs(logits, hidden, b, ids[b, t + 1])
