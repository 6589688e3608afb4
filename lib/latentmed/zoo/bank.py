"""Feature banks: testbed items with their merged image tokens, computed once per item.

The vision tower is frozen after the base's vision stage, so training and the fast evaluation
path run the language model only, on tokens from a `FeatureBank` (cached on disk by a hash of
the tower's weights, the testbed config, the split, the counts and the kind of image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..engine import layouts
from ..engine.inputs import pixels
from ..engine.query import as_image
from ..engine.tiny import image_processor
from ..files import DamagedFileError, atomic_save_tensors, load_tensors, settings_hash, state_hash
from ..testbed.items import TestbedConfig, make_item


def pixel_inputs(images, processor):
    """Pixel patches and grid of `images` (paths and arrays too), each checked by the engine's rule."""
    return pixels(processor, [as_image(im, f"image {i}") for i, im in enumerate(images)])


@torch.no_grad()
def tower_tokens(model, images, processor=None, batch_size: int = 32) -> torch.Tensor:
    """Merged image tokens [N, T, H] of same-size images, as the model scatters them."""
    processor = processor or image_processor()
    out = []
    for i in range(0, len(images), batch_size):
        pv, grid = pixel_inputs(images[i:i + batch_size], processor)
        feats = model.model.visual(pv, grid_thw=grid).pooler_output
        out.append(feats.view(len(grid), -1, feats.shape[-1]))
    return torch.cat(out)


@dataclass
class FeatureBank:
    """Items of one split with their merged image tokens (the tower is frozen)."""

    items: list  # Item (images dropped to save memory)
    main: torch.Tensor  # [N, T, H] tokens of the scene
    crop: torch.Tensor | None = None  # [N, Tc, H] tokens of the evidence crop
    degraded: torch.Tensor | None = None  # [N, T, H] tokens of the degraded scene
    grid: tuple = (1, 16, 16)
    crop_grid: tuple = (1, 4, 4)
    # each item's token ids per (tokenizer, layout), filled by `batching.collate`: a training run
    # collates every pool item hundreds of times with the same layout
    token_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.items)

    def family_index(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, it in enumerate(self.items):
            out.setdefault(it.family, []).append(i)
        return out


def _check_counts(counts: dict, config: TestbedConfig, offset: int) -> None:
    """Items per family: non-negative integers for families the testbed has."""
    unknown = sorted(set(counts) - set(config.families))
    if unknown:
        raise ValueError(f"per_family: unknown task famil(ies) {', '.join(map(repr, unknown))}; "
                         f"the testbed has {', '.join(config.families)}")
    for f, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"per_family[{f!r}]: must be an integer >= 0, got {n!r}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"offset: must be an integer >= 0, got {offset!r}")


def _load_cached(path: Path, n: int) -> torch.Tensor:
    """A cached kind of tokens [n, T, H]; a damaged or foreign cache file is an error naming it."""
    t = load_tensors(path, "feature-bank cache").get("tokens")
    if t is None or (n == 0 and t.numel() != 0) or (n > 0 and (t.dim() != 3 or len(t) != n)):
        shape = None if t is None else tuple(t.shape)
        raise DamagedFileError(f"{path}: expected 'tokens' of shape [{n}, T, H], got {shape}; "
                               "delete it and rebuild the feature-bank cache")
    return t


# the plan's latent_fill that trains a spec's latent_source
FILL_OF_SOURCE = {"hidden": "hidden", "evidence_crop": "crop", "evidence_tokens": "evidence", "constant": "constant"}


def fill_for(kind: str, bank: FeatureBank, idx: list[int], K: int, constant: torch.Tensor | None = None):
    """[B, K, H] vectors for the slots of a batch filled from outside the model (None: "hidden",
    the model's own loop): the crop's tokens, the evidence cells' tokens or the constant."""
    if kind == "hidden" or K == 0:
        return None
    if kind == "crop":
        return bank.crop[idx][:, torch.arange(K) % bank.crop.shape[1]]
    if kind == "evidence":
        return evidence_fill(bank, idx, K)
    if kind == "constant":
        return constant[torch.arange(K) % len(constant)].unsqueeze(0).expand(len(idx), -1, -1)
    raise ValueError(f"unknown latent fill {kind!r}")


def evidence_fill(bank: FeatureBank, idx: list[int], K: int) -> torch.Tensor:
    """[B, K, H] the scene's merged tokens at each item's evidence cells, cycled over the K slots
    (zeros for an item without evidence): the positive control's latents, as the engine feeds them."""
    g = bank.grid[2] // 2
    out = torch.zeros(len(idx), K, bank.main.shape[-1])
    for b, i in enumerate(idx):
        cells = list(dict.fromkeys(r * g + c for r, c in (bank.items[i].evidence_cells or [])))
        if cells:
            out[b] = bank.main[i, cells][torch.arange(K) % len(cells)]
    return out


def build_bank(model, config: TestbedConfig, split: str, per_family: int | dict, kinds=("main",),
               cache_dir: Path | None = None, progress: bool = True, offset: int = 0) -> FeatureBank:
    """Make items (`make_item`) and compute their tower tokens, each kind cached on disk.

    kinds: "main" (the scene), "crop" (the evidence crop), "degraded" (the scene box-averaged
    to 56 px and back). The cache key is a hash of the tower's weights, the testbed config,
    the split, the item counts and the kind.
    """
    counts = per_family if isinstance(per_family, dict) else {f: per_family for f in config.families}
    _check_counts(counts, config, offset)
    keys = [(f, offset + i) for f in config.families for i in range(counts.get(f, 0))]
    base_key = dict(tower=state_hash(model.model.visual), config=config.to_dict(), split=split, counts=counts,
                    offset=offset)
    paths = {k: (Path(cache_dir) / f"bank-{split}-{k}-{settings_hash(dict(base_key, kind=k))}.safetensors"
                 if cache_dir else None) for k in kinds}
    tensors = {k: _load_cached(p, len(keys)) for k, p in paths.items() if p is not None and p.exists()}
    todo = [k for k in kinds if k not in tensors]
    processor = image_processor()
    parts: dict[str, list] = {k: [] for k in todo}
    items, chunk = [], 64
    bar = tqdm(total=len(keys), desc=f"tower tokens {split} {'+'.join(todo)}", disable=not progress or not todo,
               leave=False)
    for s in range(0, len(keys), chunk):
        part = [make_item(config, split, f, i, images=bool(todo)) for f, i in keys[s:s + chunk]]
        for k in todo:
            imgs = {"main": lambda it: it.image, "crop": lambda it: it.crop,
                    "degraded": lambda it: layouts.degrade(it.image)}[k]
            parts[k].append(tower_tokens(model, [imgs(it) for it in part], processor))
        for it in part:
            it.image = it.crop = None
        items.extend(part)
        bar.update(len(part))
    bar.close()
    for k in todo:
        tensors[k] = torch.cat(parts[k]) if parts[k] else torch.zeros(0)
        if paths[k] is not None:
            paths[k].parent.mkdir(parents=True, exist_ok=True)
            atomic_save_tensors({"tokens": tensors[k].contiguous()}, paths[k])
    g = config.grid * 2
    return FeatureBank(items, tensors.get("main"), tensors.get("crop"), tensors.get("degraded"), (1, g, g),
                       (1, config.crop_size // 14, config.crop_size // 14))
