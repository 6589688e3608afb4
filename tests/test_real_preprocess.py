"""Qwen2.5-VL's image preprocessing as the real track states it, checked against the transformers
processor (and torchvision's where it is installed) and against cases worked out by hand, at
the real resolutions and pixel bounds of the released evaluation scripts."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from latentmed.engine.checkpoint import load_processor
from latentmed.real import preprocess as pp
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize,
)

QWEN = pp.EVAL_PIXELS["qwen2.5-vl"]
MONET = pp.EVAL_PIXELS["monet"]
# Qwen/Qwen2.5-VL-7B-Instruct's preprocessor_config.json
QWEN_7B_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
# (width, height): HR-Bench 8K and 4K frames, portrait 8K, a V* image, MME-RealWorld sizes, tiny ones
REAL_SIZES = [(7680, 4320), (4320, 7680), (8192, 4608), (3840, 2160), (2246, 1582), (1920, 1080), (4000, 3000),
              (10000, 10000), (5472, 3648), (64, 48), (28, 28), (900, 5)]


def test_eval_pixels_are_the_released_scripts_settings():
    assert QWEN == (3136, 12845056) == (4 * 28 * 28, 16384 * 28 * 28)
    assert MONET == (200704, 6422528) == (256 * 28 * 28, 8192 * 28 * 28)


def test_smart_resize_equals_transformers_on_real_and_random_sizes():
    rng = random.Random(0)
    sizes = REAL_SIZES + [(rng.randint(1, 9000), rng.randint(1, 9000)) for _ in range(3000)]
    bounds = [QWEN, MONET, (56 * 56, 28 * 28 * 1280), (784, 50176)]
    n = 0
    for w, h in sizes:
        if max(w, h) / min(w, h) > 200:
            continue
        for lo, hi in bounds:
            assert pp.smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (w, h, lo, hi)
            n += 1
    assert n > 10000


def test_hand_checked_cases():
    # HR-Bench 8K frame, Qwen's bounds: beta = sqrt(7680*4320/12845056) = 5760/3584, so
    # 4320/beta = 2688 = 96*28 and 7680/beta = 4778.7 -> 170*28 = 4760
    assert pp.smart_resize(4320, 7680, 28, *QWEN) == (2688, 4760)
    assert pp.grid(7680, 4320, *QWEN) == (1, 192, 340) and pp.n_tokens(7680, 4320, *QWEN) == 16320
    # Monet's bounds: beta = sqrt(33177600/6422528) = 2.2728; 4320/beta/28 = 67.9 -> 67; 7680/beta/28 = 120.7 -> 120
    assert pp.smart_resize(4320, 7680, 28, *MONET) == (1876, 3360)
    assert pp.n_tokens(7680, 4320, *MONET) == 67 * 120 == 8040
    # within bounds: nearest multiples of 28 (2246 x 1582 V* image -> 80 x 56 blocks)
    assert pp.smart_resize(1582, 2246, 28, *QWEN) == (1568, 2240)
    # below min_pixels: scaled up by sqrt(3136 / 200) = 3.96 and rounded up
    assert pp.smart_resize(10, 20, 28, *QWEN) == (56, 84)
    with pytest.raises(ValueError, match="aspect ratio 201:1 .* refuses"):
        pp.smart_resize(10, 2010, 28, *QWEN)


def test_patch_layout_by_hand():
    # a 56 x 28 image of eight solid 14 x 14 patches, patch (r, c) has grey value 10 * (4 r + c)
    arr = np.zeros((28, 56, 3), np.uint8)
    for r in range(2):
        for c in range(4):
            arr[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = 10 * (4 * r + c)
    proc = Qwen2VLImageProcessorPil(min_pixels=784, max_pixels=56 * 28)
    out = proc(images=[Image.fromarray(arr)], return_tensors="np")
    assert out["image_grid_thw"].tolist() == [[1, 2, 4]]
    pv = out["pixel_values"]
    assert pv.shape == (8, 3 * 2 * 14 * 14)
    # rows go block by block (2 x 2 patches per merged token), row-major inside a block
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    for row, (r, c) in enumerate(order):
        v = 10 * (4 * r + c) / 255
        want = np.concatenate([np.full(2 * 14 * 14, (v - m) / s) for m, s in zip(pp.CLIP_MEAN, pp.CLIP_STD)])
        np.testing.assert_allclose(pv[row], want, atol=1e-5)  # channel-major, the frame twice, 14 x 14 pixels
    ref, g = pp.reference_preprocess(Image.fromarray(arr), 784, 56 * 28)
    assert g == (1, 2, 4)
    np.testing.assert_allclose(ref, pv, atol=1e-6)


def test_reference_equals_the_processor_value_for_value_with_a_resize():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (333, 1000, 3), dtype=np.uint8))
    for lo, hi in (QWEN, (784, 50176)):
        out = Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi)(images=[im], return_tensors="np")
        ref, g = pp.reference_preprocess(im, lo, hi)
        assert [list(g)] == out["image_grid_thw"].tolist()
        np.testing.assert_allclose(ref, out["pixel_values"], atol=1e-5)


@pytest.fixture(scope="module")
def frame_8k():
    """An HR-Bench-8K-size image (7680 x 4320) with detail everywhere."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (135, 240, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((7680, 4320), Image.NEAREST)


def test_released_7b_preprocessor_config_at_hr_bench_8k(tmp_path, frame_8k):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN_7B_PREPROCESSOR))
    proc = load_processor(tmp_path)  # the engine's loader
    assert pp.pixel_bounds(proc) == QWEN
    out = proc(images=[frame_8k], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 192, 340]]
    assert out["pixel_values"].shape == (192 * 340, 1176)
    assert pp.check_grid(proc, [frame_8k.size], out["image_grid_thw"]) == [(1, 192, 340)]


def test_monet_bounds_at_hr_bench_8k_value_for_value(tmp_path, frame_8k):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN_7B_PREPROCESSOR))
    proc = pp.configure(load_processor(tmp_path), *MONET)
    assert pp.pixel_bounds(proc) == MONET
    out = proc(images=[frame_8k], return_tensors="np")
    ref, g = pp.reference_preprocess(frame_8k, *MONET)
    assert out["image_grid_thw"].tolist() == [list(g)] == [[1, 134, 240]]
    np.testing.assert_allclose(ref, out["pixel_values"], atol=1e-5)


def test_configure_and_check_grid_errors():
    proc = Qwen2VLImageProcessorPil(min_pixels=784, max_pixels=50176)
    with pytest.raises(ValueError, match="need 28\\*28 <= min <= max"):
        pp.configure(proc, 5000, 4000)
    pp.configure(proc, max_pixels=100352)
    assert pp.pixel_bounds(proc) == (784, 100352)
    with pytest.raises(ValueError, match=r"gave grids \[\(1, 2, 2\)\] .* gives \[\(1, 4, 4\)\]"):
        pp.check_grid(proc, [(56, 56)], torch.tensor([[1, 2, 2]]))


def test_torchvision_processor_where_it_runs():
    pytest.importorskip("torchvision")
    from transformers import Qwen2VLImageProcessor

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (1582, 2246, 3), dtype=np.uint8))
    fast = Qwen2VLImageProcessor(min_pixels=QWEN[0], max_pixels=QWEN[1])(images=[im], return_tensors="np")
    ref, g = pp.reference_preprocess(im, *QWEN)
    assert fast["image_grid_thw"].tolist() == [list(g)]
    # torch's bicubic differs from PIL's by interpolation detail, not by layout
    assert np.abs(fast["pixel_values"] - ref).mean() < 0.05
