"""The decode loop's KV cache: transformers' DynamicCache whose layers append in place.

A DynamicLayer concatenates its whole cache with the new position at every step, so a step of a
256-row sweep copies every row's full prefix (measured: 15% of the sweep's time at M = 64). Here
each layer keeps spare room after its keys and values and writes a step into it; the tensors the
attention reads are views of the same numbers, so what the model computes is unchanged.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes new positions into spare room, doubling it when full (or when
    its keys were replaced, e.g. by `batch_select_indices`), instead of concatenating."""

    _k = _v = None

    def _has_room(self, n: int, need: int) -> bool:
        k = self._k
        return (k is not None and self.keys is not None and self.keys.data_ptr() == k.data_ptr()
                and self.keys.shape[0] == k.shape[0] and n == self.keys.shape[-2] and need <= k.shape[-2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, need = self.get_seq_length(), self.get_seq_length() + key_states.shape[-2]
        if not self._has_room(n, need):
            B, H, _, D = key_states.shape
            k, v = key_states.new_empty(B, H, 2 * need, D), value_states.new_empty(B, H, 2 * need, value_states.shape[-1])
            if n:
                k[:, :, :n], v[:, :, :n] = self.keys, self.values
            self._k, self._v = k, v
        self._k[:, :, n:need], self._v[:, :, n:need] = key_states, value_states
        self.keys, self.values = self._k[:, :, :need], self._v[:, :, :need]
        return self.keys, self.values

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()


def new_cache(config) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers append in place (GrowingLayer)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
