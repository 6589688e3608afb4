"""Build model inputs by hand: prompt text + images -> input_ids, pixel_values, grid, token types.

`Qwen2_5_VLProcessor` needs torchvision (for its video processor), so we do what it does for
images: expand each `<|image_pad|>` to one pad per merged image token and pass
`mm_token_type_ids` (without it transformers 5 silently falls back to 1-D positions).
A `Prompt` is the encoded result plus what a run needs beside it: the `Query` it was built from
(so input edits can rebuild it), the option tokens that score the answer, the tokens forced
after a segment (the testbed layout's restated key words) and the evidence crop's pixels (the
positive control's latent source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .memo import image_grid, image_key, token_ids
from .query import Query, as_image

IMAGE_PAD = "<|image_pad|>"


@dataclass(frozen=True)
class PendingPixels:
    """Images whose pixel patches are not computed yet (`pixels` runs when they are first read)."""

    processor: object
    images: tuple

    def __call__(self) -> torch.Tensor:
        return pixels(self.processor, list(self.images))[0]


class _LazyPixels:
    """A field read as a tensor that may be stored as `PendingPixels`: the first read computes
    and keeps it. A prompt whose tower output is memoised (`memo.tower`) never runs the processor."""

    def __set_name__(self, owner, name):
        self.attr = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return None  # the field's default
        value = obj.__dict__.get(self.attr)
        if isinstance(value, PendingPixels):
            value = obj.__dict__[self.attr] = value()
        return value

    def __set__(self, obj, value):
        obj.__dict__[self.attr] = value


@dataclass
class Encoded:
    """One prompt ready for the model; tensors have a leading batch dim of 1 (pixels: per patch)."""

    input_ids: torch.Tensor  # [1, T]
    pixel_values: torch.Tensor | None = _LazyPixels()  # [n_patches, C*T*p*p], computed when first read
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3]
    text: str = ""  # prompt before pad expansion
    pixel_key: str | None = None  # digest of the images and processor settings (`memo.image_key`)

    def mm_token_type_ids(self, image_token_id: int) -> torch.Tensor:
        return (self.input_ids == image_token_id).int()

    def pixel_source(self) -> torch.Tensor | PendingPixels | None:
        """The pixels as stored: a tensor, or `PendingPixels` not computed yet (reading
        `pixel_values` computes them)."""
        return self.__dict__.get("_pixel_values")


@dataclass
class Prompt(Encoded):
    """Encoded inputs plus what running and scoring need.

    `prompt_len` < len(input_ids) marks teacher-forced generated ids after the prompt (used by
    `continue_from`).
    """

    query: Query | None = None
    option_ids: list[int] | None = None
    prompt_len: int | None = None
    after_segment_ids: list[int] | None = None  # forced after a segment when DecodeConfig.force_suffix
    source_pixels: torch.Tensor | None = _LazyPixels()  # image a non-hidden latent source reads (scene or crop)
    source_grid: torch.Tensor | None = None
    source_index: list[int] | None = None  # which of its merged tokens (None: all), in slot order
    source_key: str | None = None  # digest of the source image (`memo.image_key`)
    features: torch.Tensor | None = field(default=None, repr=False, compare=False)  # merged image tokens, once computed

    @property
    def question(self) -> str:
        return self.query.question if self.query is not None else ""

    @property
    def options(self) -> list[str] | None:
        return self.query.options if self.query is not None else None


def n_image_tokens(grid_thw: torch.Tensor, merge_size: int = 2) -> list[int]:
    """Merged image tokens per image: t*h*w / merge^2."""
    return [int(t * h * w) // merge_size**2 for t, h, w in grid_thw.tolist()]


def pixels(processor, images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel patches and grid of `images` (Qwen2-VL's processor); PIL images, paths and arrays
    are checked by `query.as_image`, and a failure names the image size."""
    if isinstance(images, (Image.Image, str, Path, np.ndarray)) or not isinstance(images, (list, tuple)):
        raise TypeError(f"images: expected a list of images, got {type(images).__name__}")
    images = [as_image(im, f"image {i}") for i, im in enumerate(images)]
    try:
        out = processor(images=images, return_tensors="pt")
    except (ValueError, TypeError, ZeroDivisionError) as exc:
        sizes = ", ".join(f"{im.size[0]}x{im.size[1]}" for im in images)
        raise ValueError(f"image(s) of size {sizes}: the image processor refused them ({exc})") from exc
    return out["pixel_values"], out["image_grid_thw"]


def image_inputs(processor, images: list[Image.Image]) -> tuple[torch.Tensor | PendingPixels, torch.Tensor, str]:
    """(pixels, grid, key) of checked PIL `images`: the grid from `memo.image_grid`, the pixels
    pending unless the processor has just run for that grid, the key `memo.image_key`."""
    key = image_key(processor, images)
    grid, pix = image_grid(processor, images, lambda ims: pixels(processor, ims))
    if pix is None:  # copies: the key is of these bytes, whatever the caller later does to its images
        pix = PendingPixels(processor, tuple(im.copy() for im in images))
    return pix, grid, key


def encode(tokenizer, processor, text: str, images: list[Image.Image] | None = None) -> Encoded:
    """Tokenize `text` (one `<|image_pad|>` per image) and process `images` to match."""
    images = [] if images is None else images
    if isinstance(images, (Image.Image, str, Path, np.ndarray)):
        images = [images]
    if text.count(IMAGE_PAD) != len(images):
        raise ValueError(f"prompt has {text.count(IMAGE_PAD)} {IMAGE_PAD} markers but {len(images)} images were given")
    pixel_values = grid = key = None
    if images:
        images = [as_image(im, f"image {i}") for i, im in enumerate(images)]
        pixel_values, grid, key = image_inputs(processor, images)
        merge = getattr(processor, "merge_size", 2)
        parts = text.split(IMAGE_PAD)
        text_expanded = parts[0]
        for n, part in zip(n_image_tokens(grid, merge), parts[1:]):
            text_expanded += IMAGE_PAD * n + part
    else:
        text_expanded = text
    ids = torch.tensor([token_ids(tokenizer, text_expanded)], dtype=torch.long)
    return Encoded(ids, pixel_values, grid, text, key)


def chat_prompt(tokenizer, user_text: str, n_images: int = 1, system: str | None = None,
                assistant_prefix: str = "") -> str:
    """Chat-template a single user turn with `n_images` images first, then the assistant's start."""
    if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 0:
        raise ValueError(f"n_images: must be an integer >= 0, got {n_images!r}")
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": user_text}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + assistant_prefix
