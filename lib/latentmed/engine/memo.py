"""A content-keyed memo of the vision tower's output, shared by every reasoner in a process.

The same pixels through the same tower weights give the same merged image tokens. The zoo's
models all carry the base's frozen tower, and a study runs the same images (and the same
perturbed images) through every model, so each distinct (tower, image) pair is computed once:
the key is a digest of the tower's weights (recomputed when a weight is changed in place) and a
digest of the image bytes with the image processor's settings (`image_key`). A hit returns the
tensor the tower computed for that key, so results are the same with the memo as without it.
Bounded by bytes, least recently used first out; `LATENTMED_FEATURE_MEMO_MB` sets the bound
(0 turns the memo off). Behind it, `DiskMemo` keeps the same outputs on disk for the other
processes of a build (the chapters).

Two small memos sit beside it, both exact: the grid an image processor gives an image of a size
(`image_grid`, so a prompt whose tower output is memoised never runs the processor), and the ids a
tokenizer gives a text (`token_ids`: a study encodes the same option and key words tens of
thousands of times). Likewise exact: the text it decodes from ids (`decoded`) and the M-RoPE
positions of a row layout (`rope_index`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict

import torch

from ..files import atomic_save_tensors, state_hash

# A tower with more parameters than this is keyed by its identity instead of a digest of its
# weights (hashing a 7B model's tower on every load would cost more than it saves).
DIGEST_MAX_PARAMS = 50_000_000


class FeatureMemo:
    """key -> tensor, least recently used first out once `max_bytes` is exceeded."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def get(self, key) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._items.clear()
        self.bytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)


MEMO = FeatureMemo(int(float(os.environ.get("LATENTMED_FEATURE_MEMO_MB", "512")) * 2**20))


def weights_key(module: torch.nn.Module) -> str:
    """A digest of `module`'s weights (its identity for very large modules), kept on the module and
    recomputed when a parameter or buffer was changed in place since (torch's version counters)."""
    tensors = list(module.state_dict(keep_vars=True).values())
    versions = tuple(t._version for t in tensors)
    cached = getattr(module, "_latentmed_weights_key", None)
    if cached is not None and cached[0] == versions:
        return cached[1]
    big = sum(t.numel() for t in tensors) > DIGEST_MAX_PARAMS
    key = f"id-{id(module)}-{hash(versions)}" if big else state_hash(module)
    module._latentmed_weights_key = (versions, key)
    return key


def processor_key(processor) -> str:
    """A digest of an image processor's settings (kept on the processor)."""
    key = getattr(processor, "_latentmed_key", None)
    if key is None:
        settings = processor.to_dict() if hasattr(processor, "to_dict") else {"type": type(processor).__name__}
        key = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        try:
            processor._latentmed_key = key
        except AttributeError:  # a processor that takes no new attributes is hashed each time
            pass
    return key


def image_key(processor, images) -> str:
    """A digest of what determines the pixels of `images` (PIL images): mode, size and bytes of each,
    and the processor's settings."""
    h = hashlib.sha1(processor_key(processor).encode())
    for im in images:
        h.update(f"{im.mode}:{im.size[0]}x{im.size[1]}:".encode())
        h.update(im.tobytes())
    return h.hexdigest()


def tower(model, pixel_values, grid: torch.Tensor, key: str | None, compute, weights: str | None = None) -> torch.Tensor:
    """The merged tokens of `pixel_values` (a tensor, or a function that makes it: the processor
    then runs only on a miss) through `model`'s tower: memoised when the pixels carry a `key`
    (`image_key`), else computed. `weights` is the tower's `weights_key` when the caller has it
    (a batch's images share one: walking the tower's state for every image cost more than a hit)."""
    def pixels():
        return pixel_values() if callable(pixel_values) else pixel_values

    if key is None or MEMO.max_bytes <= 0:
        return compute(pixels(), grid)
    full = (weights or weights_key(model.model.visual), key, tuple(grid.flatten().tolist()), str(model.device),
            str(model.dtype))
    hit = MEMO.get(full)
    if hit is not None:
        return hit
    out = DISK.get(full)
    if out is None:
        out = compute(pixels(), grid)
        DISK.put(full, out)
    MEMO.put(full, out)
    return out


class DiskMemo:
    """The tower memo across processes: one safetensors file per key under
    `<results>/cache/tower`, for the CPU. The book's chapters run in separate processes over the
    same items and perturbed images (chapters 3, 6 and 10 perturb the same images; every chapter
    encodes the 400 clean ones): each (tower, image) is computed once per build. The key adds what
    else decides the output's bits (torch's version, the CPU kernel settings, the thread count); a
    file that does not load is computed again. `LATENTMED_TOWER_CACHE_MB` bounds what a process
    adds (0 turns it off)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.added = self.hits = self.misses = 0

    @staticmethod
    def folder():
        from ..paths import results_dir

        return results_dir() / "cache" / "tower"

    @staticmethod
    def _name(key: tuple) -> str:
        context = (torch.__version__, torch.get_num_threads(),
                   *(os.environ.get(k, "") for k in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")))
        return hashlib.sha1(repr((key, context)).encode()).hexdigest() + ".safetensors"

    def _on(self, key: tuple) -> bool:
        """Kept for CPU outputs of a tower keyed by a digest of its weights (not by its identity)."""
        weights, _, _, device, _ = key  # `tower`'s key
        return self.max_bytes > 0 and device == "cpu" and not weights.startswith("id-")

    def get(self, key: tuple) -> torch.Tensor | None:
        if not self._on(key):
            return None
        path = self.folder() / self._name(key)
        try:
            from safetensors.torch import load_file

            out = load_file(str(path))["tokens"]
        except Exception:  # absent, or cut by a kill: computed again  # noqa: BLE001
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, key: tuple, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if not self._on(key) or self.added + size > self.max_bytes:
            return
        folder = self.folder()
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors({"tokens": value}, folder / self._name(key))  # chapters may write one key at once
        self.added += size


DISK = DiskMemo(int(float(os.environ.get("LATENTMED_TOWER_CACHE_MB", "1024")) * 2**20))


_GRIDS: dict = {}  # (processor settings, image sizes) -> image_grid_thw


def image_grid(processor, images, process) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(`image_grid_thw`, pixels or None) of `images`: the processor's grid depends only on its
    settings and the images' sizes, so it is kept per (settings, sizes); on a miss
    `process(images)` -> (pixels, grid) runs the processor and its pixels come back too."""
    key = (processor_key(processor), tuple((im.mode, im.size) for im in images))
    grid = _GRIDS.get(key)
    if grid is None:
        pix, grid = process(images)
        _GRIDS[key] = grid.clone()
        return grid, pix
    return grid.clone(), None


_TOKEN_MEMO_MAX = 200_000  # texts per tokenizer before its memo is dropped


def _tokenizer_memo(tokenizer, attr: str) -> dict | None:
    """A memo kept on the tokenizer under `attr`, started afresh when the vocabulary grows (tokens
    added) or it holds too many entries; None for a tokenizer that takes no new attributes."""
    memo = getattr(tokenizer, attr, None)
    size = len(tokenizer)
    if memo is None or memo[0] != size or len(memo[1]) > _TOKEN_MEMO_MAX:
        memo = (size, {})
        try:
            setattr(tokenizer, attr, memo)
        except AttributeError:
            return None
    return memo[1]


def token_ids(tokenizer, text: str) -> list[int]:
    """`tokenizer.encode(text, add_special_tokens=False)`, kept on the tokenizer per text."""
    memo = _tokenizer_memo(tokenizer, "_latentmed_ids")
    if memo is None:
        return list(tokenizer.encode(text, add_special_tokens=False))
    ids = memo.get(text)
    if ids is None:
        ids = memo[text] = tuple(tokenizer.encode(text, add_special_tokens=False))
    return list(ids)


def decoded(tokenizer, ids: list[int], skip_special_tokens: bool) -> str:
    """`tokenizer.decode(ids, skip_special_tokens=...)`, kept on the tokenizer per id sequence
    (a sweep's variants mostly write the same text: 3 decodes per trace cost 60 us each)."""
    memo = _tokenizer_memo(tokenizer, "_latentmed_text")
    if memo is None:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    key = (tuple(ids), skip_special_tokens)
    text = memo.get(key)
    if text is None:
        text = memo[key] = tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    return text


_ROPE_MEMO_MAX = 50_000  # row layouts per model before its memo is dropped


def rope_index(model, ids: torch.Tensor, is_image: torch.Tensor, grid: torch.Tensor | None,
               mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' `get_rope_index(ids, is_image, grid, mask)` positions [3, B, T], computed once
    per distinct row layout and kept on the model: it loops over rows in Python (~0.3 ms a row)
    and a study runs the same layouts thousands of times (every condition and model of an item).
    A row's positions depend only on its unmasked token types and the grids of its images (taken
    in order, as transformers takes them), so each new layout is computed by transformers on that
    row alone and the others are copied from the memo."""
    memo = getattr(model, "_latentmed_rope", None)
    if memo is None or len(memo) > _ROPE_MEMO_MAX:
        memo = model._latentmed_rope = {}
    B, T = ids.shape
    types = is_image.to(torch.int8).cpu().numpy()
    keep = None if mask is None else mask.bool().cpu().numpy()
    grids = None if grid is None else grid.cpu()
    grid_rows = [] if grids is None else [tuple(g) for g in grids.tolist()]
    pos = torch.zeros(3, B, T, dtype=ids.dtype, device=ids.device)
    g = 0  # the next row's first image grid
    for b in range(B):
        t = types[b] if keep is None else types[b][keep[b]]
        n_images = int(((t[1:] == 1) & (t[:-1] == 0)).sum() + (t[:1] == 1).sum()) if len(t) else 0
        key = (t.tobytes(), tuple(grid_rows[g:g + n_images]))
        cols = slice(None) if keep is None else torch.as_tensor(keep[b], device=ids.device)  # unmasked columns
        value = memo.get(key)
        if value is None:
            one = None if keep is None else mask[b:b + 1]
            rows = None if grids is None or not n_images else grids[g:g + n_images].to(ids.device)
            full, _ = model.model.get_rope_index(ids[b:b + 1], is_image[b:b + 1].int(), image_grid_thw=rows,
                                                 attention_mask=one)
            value = memo[key] = full[:, 0, cols]
        pos[:, b, cols] = value
        g += n_images
    return pos
