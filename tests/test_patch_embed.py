"""The vision tower's patch embedding as a matrix product: the Conv3d's map, weights and gradients."""

from __future__ import annotations

import copy

import torch
from latentmed.engine.patch_embed import LinearPatchEmbed, use_linear_patch_embed
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    conv = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=16)
    lin = copy.deepcopy(conv)
    lin.__class__ = LinearPatchEmbed
    return conv, lin


def test_linear_patch_embed_computes_the_conv3d_map_and_its_gradient():
    conv, lin = _pair()
    x = torch.randn(37, 3 * 2 * 14 * 14)
    a, b = conv(x), lin(x)
    assert a.shape == b.shape == (37, 16)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    a.square().sum().backward(), b.square().sum().backward()
    assert torch.allclose(conv.proj.weight.grad, lin.proj.weight.grad, atol=1e-3, rtol=1e-4)
    lin.proj.weight.data[0] += 1  # it reads the module's own weights: an edit shows
    assert not torch.allclose(lin(x)[:, 0], a[:, 0], atol=1e-2)
    assert torch.allclose(lin(x)[:, 1:], a[:, 1:], atol=1e-5, rtol=1e-5)


def test_loaded_models_use_it_with_unchanged_weights(ckpt):
    from latentmed.engine.checkpoint import load

    x = load(ckpt, method="direct")
    pe = x.model.model.visual.patch_embed
    assert type(pe) is LinearPatchEmbed and "proj.weight" in pe.state_dict()
    copied = copy.deepcopy(x.model)  # a copy computes with its own weights
    copied.model.visual.patch_embed.proj.weight.data.zero_()
    p = torch.randn(4, pe.proj.weight[0].numel())
    assert copied.model.visual.patch_embed(p).abs().max() == 0 and pe(p).abs().max() > 0
    use_linear_patch_embed(x.model)  # a second call leaves it as it is
    assert type(x.model.model.visual.patch_embed) is LinearPatchEmbed
