"""One loader and one checker for checkpoint folders (tiny testbed models and real 7B ones).

A checkpoint folder holds config.json (a Qwen2.5-VL config), safetensors weights (one file or
shards with an index), a tokenizer, preprocessor_config.json and, for our own models,
latent_spec.json (and the negative control's constant latents). `load` reads it with the stock
`Qwen2_5_VLForConditionalGeneration` from safetensors only (pickle is refused, no remote code),
and turns every way a folder can be wrong into an error that names the file.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..files import DamagedFileError, load_tensors, read_json
from .spec import METHODS, SPEC_FILE, LatentSpec, SpecIds, preset
from .tokenizer import load_tokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONSTANT_FILE = "latent_constant.safetensors"  # constant latents [K, H] under key "latent"
# config.json field -> token the tokenizer must map to the same id
CONFIG_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


class LVRHead(nn.Module):
    """LVR's projection head: LayerNorm -> Linear -> GELU -> Linear (names match `lvr_head.*`)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.ln_q = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x))


def read_config(folder: Path) -> dict:
    """config.json as a dict, checked to be a Qwen2.5-VL config."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every checkpoint folder needs config.json)")
    cfg = read_json(path, "JSON")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if cfg.get("model_type") != "qwen2_5_vl":
        archs = ", ".join(cfg.get("architectures") or []) or "none given"
        raise ValueError(f"{path}: model_type {cfg.get('model_type')!r} (architectures: {archs}) is not "
                         "Qwen2.5-VL; this loader reads qwen2_5_vl checkpoints only")
    _check_sizes(path, cfg)
    return cfg


# Sizes a config must give as positive integers (text: nested `text_config` or, in older
# checkpoints, top-level fields); without them transformers builds its default 7B model.
TEXT_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size")
VISION_SIZES = ("depth", "hidden_size", "num_heads", "patch_size", "spatial_merge_size", "temporal_patch_size",
                "out_hidden_size")


def _check_sizes(path: Path, cfg: dict) -> None:
    """Every size of the model is stated, a positive integer, and the heads divide the width."""
    text = cfg.get("text_config", cfg)
    vision = cfg.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ValueError(f"{path}: needs a 'vision_config' object and a 'text_config' object (or the text "
                         "sizes at the top level)")
    for part, d, keys in (("text_config", text, TEXT_SIZES), ("vision_config", vision, VISION_SIZES)):
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"{path}: {part} lacks {', '.join(missing)}; refusing to fill in the default "
                             "(7B) sizes")
        for k in keys:
            v = d[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{path}: {part}.{k} must be a positive integer, got {v!r}")
    for part, d, heads in (("text_config", text, "num_attention_heads"), ("vision_config", vision, "num_heads")):
        if d["hidden_size"] % d[heads]:
            raise ValueError(f"{path}: {part}.hidden_size {d['hidden_size']} is not divisible by {heads} {d[heads]}")
    if text["num_attention_heads"] % text["num_key_value_heads"]:
        raise ValueError(f"{path}: text_config.num_attention_heads {text['num_attention_heads']} is not divisible "
                         f"by num_key_value_heads {text['num_key_value_heads']}")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files to load, each with a readable header; pickle-only folders, missing
    shards and truncated files are clear errors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise ValueError(f"{index}: invalid shard index ({exc})") from exc
        pickles = [s for s in shards if s.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ValueError(f"{index}: lists pickle shard(s) {', '.join(pickles[:3])}; refusing to unpickle. "
                             "Convert them to safetensors first")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: lists shard(s) {', '.join(missing)} that are missing "
                                    f"from {folder} (partial download?)")
        files = [folder / s for s in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
        files = [f for f in files if f.name != CONSTANT_FILE]
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(f"{folder}: only pickle weights ({', '.join(pickles)}); refusing to unpickle. "
                             "Convert them to safetensors first")
        raise FileNotFoundError(f"{folder}: no model weights (model.safetensors or a shard index)")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                sf.keys()
        except (SafetensorError, OSError) as exc:
            raise DamagedFileError(f"{f}: unreadable weights, truncated or corrupt ({exc}); "
                                   "re-download or retrain this checkpoint") from exc
    return files


def check_tokenizer(folder: Path, cfg: dict, tokenizer) -> None:
    """config.json's vision token ids must be the tokenizer's ids for the same tokens, and the
    embedding must have a row for every token."""
    vocab = tokenizer.get_vocab()
    problems = []
    for key, token in CONFIG_TOKENS.items():
        if key in cfg and vocab.get(token) != cfg[key]:
            problems.append(f"config.json {key}={cfg[key]} but the tokenizer maps {token} to {vocab.get(token)}")
    vocab_size = cfg.get("text_config", {}).get("vocab_size", cfg.get("vocab_size"))
    if vocab_size is not None and len(tokenizer) > vocab_size:
        problems.append(f"tokenizer has {len(tokenizer)} tokens but config.json vocab_size is {vocab_size}")
    if problems:
        raise ValueError(f"{folder}: tokenizer/config mismatch: {'; '.join(problems)}")


def load_processor(folder: Path):
    """Qwen2-VL's PIL image processor from preprocessor_config.json, with its sizes checked."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the image processor settings)")
    raw = read_json(path, "JSON")
    for key in ("patch_size", "merge_size", "temporal_patch_size"):
        v = raw.get(key, 1) if isinstance(raw, dict) else None
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{path}: {key} must be a positive integer, got {v!r}")
    try:
        processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types; name the file
        raise ValueError(f"{path}: cannot build the image processor ({exc})") from exc
    _check_processor(path, processor)
    return processor


def _check_processor(path: Path, processor) -> None:
    """Pixel bounds that let an image keep at least one merged token, mean and std of 3 channels:
    a processor that would silently shrink every image to a few patches is refused."""
    lo, hi = processor.size.get("shortest_edge"), processor.size.get("longest_edge")
    one = (processor.patch_size * processor.merge_size) ** 2
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 0 < lo <= hi or hi < one:
        raise ValueError(f"{path}: pixel bounds min {lo!r} / max {hi!r} (min_pixels, max_pixels or size) must be "
                         f"integers with 0 < min <= max and max >= {one} (one merged token)")
    for name in ("image_mean", "image_std"):
        v = getattr(processor, name, None)
        if v is None or len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
            raise ValueError(f"{path}: {name} must be 3 numbers (RGB), got {v!r}")
    if any(x <= 0 for x in processor.image_std):
        raise ValueError(f"{path}: image_std must be > 0, got {processor.image_std!r}")


def resolve_spec(folder: Path, method: str | None) -> LatentSpec:
    """The method's preset, or the folder's latent_spec.json when no method is given."""
    if method is not None:
        return preset(method)
    if (folder / SPEC_FILE).is_file():
        return LatentSpec.load(folder)
    raise ValueError(f"{folder}: no {SPEC_FILE} in the folder; pass method= one of: {', '.join(METHODS)}")


def load_head(files: list[Path], hidden: int, cfg: dict, dtype, device) -> LVRHead:
    """LVR head weights from the checkpoint's `lvr_head.*` keys."""
    if cfg.get("lvr_head_type", "simple") != "simple":
        raise ValueError(f"config.json lvr_head_type {cfg['lvr_head_type']!r} is not supported "
                         "(only 'simple')")
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            keys = [k for k in sf.keys() if k.startswith("lvr_head.")]
            state.update({k[len("lvr_head."):]: sf.get_tensor(k) for k in keys})
    if not state:
        raise ValueError(f"{files[0].parent}: config.json asks for lvr_head but no lvr_head.* weights "
                         "were found")
    head = LVRHead(hidden)
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:  # missing, unexpected or mis-shaped keys
        raise ValueError(f"{files[0].parent}: lvr_head.* weights do not fit an LVR head of width {hidden} "
                         f"({str(exc).splitlines()[0]} ...)") from exc
    return head.to(device=device, dtype=dtype).eval()


def load_constant(folder: Path, spec: LatentSpec, hidden: int) -> torch.Tensor:
    """Constant latents [K, H] of a spec whose latent_source is "constant"."""
    path = folder / CONSTANT_FILE
    z = load_tensors(path, "constant latents").get("latent")
    if z is None or z.dim() != 2 or z.shape[1] != hidden or len(z) < spec.n_latents:
        shape = None if z is None else tuple(z.shape)
        raise ValueError(f"{path}: expected a tensor 'latent' of shape [>= {spec.n_latents}, {hidden}], got {shape}")
    return z


@dataclass
class Loaded:
    """Everything `load` reads from a folder."""

    model: nn.Module
    tokenizer: object
    processor: object
    spec: LatentSpec
    ids: SpecIds
    head: LVRHead | None = None
    constant: torch.Tensor | None = None
    report: dict = field(default_factory=lambda: {"missing": [], "unexpected": []})


def load(path: str | Path, method: str | None = None, dtype: torch.dtype | None = None, device: str = "cpu",
         strict: bool = True, **spec_overrides) -> Loaded:
    """Load a checkpoint folder; float32 on CPU and bfloat16 on CUDA unless `dtype` says."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: checkpoint folder not found")
    cfg = read_config(folder)
    files = weight_files(folder)
    tokenizer = load_tokenizer(folder)
    check_tokenizer(folder, cfg, tokenizer)
    spec, ids = resolve_spec(folder, method).with_overrides(**spec_overrides).resolve(tokenizer, cfg)
    if spec.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{folder}: the tokenizer has no chat template (tokenizer_config.json or "
                         f"chat_template.jinja), which method {spec.method!r} builds its prompts with")
    processor = load_processor(folder)
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no per-load bars in notebooks and logs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported below, by name
            model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                str(folder), dtype=dtype, use_safetensors=True, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True,
                trust_remote_code=False, device_map=device if str(device).startswith("cuda") else None)
    except Exception as exc:  # name the folder whatever went wrong inside transformers
        raise ValueError(f"{folder}: cannot load the model ({type(exc).__name__}: {exc})") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith("lvr_head.")]
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", [])]
    report = {"missing": sorted(info.get("missing_keys", [])), "unexpected": sorted(unexpected)}
    if mismatched:
        raise ValueError(f"{folder}: weights disagree with config.json in shape for {len(mismatched)} "
                         f"parameters, e.g. {mismatched[:3]}")
    if report["missing"] and strict:
        raise ValueError(f"{folder}: weights miss {len(report['missing'])} parameters of the model, "
                         f"e.g. {report['missing'][:3]} (pass strict=False to load anyway)")
    if report["missing"] or report["unexpected"]:
        warnings.warn(f"{folder}: missing keys {report['missing'][:5]}, unexpected keys "
                      f"{report['unexpected'][:5]}")
    model = model.to(device).eval()
    hidden = model.config.text_config.hidden_size
    head = load_head(files, hidden, cfg, dtype, device) if spec.head == "lvr_head" else None
    constant = load_constant(folder, spec, hidden).to(device=device, dtype=dtype) \
        if spec.latent_source == "constant" else None
    return Loaded(model, tokenizer, processor, spec, ids, head, constant, report)
