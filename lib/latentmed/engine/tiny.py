"""Tiny `Qwen2_5_VLForConditionalGeneration` models: the real architecture at toy size.

Used for tests (random init) and as the testbed's model zoo (trained from scratch). A checkpoint
folder written by `save_checkpoint` looks like a real one: config.json, model.safetensors,
tokenizer files and preprocessor_config.json, so the real loading code reads both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from .tokenizer import build_tokenizer, save_tokenizer

# Sizes: "test" keeps unit tests fast; "testbed" is the zoo's size (training-feasibility.md).
SIZES = {
    "test": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, mrope=[2, 3, 3],
                 v_hidden=32, v_depth=2, v_heads=2, v_inter=64),
    "testbed": dict(hidden=128, layers=2, heads=4, kv_heads=2, inter=512, mrope=[4, 6, 6],
                    v_hidden=128, v_depth=2, v_heads=4, v_inter=256),
}


def _round_up(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def tiny_config(tokenizer, size: str = "test", **text_overrides) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config of the given size whose special ids come from `tokenizer`."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; known: {', '.join(SIZES)}")
    s = SIZES[size]
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=_round_up(len(tokenizer)),  # like the 7B: more rows than tokens
        hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=1024, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": s["mrope"]},
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    text.update(text_overrides)
    vision = dict(
        depth=s["v_depth"], hidden_size=s["v_hidden"], intermediate_size=s["v_inter"],
        num_heads=s["v_heads"], out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=112, fullatt_block_indexes=[s["v_depth"] - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def tiny_model(config: Qwen2_5_VLConfig, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Random-initialised model, deterministic in `seed`, in eval mode."""
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def image_processor(max_pixels: int = 224 * 224, min_pixels: int = 56 * 56) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL's PIL image processor (no torchvision needed); 224 px gives 64 merged tokens."""
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def save_checkpoint(path: str | Path, model, tokenizer, processor=None) -> Path:
    """Write a checkpoint folder in the real layout (safetensors only)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    save_tokenizer(tokenizer, path)
    (processor or image_processor()).save_pretrained(path)
    return path


def make_tiny_checkpoint(path: str | Path, size: str = "test", seed: int = 0, words=()) -> Path:
    """Build tokenizer (with `words` as single tokens) + random model of `size`; save as a folder."""
    tok = build_tokenizer(words)
    return save_checkpoint(path, tiny_model(tiny_config(tok, size), seed), tok)
