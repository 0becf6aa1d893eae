"""The KV buffer: cache layers whose decode steps write in place instead of copying the cache.

:class:`_SpareLayer` keeps a layer's keys and values in buffers with spare positions after the
last one; :func:`_spare_cache` is a ``DynamicCache`` made of such layers. Used by
:class:`agents.hf_policy.TransformersPolicy` and :class:`agents.schedulers.ContinuousScheduler`.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class _SpareLayer(DynamicLayer):
    """A full-attention cache layer whose keys/values are the views ``[..., lo:hi, :]`` of buffers
    with spare positions after ``hi``, so ``update`` writes new positions in place.

    A plain ``DynamicLayer`` concatenates instead: every decode step copies the whole cache of
    every layer into fresh memory. On CPU at batch 8 and a thousand positions that copy took about
    as long as the rest of the step (the episodes of a rollout are long: prompt, turns and
    observations). ``lo`` moves forward when the first columns hold only padding
    (:meth:`agents.schedulers.ContinuousScheduler._leave`), so no copy is needed to shrink the
    batch's width either.
    """

    def __init__(self, spare: int = 0):
        super().__init__()
        self.spare = spare  # positions to keep free after a (re)allocation
        self.kb = self.vb = self._seen = None
        self.lo = self.hi = 0

    @classmethod
    def holding(cls, kb: torch.Tensor, vb: torch.Tensor, n: int, spare: int) -> "_SpareLayer":
        """A layer over buffers whose first ``n`` positions are filled."""
        layer = cls(spare)
        layer.lazy_initialization(kb, vb)
        layer.kb, layer.vb, layer.hi = kb, vb, n
        layer._view()
        return layer

    def _view(self) -> None:
        self.keys, self.values = self.kb[..., self.lo : self.hi, :], self.vb[..., self.lo : self.hi, :]
        self._seen = self.keys  # keys set by anyone else (e.g. DynamicLayer.crop) are copied on update

    def _move(self, cap: int) -> None:
        """New buffers of ``cap`` positions holding the current keys/values at their start."""
        k, v = self.keys, self.values
        n = k.shape[-2]
        self.kb = k.new_empty((*k.shape[:-2], cap, k.shape[-1]))
        self.vb = v.new_empty((*v.shape[:-2], cap, v.shape[-1]))
        self.kb[..., :n, :], self.vb[..., :n, :] = k, v
        self.lo, self.hi = 0, n

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.kb is None or self.keys is not self._seen:
            if self.keys.dim() != key_states.dim():  # empty
                self.keys = key_states[..., :0, :]
                self.values = value_states[..., :0, :]
            self._move(self.keys.shape[-2] + n + self.spare)  # first use, or keys set by someone else
        elif self.hi + n > self.kb.shape[-2]:
            length = self.hi - self.lo + n
            self._move(length + max(self.spare, length // 2))
        self.kb[..., self.hi : self.hi + n, :] = key_states
        self.vb[..., self.hi : self.hi + n, :] = value_states
        self.hi += n
        self._view()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.kb is None or self.keys is not self._seen:
            return super().batch_select_indices(indices)
        self.kb, self.vb = self.kb[indices, :, self.lo :], self.vb[indices, :, self.lo :]
        self.lo, self.hi = 0, self.hi - self.lo
        self._view()

    def drop_front(self, k: int) -> None:
        """Forget the first ``k`` positions (padding in every row)."""
        self.lo += k
        self._view()


def _spare_cache(layers: list | None = None, spare: int = 0) -> DynamicCache:
    """A DynamicCache of :class:`_SpareLayer` (``layers`` given, or made on first use)."""
    past = DynamicCache()
    past.layer_class_to_replicate = lambda: _SpareLayer(spare)
    past.layers.extend(layers or [])
    return past
