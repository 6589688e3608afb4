"""The decode loop's KV cache appends in place and holds exactly what DynamicCache holds."""

from __future__ import annotations

import copy

import torch
from latentmed.engine.kvcache import GrowingLayer, new_cache
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _steps(layer, seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    kv = lambda n: (torch.randn(batch, 2, n, 4, generator=g), torch.randn(batch, 2, n, 4, generator=g))  # noqa: E731
    return [kv(5)] + [kv(1) for _ in range(12)]


def test_growing_layer_returns_what_dynamic_layer_returns():
    ours, ref = GrowingLayer(), DynamicLayer()
    for i, (k, v) in enumerate(_steps(None)):
        if i == 6:  # a branch: rows selected (and repeated), as Decoder.branch does
            idx = torch.tensor([0, 0, 2, 1])
            ours, ref = copy.deepcopy(ours), copy.deepcopy(ref)
            ours.batch_select_indices(idx), ref.batch_select_indices(idx)
        if i >= 6:
            k, v = k[[0, 0, 2, 1]], v[[0, 0, 2, 1]]
        a, b = ours.update(k, v), ref.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert ours.get_seq_length() == ref.get_seq_length()


def test_a_step_writes_in_place_where_dynamic_layer_copies():
    ours, ref = GrowingLayer(), DynamicLayer()
    steps = _steps(None)
    for layer in (ours, ref):
        layer.update(*steps[0])
        layer.update(*steps[1])
    ptr_ours, ptr_ref = ours.keys.data_ptr(), ref.keys.data_ptr()
    ours.update(*steps[2]), ref.update(*steps[2])
    assert ours.keys.data_ptr() == ptr_ours  # same storage: the prefix was not copied
    assert ref.keys.data_ptr() != ptr_ref  # transformers' layer concatenates (what this module avoids)
    ours.reset()
    assert ours.get_seq_length() == 0 and ours._k is None


def test_new_cache_swaps_only_full_attention_layers(ckpt):
    from transformers import AutoConfig

    cache = new_cache(AutoConfig.from_pretrained(ckpt))
    assert cache.layers and all(type(layer) is GrowingLayer for layer in cache.layers)
    assert isinstance(cache, DynamicCache)
