"""Qwen2.5-VL's image preprocessing, written out: smart resize, patching, grid sizes.

The engine feeds images through transformers' `Qwen2VLImageProcessorPil` (the processor that
needs no torchvision; `Qwen2_5_VLProcessor` cannot be built without it). This module states
what that processor does so that the real track can predict and check it, and a researcher
can see how many image tokens an 8K image becomes:

1. **smart resize** (`smart_resize`): round height and width to multiples of
   `factor = patch_size * merge_size` (28); if that exceeds `max_pixels`, scale both by
   `beta = sqrt(h*w / max_pixels)` and round *down* to multiples of 28; if it is below
   `min_pixels`, scale up by `sqrt(min_pixels / (h*w))` and round *up*. An aspect ratio beyond
   200:1 is refused. The image is resized to that size with PIL's bicubic filter.
2. **rescale and normalize**: `x / 255`, then `(x - mean) / std` per channel (CLIP's mean and std).
3. **patching** (`patchify`): 14 x 14 patches, ordered block by block of `merge_size x
   merge_size` patches (row-major blocks, row-major patches inside a block, since the merger
   folds each block into one token); each patch is flattened channel-major, repeated
   `temporal_patch_size` (2) times for the video axis, then 14 x 14 pixels.
4. **grid**: `image_grid_thw = [1, h/14, w/14]`; the language model sees `h*w / (14*14*4)`
   merged image tokens.

`reference_preprocess` does all four with PIL and numpy and is checked against the
transformers processor value for value (and, where torchvision is installed, against the
torchvision processor); `configure` sets the pixel bounds an evaluation uses. The bounds
differ between the released evaluation scripts (`EVAL_PIXELS`).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

PATCH, MERGE, TEMPORAL = 14, 2, 2
FACTOR = PATCH * MERGE  # 28
MAX_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pixel bounds (min_pixels, max_pixels) of the released evaluation scripts. None: the
# checkpoint's preprocessor_config.json (Qwen2.5-VL-7B-Instruct: 3136 .. 12845056).
EVAL_PIXELS: dict[str, tuple[int, int] | None] = {
    # Qwen2.5-VL-7B-Instruct's preprocessor_config.json; lmms-eval's and qwen_vl_utils' defaults
    "qwen2.5-vl": (4 * 28 * 28, 16384 * 28 * 28),
    # NOVAglow646/Monet inference/load_and_gen_vllm.py: min 256*28*28, max 8192*28*28
    "monet": (256 * 28 * 28, 8192 * 28 * 28),
    # VincentLeebang/lvr evaluation/evaluation.py goes through qwen_vl_utils.process_vision_info
    "lvr": (4 * 28 * 28, 16384 * 28 * 28),
}


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) the processor resizes an image to (see the module doc, step 1)."""
    if min(height, width) < 1:
        raise ValueError(f"empty image ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f}:1 of a {width}x{height} "
                         f"image is beyond {MAX_RATIO}:1, which Qwen2.5-VL's processor refuses")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def grid(width: int, height: int, min_pixels: int, max_pixels: int, patch: int = PATCH,
         merge: int = MERGE) -> tuple[int, int, int]:
    """`image_grid_thw` of a width x height image: (1, h / patch, w / patch) after smart resize."""
    h, w = smart_resize(height, width, patch * merge, min_pixels, max_pixels)
    return 1, h // patch, w // patch


def n_tokens(width: int, height: int, min_pixels: int, max_pixels: int, patch: int = PATCH,
             merge: int = MERGE) -> int:
    """Merged image tokens the language model sees for a width x height image."""
    t, gh, gw = grid(width, height, min_pixels, max_pixels, patch, merge)
    return t * gh * gw // merge**2


def pixel_bounds(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) a Qwen2-VL image processor resizes with."""
    size = processor.size
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    lo, hi = get("shortest_edge"), get("longest_edge")
    if lo is None or hi is None:
        raise ValueError(f"image processor size {size!r} has no shortest_edge/longest_edge (min/max pixels)")
    return int(lo), int(hi)


def configure(processor, min_pixels: int | None = None, max_pixels: int | None = None):
    """Set the processor's pixel bounds (None keeps the checkpoint's); returns the processor."""
    lo, hi = pixel_bounds(processor)
    lo = lo if min_pixels is None else int(min_pixels)
    hi = hi if max_pixels is None else int(max_pixels)
    factor = processor.patch_size * processor.merge_size
    if not factor**2 <= lo <= hi:
        raise ValueError(f"pixel bounds min_pixels={lo}, max_pixels={hi}: need {factor}*{factor} <= min <= max")
    processor.size = {"shortest_edge": lo, "longest_edge": hi}
    return processor


def patchify(pixels: np.ndarray, patch: int = PATCH, merge: int = MERGE, temporal: int = TEMPORAL) -> np.ndarray:
    """[C, H, W] normalized pixels -> [H/p * W/p, C * temporal * p * p] rows (module doc, step 3)."""
    c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # block row, block col, row in block, col in block, C, py, px
    x = np.repeat(x[:, :, :, :, :, None], temporal, axis=5)  # the video axis: the frame twice
    return x.reshape(gh * gw, c * temporal * patch * patch)


def reference_preprocess(image: Image.Image, min_pixels: int, max_pixels: int, mean=CLIP_MEAN, std=CLIP_STD,
                         patch: int = PATCH, merge: int = MERGE, temporal: int = TEMPORAL
                         ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Pixel rows and grid of one image, steps 1-4 of the module doc with PIL and numpy."""
    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, patch * merge, min_pixels, max_pixels)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BICUBIC)
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    x = (x - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    return patchify(x, patch, merge, temporal), (1, h // patch, w // patch)


def check_grid(processor, image_sizes: list[tuple[int, int]], grid_thw) -> list[tuple[int, int, int]]:
    """The grids `smart_resize` predicts for (width, height) sizes, checked against the grids the
    processor produced; a difference is an error (the processor does not resize as documented)."""
    lo, hi = pixel_bounds(processor)
    want = [grid(w, h, lo, hi, processor.patch_size, processor.merge_size) for w, h in image_sizes]
    got = [tuple(int(v) for v in row) for row in (grid_thw.tolist() if hasattr(grid_thw, "tolist") else grid_thw)]
    if got != want:
        raise ValueError(f"image processor gave grids {got} for images {image_sizes}, but Qwen2.5-VL's smart resize "
                         f"with min_pixels={lo}, max_pixels={hi} gives {want}")
    return want
