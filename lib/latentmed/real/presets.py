"""The released 7B checkpoints: which engine method reads each, and how each is evaluated.

Every model loads from a local folder through the engine's one loader
(`LatentReasoner.from_pretrained`: safetensors only, token ids read from the checkpoint's
tokenizer and cross-checked against its config.json, LVR's head when its config says so). A
preset adds what an evaluation needs beside the method's `LatentSpec` (survey sections 1-4):

* `direct`: Qwen/Qwen2.5-VL-7B-Instruct; no segment; option letter; pixels 3136 .. 12845056.
* `monet`: NOVAglow646/Monet-7B; `<abs_vis_token>`, the first latent on the start slot, 10
  latents, end forced; the model decides to open it (`--force-latent` opens it); `\boxed{}`;
  pixels 200704 .. 6422528 (its inference script).
* `monet-sft`: NOVAglow646/Monet-SFT-7B; the same markers, latents on pad slots after the start;
  `\boxed{}`; 200704 .. 6422528.
* `lvr`: vincentleebang/LVR-7B; `<|lvr_start|>`, 8 latents (`lvr_steps`), `lvr_head` when
  config.json says so; `<answer>`; 3136 .. 12845056 (qwen_vl_utils' defaults).
* `mirage`: Miiche/vsp_spatial_planning_direct_sft; `<|latent_start|>` until `<|latent_end|>`,
  cap 8; `\boxed{}`; the checkpoint's pixel bounds.
* `capimagine`: Michael4933/CapImagine-7B; text imagination (traced between markers only when
  its tokenizer has them); `\boxed{}`; the checkpoint's pixel bounds.

CapImagine-7B is run "with the official Qwen2.5-VL inference code" (its README): its tokenizer
has no imagination markers, so its imagination is ordinary text (placement "none"); a
checkpoint whose tokenizer has the spec's markers keeps them as a traced text segment.
Decoding is greedy (the harnesses' temperature 0). Known deviation: Mirage's own test script
writes `<|im_start|>assistant` without the newline the chat template's generation prompt has.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..engine.reasoner import LatentReasoner
from ..engine.spec import METHODS
from ..engine.tokenizer import load_tokenizer
from .harness import HarnessSpec
from .preprocess import EVAL_PIXELS, configure, pixel_bounds


@dataclass(frozen=True)
class ModelPreset:
    """How one released model is evaluated (see the module doc)."""

    method: str  # engine method (LatentSpec preset)
    name: str  # display name
    checkpoint: str  # Hugging Face id of the released weights (for the README; never downloaded)
    paper: str | None  # its column in the paper's accuracy table (DESIGN.md section 4)
    pixels: str | None  # key of EVAL_PIXELS; None: the checkpoint's preprocessor config
    max_new_tokens: int


PRESETS: dict[str, ModelPreset] = {
    "direct": ModelPreset("direct", "Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-7B",
                          "qwen2.5-vl", 64),
    "monet": ModelPreset("monet", "Monet-7B", "NOVAglow646/Monet-7B", "Monet", "monet", 1024),
    "monet-sft": ModelPreset("monet-sft", "Monet-SFT-7B", "NOVAglow646/Monet-SFT-7B", None, "monet", 1024),
    "lvr": ModelPreset("lvr", "LVR-7B", "vincentleebang/LVR-7B", "LVR", "lvr", 512),
    "mirage": ModelPreset("mirage", "Mirage-7B (VSP)", "Miiche/vsp_spatial_planning_direct_sft", None, None, 1024),
    "capimagine": ModelPreset("capimagine", "CapImagine-7B", "Michael4933/CapImagine-7B", "CapImagine", None, 1024),
}
assert set(PRESETS) == set(METHODS), "every engine method needs a real-track preset"


def preset(method: str) -> ModelPreset:
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(PRESETS)}")
    return PRESETS[method]


def spec_overrides(folder: Path, method: str) -> dict:
    """Spec changes a released checkpoint needs: CapImagine without imagination markers runs
    as plain generation."""
    if method != "capimagine":
        return {}
    from ..engine.spec import preset as spec_preset

    spec = spec_preset(method)
    vocab = load_tokenizer(folder).get_vocab()
    if spec.start_token in vocab and spec.end_token in vocab:
        return {}
    return dict(placement="none", start_token=None, end_token=None, max_segments=None)


def load_model(folder: str | Path, method: str, benchmark: str, harness: str = "vlmevalkit",
               device: str = "cpu", dtype: torch.dtype | None = None, min_pixels: int | None = None,
               max_pixels: int | None = None) -> LatentReasoner:
    """A released checkpoint through the engine's loader, asking questions as `harness` does for
    `benchmark`, with the pixel bounds of the method's evaluation (or those given)."""
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    p = preset(method)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' own load report; the engine reports by name
    try:
        r = LatentReasoner.from_pretrained(folder, method=method, dtype=dtype, device=device,
                                           **spec_overrides(folder, method))
    finally:
        hf_logging.set_verbosity(level)
    r.spec = HarnessSpec.of(r.spec, harness, benchmark)
    lo, hi = EVAL_PIXELS[p.pixels] if p.pixels else (None, None)
    configure(r.processor, min_pixels if min_pixels is not None else lo,
                         max_pixels if max_pixels is not None else hi)
    return r


def describe(r: LatentReasoner) -> dict:
    """What a run records about the loaded model: spec, pixel bounds, head, load report."""
    lo, hi = pixel_bounds(r.processor)
    spec = r.spec.base() if isinstance(r.spec, HarnessSpec) else r.spec
    return dict(spec=asdict(spec), min_pixels=lo, max_pixels=hi, head=r.head is not None,
                ids=dict(start=r.ids.start, end=r.ids.end, pad=r.ids.pad), load_report=r.load_report)


# ---------------------------------------------------------------- fingerprints

BLOCK = 1 << 20
WEIGHT_SUFFIXES = (".safetensors",)


def file_fingerprint(path: str | Path, h=None) -> str:
    """sha256 of a file's size and bytes; files over 8 MiB: its size, first, middle and last
    MiB (enough to tell two checkpoints or benchmark files apart without reading gigabytes)."""
    path = Path(path)
    h = h or hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        if size <= 8 * BLOCK:
            h.update(f.read())
        else:
            for at in (0, size // 2, size - BLOCK):
                f.seek(at)
                h.update(f.read(BLOCK))
    return h.hexdigest()[:16]


def checkpoint_fingerprint(folder: str | Path) -> str:
    """A checkpoint folder's identity: its JSON configs, tokenizer files and weight files
    (sampled as in `file_fingerprint`); the model hash of every results run."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix in (".json", ".jinja", ".txt")
                                                                   or p.suffix in WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{folder}: no checkpoint files")
    for p in files:
        file_fingerprint(p, h)
    return h.hexdigest()[:16]


def presets_table() -> list[dict]:
    rows = []
    for m, p in PRESETS.items():
        lo, hi = EVAL_PIXELS[p.pixels] if p.pixels else (None, None)
        rows.append(dict(method=m, model=p.name, checkpoint=p.checkpoint, paper_column=p.paper,
                         min_pixels=lo if lo else "checkpoint", max_pixels=hi if hi else "checkpoint",
                         max_new_tokens=p.max_new_tokens))
    return rows
