"""The decode loop's KV cache: transformers' DynamicCache whose layers append in place, and the
shared-prefix cache of a sweep's branch.

A DynamicLayer concatenates its whole cache with the new position at every step, so a step of a
256-row sweep copies every row's full prefix (measured: 15% of the sweep's time at M = 64). Here
each layer keeps spare room after its keys and values and writes a step into it; the tensors the
attention reads are views of the same numbers, so what the model computes is unchanged.

After a sweep branches, the M variants of one prompt have the same keys and values for the whole
prefix (prompt and every step before the branch point). `SharedPrefixCache` keeps that prefix
once per prompt and only each row's own steps per row; `shared_prefix_attention` scores a group's
queries against its prefix as one matrix product and each row's queries against its own keys,
then takes one softmax over both (the same attention, summed in another order). Without it the
branch copies the prefix M times and every step reads M copies.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer

SHARED = "latentmed_shared_prefix"  # the attention implementation's registered name


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes new positions into spare room, doubling it when full (or when
    its keys were replaced, e.g. by `batch_select_indices`), instead of concatenating."""

    _k = _v = None
    room = 0  # positions to allocate at the first write (a decode knows its length: no regrowth)

    def _length(self) -> int:
        """Positions this layer itself holds."""
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def _has_room(self, need: int) -> bool:
        k = self._k
        return (k is not None and self.keys.data_ptr() == k.data_ptr() and self.keys.shape[0] == k.shape[0]
                and need <= k.shape[-2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self._length()
        need = n + key_states.shape[-2]
        if not self._has_room(need):
            B, H, _, D = key_states.shape
            size = max(2 * need, self.room)
            k, v = key_states.new_empty(B, H, size, D), value_states.new_empty(B, H, size, value_states.shape[-1])
            if n:
                k[:, :, :n], v[:, :, :n] = self.keys, self.values
            self._k, self._v = k, v
        self._k[:, :, n:need], self._v[:, :, n:need] = key_states, value_states
        self.keys, self.values = self._k[:, :, :need], self._v[:, :, :need]
        return self.keys, self.values

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()


def new_cache(config, room: int = 0) -> DynamicCache:
    """A DynamicCache for `config` whose full-attention layers append in place (GrowingLayer),
    each allocating `room` positions at its first write."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            layer.room = room
    return cache


# ---- the shared prefix of a branch ---------------------------------------------------------------

class PrefixLayer(GrowingLayer):
    """One layer of a `SharedPrefixCache`: the prefix keys and values [P, Hkv, Tp, D] of the P
    source rows, then each branch row's own positions (GrowingLayer)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.prefix = (keys, values)

    def get_seq_length(self) -> int:
        return self.prefix[0].shape[-2] + self._length()


class SharedPrefixCache(DynamicCache):
    """Branch rows that share their source row's prefix: row r continues source row `src[r]`.
    `update` returns only the rows' own keys; `shared_prefix_attention` adds the prefix."""

    def __init__(self, parent: DynamicCache, src: list[int], room: int = 0):
        super().__init__()
        if not all(type(layer) in (DynamicLayer, GrowingLayer) for layer in parent.layers):
            raise ValueError("a shared prefix needs full-attention cache layers")
        self.layers = [PrefixLayer(layer.keys, layer.values) for layer in parent.layers]
        for layer in self.layers:
            layer.room = room  # each row's own positions
        P, B = parent.layers[0].keys.shape[0], len(src)
        if not all(0 <= s < P for s in src):
            raise ValueError(f"branch rows name source rows outside 0..{P - 1}: {src}")
        members = [[r for r in range(B) if src[r] == p] for p in range(P)]
        n = max(len(m) for m in members)
        self.slots = torch.tensor([m + [0] * (n - len(m)) for m in members], dtype=torch.long)  # [P, n] rows
        self.valid = torch.tensor([[i < len(m) for i in range(n)] for m in members])  # [P, n]
        grouped = self.slots[self.valid]  # row of each grouped position
        self.inverse = torch.argsort(grouped)  # grouped position of each row
        self.dense = bool(self.valid.all()) and bool((grouped == torch.arange(B)).all())  # rows = groups in order
        device = parent.layers[0].keys.device
        self.slots, self.valid, self.inverse = self.slots.to(device), self.valid.to(device), self.inverse.to(device)

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        """[B, ...] per row -> [P, n, ...] per source row (padding slots repeat row 0)."""
        return x.reshape(*self.slots.shape, *x.shape[1:]) if self.dense else x[self.slots]

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[P, n, ...] per source row -> [B, ...] per row (padding slots dropped)."""
        return x.reshape(-1, *x.shape[2:]) if self.dense else x[self.valid][self.inverse]


def shared_prefix_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                            shared_prefix: SharedPrefixCache | None = None, **kwargs):
    """Attention of branch rows over their group's shared prefix and their own keys.

    query [B, Hq, L, D]; key, value [B, Hkv, t, D] (the rows' own positions, from
    `SharedPrefixCache.update`); attention_mask [B, 1, L, Tp + t] additive over all keys.
    Returns ([B, L, Hq, D], None) like transformers' attention functions."""
    if shared_prefix is None:
        raise RuntimeError(f"attention {SHARED!r} runs only inside a shared-prefix decode")
    cache = shared_prefix
    pk, pv = cache.layers[module.layer_idx].prefix
    B, Hq, L, D = query.shape
    P, Hkv, Tp, _ = pk.shape
    t, rep, n = key.shape[-2], Hq // Hkv, cache.slots.shape[1]

    def grouped(x):  # [B, Hkv, rep * L, d] -> [P, Hkv, n * rep * L, d]: one matrix per source row and head
        return cache.to_groups(x).transpose(1, 2).reshape(P, Hkv, n * rep * L, x.shape[-1])

    def ungrouped(x):  # the inverse of `grouped`
        return cache.to_rows(x.view(P, Hkv, n, rep * L, x.shape[-1]).transpose(1, 2))

    q = query.reshape(B, Hkv, rep * L, D)  # query head kv * rep + j reads key head kv (transformers' repeat_kv)
    scores = torch.cat([ungrouped(grouped(q) @ pk.transpose(-1, -2)), q @ key.transpose(-1, -2)], -1)
    scores = scores.view(B, Hkv, rep, L, Tp + t).mul_(scaling)  # in place: `scores` is the fresh cat
    if attention_mask is not None:
        scores.add_(attention_mask[:, :, None])
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype).view(B, Hkv, rep * L, Tp + t)
    p_prefix, p_own = probs.split([Tp, t], -1)
    out = ungrouped(grouped(p_prefix) @ pv) + p_own @ value
    return out.reshape(B, Hq, L, D).transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED, shared_prefix_attention)


@contextmanager
def shared_attention(language_model) -> Iterator[None]:
    """The text model's attention reads a shared prefix inside this block (then back as it was)."""
    config = language_model.config
    old = config._attn_implementation
    config._attn_implementation = SHARED
    try:
        yield
    finally:
        config._attn_implementation = old
