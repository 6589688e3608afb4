"""The decode loop's KV cache appends in place and holds exactly what DynamicCache holds; a branch's
shared prefix gives the attention that copies of it give."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from latentmed.engine.kvcache import GrowingLayer, SharedPrefixCache, new_cache, shared_prefix_attention
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


def test_a_layer_with_room_allocates_once_and_returns_the_same():
    steps = _steps(None)
    n = sum(k.shape[-2] for k, _ in steps)
    ours, ref, grown = GrowingLayer(), DynamicLayer(), GrowingLayer()
    ours.room = n
    ptrs = set()
    for k, v in steps:
        a, b, c = ours.update(k, v), ref.update(k, v), grown.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], c[0])
        ptrs.add(ours._k.data_ptr())
    assert len(ptrs) == 1 and ours._k.shape[-2] == n  # one allocation of `room` positions, no regrowth
    assert grown._k.shape[-2] != n  # without room the layer doubles as it fills


def test_new_cache_swaps_only_full_attention_layers(ckpt):
    from transformers import AutoConfig

    cache = new_cache(AutoConfig.from_pretrained(ckpt))
    assert cache.layers and all(type(layer) is GrowingLayer for layer in cache.layers)
    assert isinstance(cache, DynamicCache)


# ---- the shared prefix of a branch ---------------------------------------------------------------

def _reference_attention(q, k, v, mask, scaling):
    """Plain attention over full per-row keys [B, Hkv, T, D] (transformers' eager, GQA by repeat)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    w = torch.softmax(q @ k.transpose(-1, -2) * scaling + mask, -1)
    return (w @ v).transpose(1, 2)


def _branch(src, P=3, Tp=6, Hkv=2, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    parent = DynamicCache()
    parent.layers = [GrowingLayer(), GrowingLayer()]
    for layer in parent.layers:
        layer.update(torch.randn(P, Hkv, Tp, D, generator=g), torch.randn(P, Hkv, Tp, D, generator=g))
    return parent, SharedPrefixCache(parent, src), g


@pytest.mark.parametrize("src", [[0, 0, 1, 1, 2, 2], [2, 0, 2, 2, 0], [1, 1, 1]])  # in order; shuffled, unequal, one source unused
@pytest.mark.parametrize("L", [1, 3])
def test_shared_prefix_attention_equals_attention_over_copied_prefixes(src, L):
    parent, cache, g = _branch(src)
    B, Hq, Hkv, D, Tp = len(src), 4, 2, 4, 6
    for layer_idx in (0, 1):
        module = types.SimpleNamespace(layer_idx=layer_idx)
        own_k, own_v = torch.randn(B, Hkv, 2 + L, D, generator=g), torch.randn(B, Hkv, 2 + L, D, generator=g)
        k, v = cache.layers[layer_idx].update(own_k, own_v)
        assert k.shape[0] == B and cache.layers[layer_idx].get_seq_length() == Tp + 2 + L
        q = torch.randn(B, Hq, L, D, generator=g)
        mask = torch.zeros(B, 1, L, Tp + 2 + L)
        mask[torch.rand(mask.shape, generator=g) < 0.3] = torch.finfo(torch.float32).min
        mask[..., -1] = 0  # every query sees at least one key
        got, _ = shared_prefix_attention(module, q, k, v, mask, scaling=0.5, shared_prefix=cache)
        pk, pv = parent.layers[layer_idx].keys, parent.layers[layer_idx].values
        full_k, full_v = torch.cat([pk[src], own_k], -2), torch.cat([pv[src], own_v], -2)
        want = _reference_attention(q, full_k, full_v, mask, 0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        wrong = _reference_attention(q, torch.cat([pk[[(s + 1) % 3 for s in src]], own_k], -2),
                                     torch.cat([pv[[(s + 1) % 3 for s in src]], own_v], -2), mask, 0.5)
        assert not torch.allclose(got, wrong, atol=1e-3)  # each row reads its own source's prefix


def test_shared_prefix_cache_keeps_the_prefix_once_and_checks_its_sources():
    parent, cache, _ = _branch([0] * 64 + [1] * 64, P=2)
    assert cache.layers[0].prefix[0].shape[0] == 2  # not 128 copies
    assert cache.layers[0].prefix[0].data_ptr() == parent.layers[0].keys.data_ptr()
    with pytest.raises(ValueError, match="source rows outside 0..2"):
        _branch([0, 3])
    with pytest.raises(RuntimeError, match="only inside a shared-prefix decode"):
        shared_prefix_attention(types.SimpleNamespace(layer_idx=0), torch.zeros(1, 4, 1, 4), torch.zeros(1, 2, 1, 4),
                                torch.zeros(1, 2, 1, 4), None, scaling=1.0)


def test_branch_shares_the_prefix_unless_a_row_records_attention_patterns(load, images):
    from conftest import OPTIONS
    from latentmed.engine import interventions as I
    from latentmed.engine.decode import DecodeConfig, Decoder

    r = load("mirage")
    with torch.inference_mode():  # as the sweeps prefill
        dec = Decoder(r, DecodeConfig(max_new_tokens=6, force_latent=True)).prefill(
            [r.build_inputs(images[0], "What colour?", OPTIONS)], [[]])
        shared = dec.branch([[], [I.ZeroLatent()]])
        eager = dec.branch([[], [I.Record(hooks=["blocks.0.attn.hook_pattern"])]])
    assert isinstance(shared.cache, SharedPrefixCache)
    assert not isinstance(eager.cache, SharedPrefixCache) and eager.cache.layers[0].keys.shape[0] == 2
    with pytest.raises(ValueError, match="itself a branch"):
        shared.branch([[]])
    a, b = shared.run(), eager.run()
    assert a[0].generated_ids == b[0].generated_ids
    torch.testing.assert_close(a[0].step_option_logprobs, b[0].step_option_logprobs, atol=1e-5, rtol=0)
    assert r.model.model.language_model.config._attn_implementation != "latentmed_shared_prefix"  # switched back
