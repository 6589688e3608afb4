"""Latent-feed edits (what is written at a latent slot) and segment control (K, markers, drop)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from .base import (
    FeedContext,
    Intervention,
    _bad,
    _check_choice,
    _check_int,
    _check_number,
    _vec,
    _vectors,
    derangement,
)

# ---- latent feed ---------------------------------------------------------------------------

@dataclass(kw_only=True)
class LatentFeed(Intervention, abstract=True):
    """Base of latent-feed edits; `steps` limits it to some latent indices (None = all)."""
    point: ClassVar[str] = "latent"
    steps: list[int] | None = None

    def validate(self) -> None:
        if self.steps is not None:
            if not isinstance(self.steps, (list, tuple)) or not all(
                    isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in self.steps):
                _bad(self, "steps", f"must be None or a list of latent indices >= 0, got {self.steps!r}")

    def feed(self, z: torch.Tensor, ctx: FeedContext) -> torch.Tensor:
        return z if self.steps is not None and ctx.k not in self.steps else self.apply(z, ctx)

    def apply(self, z: torch.Tensor, ctx: FeedContext) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def feed_many(cls, ivs: list["LatentFeed"], z: torch.Tensor, ctxs: list[FeedContext]) -> torch.Tensor:
        """`feed` of edit i on row i of z [n, H], for edits of this class (a batch can override it)."""
        return torch.stack([iv.feed(z[i], c) for i, (iv, c) in enumerate(zip(ivs, ctxs))])


def feed_rows(row_ivs: list[list[Intervention]], z: torch.Tensor, ctxs: list[FeedContext]) -> torch.Tensor:
    """Row i's latent edits applied in its order to row i of z [n, H] (written in place); the rows
    whose j-th edit is of one class go through that class's `feed_many` together (a sweep feeds
    its M noise variants as one block instead of M small tensors)."""
    for j in range(max((len(v) for v in row_ivs), default=0)):
        groups: dict[type, list[int]] = {}
        for i, v in enumerate(row_ivs):
            if j < len(v):
                groups.setdefault(type(v[j]), []).append(i)
        for cls, rows in groups.items():
            z[rows] = cls.feed_many([row_ivs[i][j] for i in rows], z[rows], [ctxs[i] for i in rows]).to(z.dtype)
    return z


@dataclass
class ZeroLatent(LatentFeed):
    """Feed a zero vector."""
    def apply(self, z, ctx):
        return torch.zeros_like(z)


@dataclass
class FixedLatent(LatentFeed):
    """Feed one fixed tensor at every latent slot (the paper's 'set all latents to one tensor')."""
    vector: list[float] = field(default_factory=list)

    def validate(self):
        super().validate()
        _vectors(self, "vector", 1)

    def apply(self, z, ctx):
        return _vec(self.vector, z)


@dataclass
class MeanLatent(FixedLatent):
    """Feed the mean latent (see `mean_latent`), the paper's 'Z = mean': a FixedLatent by name."""


@dataclass
class NoiseLatent(LatentFeed):
    """Gaussian direction with norm `scale * ||z||`, added to z ("add") or replacing it ("replace")."""
    scale: float = 1.0
    mode: str = "add"
    seed: int = 0

    def validate(self):
        super().validate()
        _check_number(self, "scale", lo=0)
        _check_choice(self, "mode", ("add", "replace"))
        _check_int(self, "seed")

    def direction(self, ctx: FeedContext, dim: int) -> torch.Tensor:
        """The seeded unit direction at latent k of segment `ctx.segment` (do not write into it)."""
        return _direction(self.seed * 1_000_003 + ctx.segment * 1009 + ctx.k, dim)

    def noise(self, z: torch.Tensor, ctx: FeedContext) -> torch.Tensor:
        d = self.direction(ctx, z.shape[-1])
        return (d * self.scale * z.float().norm()).to(z.dtype).to(z.device)

    def apply(self, z, ctx):
        n = self.noise(z, ctx)
        return z + n if self.mode == "add" else n

    @classmethod
    def feed_many(cls, ivs, z, ctxs):
        """All rows' noise at once: the same directions and norms as `noise`, row by row."""
        on = [i for i, (iv, c) in enumerate(zip(ivs, ctxs)) if iv.steps is None or c.k in iv.steps]
        if not on:
            return z
        d = torch.stack([ivs[i].direction(ctxs[i], z.shape[-1]) for i in on])
        scale = torch.tensor([float(ivs[i].scale) for i in on])[:, None]
        x = z[on]
        n = (d * scale * x.float().norm(dim=-1, keepdim=True)).to(z.dtype).to(z.device)
        add = torch.tensor([ivs[i].mode == "add" for i in on], device=z.device)[:, None]
        out = z.clone()
        out[on] = torch.where(add, x + n, n)
        return out


@functools.lru_cache(maxsize=4096)
def _direction(seed: int, dim: int) -> torch.Tensor:
    """The seeded unit direction of `NoiseLatent` (the same for every row and item that share the
    seed, so a sweep draws it once); callers must not write into it."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(dim, generator=g, dtype=torch.float32)
    return d / d.norm()


@dataclass
class ExtremeLatent(LatentFeed):
    """Extreme values: every entry set to `value` ("constant") or z multiplied by it ("scale")."""
    value: float = 1e3
    mode: str = "constant"

    def validate(self):
        super().validate()
        _check_number(self, "value")
        _check_choice(self, "mode", ("constant", "scale"))

    def apply(self, z, ctx):
        return torch.full_like(z, self.value) if self.mode == "constant" else z * self.value


@dataclass
class SwapLatent(LatentFeed):
    """Feed another instance's latent k (its Z_in rows); slots beyond its length stay unchanged."""
    source: list[list[float]] = field(default_factory=list)

    def validate(self):
        super().validate()
        _vectors(self, "source", 2)

    def apply(self, z, ctx):
        return _vec(self.source[ctx.k], z) if ctx.k < len(self.source) else z


@dataclass
class RepeatFirstLatent(LatentFeed):
    """Feed the segment's first latent again at every later slot (2605.21642's 'first repeated')."""

    def apply(self, z, ctx):
        return z if ctx.k == 0 or ctx.first is None else ctx.first.to(z)


@dataclass
class ShuffleLatents(LatentFeed):
    """Feed the latents of `source` (or the trace's own, in replay) in a seeded shuffled order
    that moves every latent (a derangement when K > 1)."""
    seed: int = 0
    source: list[list[float]] | None = None

    def validate(self):
        super().validate()
        _check_int(self, "seed")
        if self.source is not None:
            _vectors(self, "source", 2)

    def order(self, n: int) -> list[int]:
        return derangement(n, self.seed)

    def apply(self, z, ctx):
        if self.source is None:
            raise ValueError("ShuffleLatents while decoding needs `source` latents "
                             "(in a replay the trace's own latents are shuffled)")
        perm = self.order(len(self.source))
        return _vec(self.source[perm[ctx.k]], z) if ctx.k < len(perm) else z



def mean_latent(traces, segment: int = 0) -> list[float]:
    """Mean of the fed latents (Z_in) over a set of traces, for `MeanLatent`."""
    zs = [t.segments[segment].z_in for t in traces if len(t.segments) > segment]
    zs = [z.float() for z in zs if z is not None and len(z)]
    if not zs:
        raise ValueError("mean_latent: none of the traces has latents in segment {segment}")
    return torch.cat(zs).mean(0).tolist()


# ---- segment control -------------------------------------------------------------------------

@dataclass
class ChangeK(Intervention):
    """Exactly `k` latents in every segment, or only in segment number `segment` (0 = the first;
    the others keep their own K); sampled end tokens before k are ignored."""
    point: ClassVar[str] = "segment"
    k: int = 0
    segment: int | None = None

    def validate(self):
        _check_int(self, "k")
        _check_int(self, "segment", optional=True)

    def segment_k(self, k):
        return self.k

    def acts_on(self, segment: int) -> bool:
        return self.segment is None or segment == self.segment


@dataclass
class DropSegment(Intervention):
    """No segment at all: the start token is banned (decode) or the span removed (replay)."""
    point: ClassVar[str] = "segment"

    def segment_k(self, k):
        return None


@dataclass
class MarkersOnly(Intervention):
    """Keep the start and end markers, no latent slots between them (2606.01287 ablation)."""
    point: ClassVar[str] = "segment"

    def segment_k(self, k):
        return 0
