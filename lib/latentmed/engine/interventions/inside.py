"""Edits inside the model: the visual encoder's output, named hooks, recorders, attention knockout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..hooks import check_hook_name
from .base import (
    Intervention,
    _bad,
    _check_choice,
    _check_int,
    _check_number,
    _check_positions,
    _vectors,
)

# ---- visual encoder output --------------------------------------------------------------------

@dataclass
class MaskImageTokens(Intervention):
    """Zero (or set to their mean) the merged image tokens at `indices` (None = all)."""
    point: ClassVar[str] = "features"
    indices: list[int] | None = None
    mode: str = "zero"

    def validate(self):
        _check_choice(self, "mode", ("zero", "mean"))
        if self.indices is not None and (not isinstance(self.indices, (list, tuple)) or not all(
                isinstance(i, (int, np.integer)) and i >= 0 for i in self.indices)):
            _bad(self, "indices", f"must be None or a list of token indices >= 0, got {self.indices!r}")

    def edit_features(self, feats):
        if self.indices is not None and self.indices and max(self.indices) >= len(feats):
            raise ValueError(f"MaskImageTokens: index {max(self.indices)} is beyond the {len(feats)} image tokens")
        feats = feats.clone()
        idx = slice(None) if self.indices is None else torch.as_tensor(self.indices, dtype=torch.long)
        feats[idx] = 0.0 if self.mode == "zero" else feats.mean(0)
        return feats


@dataclass
class NoiseImageFeatures(Intervention):
    """Add Gaussian noise of norm `scale * ||token||` to every merged image token."""
    point: ClassVar[str] = "features"
    scale: float = 1.0
    seed: int = 0

    def validate(self):
        _check_number(self, "scale", lo=0)
        _check_int(self, "seed")

    def edit_features(self, feats):
        g = torch.Generator().manual_seed(self.seed)
        d = torch.randn(feats.shape, generator=g).to(feats)
        return feats + d / d.norm(dim=-1, keepdim=True) * self.scale * feats.norm(dim=-1, keepdim=True)


# ---- named hooks inside the model -------------------------------------------------------------


@dataclass
class HookEdit(Intervention):
    """Edit the tensor at a named hook (e.g. `blocks.1.hook_resid_post`) at `positions`
    (sequence indices, or "latents": every latent slot).

    op: "zero", "add" (value [H]), "set" (value [H] or one row per position), "scale" (factor).
    """

    point: ClassVar[str] = "hook"
    hook: str = "blocks.0.hook_resid_post"
    positions: list[int] | str = "latents"
    op: str = "zero"
    value: list | None = None
    factor: float = 1.0

    def validate(self):
        check_hook_name(self.hook, editable=True)
        _check_positions(self, "positions")
        if self.positions == "all":
            _bad(self, "positions", "'all' is for recording; edit 'latents' or a list of positions")
        _check_choice(self, "op", ("zero", "add", "set", "scale"))
        _check_number(self, "factor")
        if self.op in ("add", "set"):
            if self.value is None:
                _bad(self, "value", f"op {self.op!r} needs a value")
            _vectors(self, "value", torch.as_tensor(self.value).dim() if self.op == "set" else 1)

    @property
    def shares_prefix(self) -> bool:
        return self.positions == "latents"

    def edit(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """New value of one position's vector x [H]; i indexes `value` rows for "set"."""
        if self.op == "zero":
            return torch.zeros_like(x)
        if self.op == "scale":
            return x * self.factor
        v = torch.as_tensor(self.value, dtype=x.dtype, device=x.device)
        v = v[i] if v.dim() == 2 else v
        if v.shape != x.shape:
            raise ValueError(f"HookEdit({self.hook}): value has shape {tuple(v.shape)}, the hook's is {tuple(x.shape)}")
        return x + v if self.op == "add" else v


@dataclass
class Record(Intervention):
    """Record (read-only) the tensors at named hooks at `positions` ("latents", "all" or indices):
    `trace.records[name]` is [n_positions, ...] in sequence order, `trace.record_positions[name]`
    the positions. Names may use `*` for every layer (`blocks.*.hook_resid_post`)."""

    point: ClassVar[str] = "record"
    hooks: list[str] = field(default_factory=lambda: ["latent.hook_in"])
    positions: list[int] | str = "latents"

    def validate(self):
        if isinstance(self.hooks, str) or not isinstance(self.hooks, (list, tuple)) or not self.hooks:
            _bad(self, "hooks", f"must be a non-empty list of hook names, got {self.hooks!r}")
        for h in self.hooks:
            check_hook_name(h, editable=False)
        _check_positions(self, "positions")

    @property
    def shares_prefix(self) -> bool:
        return self.positions == "latents"


# ---- attention knockout -----------------------------------------------------------------------

KNOCKOUT_QUERIES = ("after_segment", "latents")
KNOCKOUT_KEYS = ("latents", "image", "before_segment")


@dataclass
class Knockout(Intervention):
    """`query` positions may not attend to `key` positions (in decoding, replay and continuation).

    query: "after_segment" (every position after a segment: the answer) or "latents" (the slots);
    key: "latents" (the slots), "image" (the image tokens) or "before_segment" (everything before
    the segment's start marker: image, question, options; the bottleneck of `LatentSpec`).
    """

    point: ClassVar[str] = "knockout"
    query: str = "after_segment"
    key: str = "latents"

    def validate(self):
        _check_choice(self, "query", KNOCKOUT_QUERIES)
        _check_choice(self, "key", KNOCKOUT_KEYS)

    @property
    def shares_prefix(self) -> bool:
        return True  # both query kinds exist only once a segment has opened
